"""avel.features.decode on real media encoded by the tests (H.264 + AAC via avel.features.media)."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

import avel.features.decode as dec
from avel.features.decode import VideoDecodeError, VideoStream, decode_video, sample_times
from avel.features.media import write_clip

from _support.media import color_frames, decode_audio, tone

RGB = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
SOUNDS = Path("/usr/share/sounds/freedesktop/stereo")


def _rms_per_second(w: np.ndarray, sr: int = 16000) -> np.ndarray:
    return np.sqrt((w.reshape(-1, sr) ** 2).mean(1))


@pytest.fixture(scope="module")
def clip3(tmp_path_factory) -> Path:
    """3 s at 25 fps: red, green, blue seconds; a 440 Hz tone at amplitude 0.1, 0.3, 0.6."""
    path = tmp_path_factory.mktemp("clips") / "rgb.mp4"
    audio = np.concatenate([tone(1, 440, amplitude=a) for a in (0.1, 0.3, 0.6)])
    write_clip(path, color_frames(RGB, 25, (32, 48)), 25, audio)
    return path


def test_per_second_frames_and_audio(clip3):
    d = decode_video(clip3)
    assert d.seconds == 3 and d.fps == 16 and d.duration == pytest.approx(3.0, abs=0.05)
    assert d.frames.shape == (48, 32, 48, 3) and d.frames.dtype == np.uint8
    assert d.waveform.shape == (48000,) and d.waveform.dtype == np.float32
    for s, color in enumerate(RGB):
        mean = d.frames[s * 16:(s + 1) * 16].reshape(16, -1, 3).mean(1)
        np.testing.assert_allclose(mean, np.broadcast_to(color, (16, 3)), atol=6)
    # a sine of amplitude a has RMS a / sqrt(2); AAC keeps it within a few percent
    np.testing.assert_allclose(_rms_per_second(d.waveform)[:], np.array([0.1, 0.3, 0.6]) / np.sqrt(2), rtol=0.1)
    assert not any(d.flags[k] for k in ("padded_video", "padded_audio", "no_audio", "no_video", "truncated"))
    assert d.flags["corrupt_packets"] == 0


def test_sample_rule_last_frame_at_or_before_each_time(clip3):
    d = decode_video(clip3)
    t = sample_times(3, 16)
    np.testing.assert_allclose(t[:3], [1 / 32, 3 / 32, 5 / 32])
    source = np.arange(75) / 25.0                     # the clip's frame times
    expected = source[np.searchsorted(source, t + 1e-9, side="right") - 1]
    np.testing.assert_allclose(d.frame_times, expected, atol=1e-6)


def test_variable_frame_rate_picks_frame_by_timestamp(tmp_path):
    pts = np.array([0, 0.05, 0.3, 0.31, 0.32, 0.7, 1.0, 1.45, 1.5, 2.2, 2.9, 2.95])
    frames = np.stack([np.full((16, 16, 3), 20 * k, np.uint8) for k in range(len(pts))])
    path = write_clip(tmp_path / "vfr.mp4", frames, 16, None, vfr_pts=pts)
    d = decode_video(path)
    assert d.seconds == 3
    expected = np.searchsorted(pts, d.sample_times, side="right") - 1   # last frame with pts <= t
    np.testing.assert_allclose(d.frame_times, pts[expected], atol=1e-4)
    np.testing.assert_allclose(d.frames[:, 8, 8, 0].astype(int), 20 * expected, atol=3)
    assert d.flags["no_audio"] and not d.waveform.any()


def test_low_source_rate_repeats_frames(tmp_path):
    path = write_clip(tmp_path / "slow.mp4", color_frames(RGB, 4, (16, 16)), 4, tone(3))
    d = decode_video(path, fps=16)
    assert d.frames.shape[0] == 48
    assert len(np.unique(d.frame_times)) == 12          # 4 source frames per second, each used 4 times
    assert d.frames[0].mean() == d.frames[3].mean()


def test_no_audio_stream_gives_zeros_and_flag(tmp_path):
    path = write_clip(tmp_path / "mute.mp4", color_frames(RGB[:2], 16, (16, 16)), 16, None)
    d = decode_video(path)
    assert d.seconds == 2 and d.flags["no_audio"] and not d.flags["padded_audio"]
    assert d.waveform.shape == (32000,) and not d.waveform.any()


def test_fixed_length_pads_and_truncates(clip3):
    long = decode_video(clip3, seconds=5, size=(8, 12))
    assert long.frames.shape == (80, 8, 12, 3) and long.waveform.shape == (80000,)
    assert long.flags["padded_video"] and long.flags["padded_audio"] and not long.flags["truncated"]
    assert long.flags["padded_frames"] == 32
    np.testing.assert_array_equal(long.frames[-1], long.frames[47])          # last frame repeated
    assert not long.waveform[48000 + 400:].any()                            # silence after the end
    short = decode_video(clip3, seconds=2)
    assert short.frames.shape[0] == 32 and short.waveform.shape == (32000,)
    assert short.flags["truncated"] and not short.flags["padded_video"]


def test_resize_while_decoding(clip3):
    d = decode_video(clip3, size=(10, 20))
    assert d.frames.shape == (48, 10, 20, 3)
    assert decode_video(clip3, size=8).frames.shape == (48, 8, 8, 3)


def test_stereo_44k_is_resampled_to_16k_mono(tmp_path):
    sr = 44100
    t = np.arange(2 * sr) / sr
    left = 0.3 * np.sin(2 * np.pi * 1000 * t)
    path = write_clip(tmp_path / "st.mp4", color_frames(RGB[:2], 16, (16, 16)), 16,
                      np.stack([left, left], 1), sample_rate=sr)
    d = decode_video(path)
    assert d.waveform.shape == (32000,)
    w = d.waveform[2000:30000]
    crossings = np.sum(np.diff(np.signbit(w).astype(np.int8)) != 0) / (len(w) / 16000) / 2
    assert crossings == pytest.approx(1000, rel=0.02)                    # still a 1 kHz tone


def test_audio_only_file(tmp_path):
    path = write_clip(tmp_path / "a.m4a", None, 16, tone(2))
    d = decode_video(path, size=(8, 8))
    assert d.flags["no_video"] and d.frames.shape == (32, 8, 8, 3) and not d.frames.any()
    assert _rms_per_second(d.waveform).min() > 0.15
    a = decode_audio(path)
    assert a.frames.size == 0 and not a.flags["no_video"] and a.waveform.shape == (32000,)


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_file_decodes_what_it_can_or_raises(tmp_path, faststart):
    path = write_clip(tmp_path / "full.mp4", color_frames(RGB, 25, (32, 32)), 25, tone(3), faststart=faststart)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    try:
        d = decode_video(cut)
    except VideoDecodeError as e:       # index at the end (not faststart): nothing to go on
        assert "cut.mp4" in str(e)
        assert not faststart
        return
    # index first: the first part of the data decodes, the rest is padding
    assert d.seconds == 3 and d.frames.shape[0] == 48
    assert d.flags["padded_video"] and d.flags["padded_audio"]
    assert d.frames[0].reshape(-1, 3).mean(0)[0] > 200                   # red first second intact


def test_unopenable_and_missing_files_raise(tmp_path):
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError, match="garbage.mp4: cannot open"):
        decode_video(bad)
    with pytest.raises(VideoDecodeError, match="nothere.mp4"):
        decode_video(tmp_path / "nothere.mp4")


def _read_sound(path: Path) -> tuple[np.ndarray, int]:
    """The .oga through PyAV directly: float [S, C] at its own rate."""
    chunks = []
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        rate = stream.rate
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=rate)
        for frame in c.decode(stream):
            for f in resampler.resample(frame):
                chunks.append(f.to_ndarray())
    return np.concatenate(chunks, 1).T, rate


@pytest.mark.skipif(not (SOUNDS / "phone-incoming-call.oga").is_file(),
                    reason="needs Debian package sound-theme-freedesktop (apt-get install sound-theme-freedesktop)")
def test_recorded_sound_muxed_with_frames(tmp_path):
    sound, rate = _read_sound(SOUNDS / "phone-incoming-call.oga")        # ~1.46 s, 44.1 kHz stereo
    audio = np.zeros((4 * rate, 2), np.float32)
    audio[rate:rate + len(sound)] = sound[: 3 * rate]                     # silence, sound, silence
    path = write_clip(tmp_path / "ring.mp4", color_frames(RGB + RGB[:1], 16, (16, 16)), 16, audio, sample_rate=rate)
    d = decode_video(path)
    assert d.seconds == 4 and not d.flags["no_audio"]
    rms = _rms_per_second(d.waveform)
    assert rms[1] > 0.05 and rms[0] < 1e-3 and rms[3] < 1e-3
    # the .oga decodes directly through the audio path too
    direct = decode_audio(SOUNDS / "phone-incoming-call.oga", seconds=2)
    assert direct.waveform.shape == (32000,) and _rms_per_second(direct.waveform)[0] > 0.05
    assert direct.flags["padded_audio"]                                  # 1.46 s of sound in 2 s


def test_audio_gap_stays_aligned(tmp_path):
    """Audio packets missing between 1.024 s and 2.048 s: silence there, the rest at its own time."""
    from fractions import Fraction

    sr, path = 16000, tmp_path / "gap.m4a"
    block = (0.3 * np.sin(2 * np.pi * 440 * np.arange(1024) / sr)).astype(np.float32)[None]
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=sr)
        s.layout = "mono"
        for k in [*range(16), *range(32, 47)]:
            f = av.AudioFrame.from_ndarray(block.copy(), format="fltp", layout="mono")
            f.sample_rate, f.pts, f.time_base = sr, k * 1024, Fraction(1, sr)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    d = decode_audio(path, seconds=3)
    rms = np.sqrt((d.waveform.reshape(-1, 800) ** 2).mean(1))            # 50 ms windows
    assert rms[:20].min() > 0.15 and rms[22:40].max() < 1e-3 and rms[42:58].min() > 0.15


def test_stream_yields_the_seconds_of_decode_video_while_demuxing(tmp_path):
    """VideoStream gives decode_video's rows second by second, before the end of the file is reached."""
    rng = np.random.default_rng(3)
    path = write_clip(tmp_path / "r.mp4", rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8), 10, tone(6))
    for kw in ({}, {"seconds": 4}, {"seconds": 8, "fps": 3}):
        whole = decode_video(path, **kw)
        with VideoStream(path, **kw) as vs:
            got = []
            for s, frames, times in vs:
                if s == 0:
                    assert vs.flags is None                       # the first second comes before the end
                got.append((s, frames, times))
        assert [s for s, _, _ in got] == list(range(whole.seconds)) and vs.seconds == whole.seconds
        np.testing.assert_array_equal(np.concatenate([f for _, f, _ in got]), whole.frames)
        np.testing.assert_array_equal(np.concatenate([t for _, _, t in got]), whole.frame_times)
        np.testing.assert_array_equal(vs.waveform, whole.waveform)
        assert vs.flags == whole.flags and vs.duration == whole.duration


def test_stream_with_unknown_length_matches_decode_video(tmp_path, monkeypatch):
    """No container duration: seconds are yielded once proven inside the clip, the same as decode_video."""
    path = write_clip(tmp_path / "r.mp4", color_frames(RGB, 10, (16, 16)), 10, tone(3))
    monkeypatch.setattr(dec, "_container_duration", lambda c: None)
    whole = decode_video(path)
    with dec.VideoStream(path) as vs:
        frames = np.concatenate([f for _, f, _ in vs])
    assert vs.seconds == whole.seconds == 3
    np.testing.assert_array_equal(frames, whole.frames)
    assert vs.flags == whole.flags


# ---------------------------------------------------------------------------------------------- streamed sound

def _take_all(path, **kw):
    """VideoStream with take_audio() after every second: the pieces, the rest (``waveform``) and the stream."""
    pieces = []
    with VideoStream(path, **kw) as vs:
        for _ in vs:
            pieces.append(vs.take_audio())
    return pieces, vs


@pytest.mark.parametrize("kw", [{}, {"seconds": 5}, {"seconds": 2}, {"seconds": 4, "sample_rate": 8000}])
def test_take_audio_hands_out_the_waveform_in_order(clip3, kw):
    """The samples taken second by second, then the rest in ``waveform``, are decode_video's waveform exactly
    (padded or cut to T as it is), and the flags are the same: the sound streams instead of being held."""
    whole = decode_video(clip3, **kw)
    pieces, vs = _take_all(clip3, **kw)
    got = np.concatenate([*pieces, vs.waveform])
    np.testing.assert_array_equal(got, whole.waveform)
    assert vs.audio_taken == sum(map(len, pieces)) > 0
    assert len(vs.waveform) == len(whole.waveform) - vs.audio_taken
    assert max(map(len, pieces)) <= 2 * vs.sample_rate                  # never the whole sound at once
    assert vs.flags == whole.flags and vs.seconds == whole.seconds


def test_take_audio_with_unknown_length_and_without_sound(tmp_path, monkeypatch):
    path = write_clip(tmp_path / "r.mp4", color_frames(RGB, 10, (16, 16)), 10, tone(3))
    mute = write_clip(tmp_path / "m.mp4", color_frames(RGB, 10, (16, 16)), 10, None)
    monkeypatch.setattr(dec, "_container_duration", lambda c: None)
    for p in (path, mute):
        whole = decode_video(p)
        pieces, vs = _take_all(p)
        got = np.concatenate([*pieces, vs.waveform])[: whole.seconds * 16000]
        np.testing.assert_array_equal(got, whole.waveform)
        assert vs.flags == whole.flags
    assert vs.flags["no_audio"] and vs.audio_taken == 0


def test_files_that_are_not_videos_fail_at_once_naming_the_file(tmp_path):
    """A folder named like a video, a broken link and a fifo (opening it would wait forever for a writer)
    raise VideoDecodeError with the reason, before FFmpeg touches them."""
    import os

    (tmp_path / "dir.mp4").mkdir()
    (tmp_path / "link.mp4").symlink_to(tmp_path / "gone.mp4")
    os.mkfifo(tmp_path / "pipe.mp4")
    for name, reason in (("dir.mp4", "is a folder"), ("link.mp4", "broken symbolic link"),
                         ("pipe.mp4", "not a regular file"), ("absent.mp4", "no such file")):
        with pytest.raises(VideoDecodeError, match=f"{name}: {reason}"):
            decode_video(tmp_path / name)
    assert dec.file_problem(tmp_path / "link.mp4") == f"broken symbolic link (to {tmp_path / 'gone.mp4'})"
