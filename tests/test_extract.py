"""avel.features.extract: real mp4 clips (encoded here with PyAV) through tiny fake backbones, plus one run
with the real offline defaults (efficientnet-lite0 + logmel)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import av
import h5py
import numpy as np
import pytest

from avel.cli import main
from avel.data.annotations import parse_annotations
from avel.data.errors import DataError
from avel.data.store import open_store
from avel.features import audio_backbones, visual_backbones
from avel.features.extract import (
    PARTS,
    VideoItem,
    collect_videos,
    extract,
    extract_video,
    merge_shards,
    read_manifest,
    shard_from_env,
)
from avel.features.extract import video as extract_video_module
from avel.features.media import write_clip

from _fake_backbones import BackboneCrash, FakeAudio, FakeVisual
from _support.media import color_frames, tone

TESTS = Path(__file__).resolve().parent
RGB = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
SOUND = Path("/usr/share/sounds/freedesktop/stereo/phone-incoming-call.oga")


def _clip(path: Path, shift: int = 0, seconds: int = 3, fps: int = 8, amp: float = 0.2, audio: bool = True) -> Path:
    colors = [RGB[(s + shift) % 3] for s in range(seconds)]
    return write_clip(path, color_frames(colors, fps, (32, 32)), fps, tone(seconds, amplitude=amp) if audio else None)


def _run(items, out, **kw):
    kw.setdefault("seconds", 3)
    kw.setdefault("fps", 4)
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    audio = kw.pop("audio_backbone", None) or FakeAudio()
    visual = kw.pop("visual_backbone", None) or FakeVisual()
    return extract(items, out, audio_backbone=audio, visual_backbone=visual, **kw)


def _h5(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["avadataset"][()]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """v0..v2 (3 s, colours rotated per clip), mute (no audio), garbage bytes, half of an mp4."""
    d = tmp_path_factory.mktemp("videos")
    for i in range(3):
        _clip(d / f"v{i}.mp4", shift=i, amp=0.1 * (i + 1))
    _clip(d / "w_mute.mp4", audio=False)
    (d / "x_garbage.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    data = _clip(d / "full.tmp.mp4").read_bytes()
    (d / "full.tmp.mp4").unlink()
    (d / "y_cut.mp4").write_bytes(data[: len(data) // 2])          # index at the end: unopenable
    return d


def test_folder_to_store(videos, tmp_path):
    items, ann = collect_videos([videos])
    assert ann is None and [it.video_id for it in items] == ["v0", "v1", "v2", "w_mute", "x_garbage", "y_cut"]
    res = _run(items, tmp_path / "out")
    assert res.finalized and res.rows == 6 and res.processed == 6 and res.failed == 2
    assert not (tmp_path / "out" / PARTS).exists()                  # parts removed once the store is written

    store = open_store(tmp_path / "out")
    assert store.audio.shape == (6, 3, 2) and store.visual.shape == (6, 3, 2, 2, 3)
    assert store.spec.visual.backbone == "fake-pool2x2" and store.spec.visual.frames_per_segment == 4
    assert store.spec.audio.backbone == "fake-rms"
    info = json.loads((tmp_path / "out" / "features.json").read_text())
    assert info["rows"] == 6 and info["videos"] == 6 and info["failed"] == 2

    rows = store.read(np.arange(6))
    # per-second visual features follow the colours of each clip (fake backbone: mean colour /255)
    for i in range(3):
        for s in range(3):
            expect = np.zeros(3)
            expect[(s + i) % 3] = 1.0
            np.testing.assert_allclose(rows["visual"][i, s].reshape(4, 3).mean(0), expect, atol=0.03)
    # audio: RMS of a tone of amplitude 0.1 (i + 1)
    np.testing.assert_allclose(rows["audio"][:3, :, 0], np.repeat([[0.1], [0.2], [0.3]], 3, 1) / np.sqrt(2), rtol=0.1)
    vec = _h5(tmp_path / "out" / "visual_feature_vec.h5")
    np.testing.assert_allclose(vec, rows["visual"].mean(axis=(2, 3)), rtol=1e-5)

    man = read_manifest(tmp_path / "out")
    assert [m["row"] for m in man] == list(range(6))
    assert [m["status"] for m in man] == ["ok"] * 4 + ["failed"] * 2
    assert man[3]["flags"].get("no_audio") and not rows["audio"][3].any()
    for m, name in zip(man[4:], ("x_garbage.mp4", "y_cut.mp4")):
        assert name in m["error"] and m["flags"] == {"failed": True}
    assert not rows["audio"][4:].any() and not rows["visual"][4:].any()
    assert set(man[0]) == {"row", "video_id", "path", "status", "flags", "seconds", "duration", "error"}

    again = _run(items, tmp_path / "out")                            # finished: nothing redone
    assert again.processed == 0 and again.resumed == 6
    with pytest.raises(DataError, match="another extraction"):
        _run(items, tmp_path / "out", fps=2)


def test_resume_after_crash_redoes_nothing_and_loses_nothing(videos, tmp_path):
    items = []
    for i in range(3):                                              # copies: the same file twice would be one video
        (tmp_path / f"r{i}.mp4").write_bytes((videos / f"v{i}.mp4").read_bytes())
        items.append(VideoItem(i, f"r{i}", str(tmp_path / f"r{i}.mp4")))
    items += [VideoItem(3 + i, f"c{i}", str(_clip(tmp_path / f"c{i}.mp4", shift=i, amp=0.05))) for i in range(2)]
    crashing = FakeVisual(fail_on=3)                                # one call per video (batch >= 12 frames)
    with pytest.raises(BackboneCrash):
        _run(items, tmp_path / "out", visual_backbone=crashing, batch_frames=64, workers=2)
    assert sorted(p.name for p in (tmp_path / "out" / PARTS).glob("*.npz")) == ["000000.npz", "000001.npz"]
    assert not (tmp_path / "out" / "manifest.jsonl").exists()

    counting = FakeVisual()
    res = _run(items, tmp_path / "out", visual_backbone=counting, batch_frames=64, workers=2)
    assert counting.calls == 3 and res.processed == 3 and res.resumed == 2
    _run(items, tmp_path / "fresh", batch_frames=5)                  # batches spanning seconds give the same
    for name in ("audio_feature.h5", "visual_feature.h5", "visual_feature_vec.h5"):
        np.testing.assert_allclose(_h5(tmp_path / "out" / name), _h5(tmp_path / "fresh" / name), rtol=1e-6)
    assert read_manifest(tmp_path / "out") == read_manifest(tmp_path / "fresh")


def _annotations(folder: Path) -> Path:
    ann = folder / "Annotations.txt"
    ann.write_text("Category&VideoID&Quality&StartTime&EndTime\n"
                   "Church bell&aaa&good&0&2\n"
                   "Dog&bbb&good&1&3\n"
                   "Dog&aaa&good&2&3\n"
                   "Church bell&zzz&bad&0&1\n")
    return ann


def test_annotations_input_with_duplicate_id(tmp_path):
    vids = tmp_path / "AVE"
    _clip(vids / "aaa.mp4", shift=0)
    _clip(vids / "bbb.mkv", shift=1)                                 # any extension is found
    ann = _annotations(tmp_path)
    items, found = collect_videos([ann])                              # video_dir: the AVE folder next to it
    assert found == ann.resolve() and [it.video_id for it in items] == ["aaa", "bbb", "aaa", "zzz"]
    assert items[1].path.endswith("bbb.mkv") and items[3].path is None
    visual = FakeVisual()
    res = _run(items, tmp_path / "out", visual_backbone=visual, annotations=found, batch_frames=64)
    assert visual.calls == 2 and res.videos == 3 and res.rows == 4 and res.failed == 1
    store = open_store(tmp_path / "out")
    rows = store.read(np.arange(4))
    np.testing.assert_array_equal(rows["visual"][0], rows["visual"][2])
    np.testing.assert_array_equal(rows["audio"][0], rows["audio"][2])
    assert (tmp_path / "out" / "Annotations.txt").read_bytes() == ann.read_bytes()
    assert len(parse_annotations(tmp_path / "out" / "Annotations.txt")) == len(store)
    man = read_manifest(tmp_path / "out")
    assert man[3]["status"] == "failed" and "not found" in man[3]["error"]


def test_two_process_shards_merge_to_the_single_process_store(tmp_path):
    vids = tmp_path / "AVE"
    for i, vid in enumerate(("aaa", "bbb", "ccc", "ddd")):
        _clip(vids / f"{vid}.mp4", shift=i, amp=0.05 * (i + 1))
    ann = tmp_path / "Annotations.txt"
    ann.write_text("".join(f"Dog&{vid}&good&0&2\n" for vid in ("aaa", "bbb", "ccc", "aaa", "ddd", "eee")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    procs = [subprocess.Popen([sys.executable, "-c",
                               f"import _fake_backbones as f; f.run_shard([{str(ann)!r}], {str(tmp_path / 'out')!r}, {i}, 2)"],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for i in range(2):
        shard = tmp_path / "out" / f"shard-{i}-of-2"
        assert (shard / "manifest.jsonl").is_file()
        assert len(open_store(shard)) == len(parse_annotations(shard / "Annotations.txt"))
    merged = merge_shards(tmp_path / "out")
    assert merged.rows == 6 and merged.failed == 1

    items, found = collect_videos([ann])
    single = _run(items, tmp_path / "single", annotations=found)
    assert single.rows == 6
    for name in ("audio_feature.h5", "visual_feature.h5", "visual_feature_vec.h5"):
        np.testing.assert_array_equal(_h5(tmp_path / "out" / name), _h5(tmp_path / "single" / name))
    assert read_manifest(tmp_path / "out") == read_manifest(tmp_path / "single")
    assert (tmp_path / "out" / "Annotations.txt").read_text() == ann.read_text()
    assert open_store(tmp_path / "out").spec == open_store(tmp_path / "single").spec
    assert _run(items, tmp_path / "out", annotations=found).processed == 0    # the merged store counts as done


def test_list_file_paths_are_relative_to_the_list(videos, tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "videos.txt").write_text(f"# two clips and a missing one\n{os.path.relpath(videos / 'v2.mp4', sub)}\n\n"
                                    f"{videos / 'v0.mp4'}\nnope.mp4\n")
    items, ann = collect_videos([sub / "videos.txt"])
    assert ann is None and [it.video_id for it in items] == ["v2", "v0", "nope"] and [it.row for it in items] == [0, 1, 2]
    assert items[0].path == str((videos / "v2.mp4").resolve())
    res = _run(items, tmp_path / "out", fps=1)
    man = read_manifest(tmp_path / "out")
    assert res.failed == 1 and man[2]["status"] == "failed" and "nope.mp4" in man[2]["error"]
    with pytest.raises(DataError, match="no such file"):
        collect_videos([tmp_path / "absent"])


def test_shard_defaults_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert shard_from_env(None, None) == (4, 3)
    assert shard_from_env(2, 1) == (2, 1)
    with pytest.raises(ValueError):
        shard_from_env(2, 2)


def test_extract_video_any_length(videos):
    f = extract_video(videos / "v1.mp4", audio_backbone=FakeAudio(), visual_backbone=FakeVisual())
    assert f.seconds == 3 and f.audio.shape == (3, 2) and f.visual.shape == (3, 2, 2, 3) and f.flags == {}
    assert f.duration == pytest.approx(3.0, abs=0.05)
    longer = extract_video(videos / "v1.mp4", audio_backbone=FakeAudio(), visual_backbone=FakeVisual(), seconds=4,
                           frame_size=(8, 8))
    assert longer.visual.shape == (4, 2, 2, 3) and longer.flags["padded_video"] and longer.flags["padded_audio"]
    np.testing.assert_allclose(longer.visual[3], longer.visual[2], atol=0.02)   # last frame repeated
    assert longer.audio[3, 0] < 1e-3                                       # silence (AAC tail aside)


def _ring_clip(path: Path) -> Path:
    """1 s silence, the recorded ringtone (~1.46 s; a synthetic chirp when the sound package is absent), silence."""
    rate = 16000
    if SOUND.is_file():
        with av.open(str(SOUND)) as c:
            rs = av.AudioResampler(format="flt", layout="mono", rate=rate)
            sound = np.concatenate([f.to_ndarray().reshape(-1) for fr in c.decode(audio=0) for f in rs.resample(fr)])
    else:
        t = np.arange(int(1.4 * rate)) / rate
        sound = 0.4 * np.sin(2 * np.pi * (400 + 800 * t) * t)
    audio = np.zeros(4 * rate, np.float32)
    audio[rate:rate + len(sound)] = sound[: 3 * rate]
    return write_clip(path, color_frames(RGB + RGB[:1], 8, (48, 64)), 8, audio)


def test_recorded_sound_gives_distinct_audio_features(tmp_path):
    if not SOUND.is_file():
        pytest.skip("needs Debian package sound-theme-freedesktop (apt-get install sound-theme-freedesktop)")
    f = extract_video(_ring_clip(tmp_path / "ring.mp4"), audio_backbone=FakeAudio(), visual_backbone=FakeVisual())
    assert np.isfinite(f.audio).all() and f.audio[1, 0] > 0.05 and f.audio[0, 0] < 1e-3 and f.audio[3, 0] < 1e-3


def test_real_offline_defaults_through_the_cli(tmp_path, capsys):
    assert "efficientnet-lite0" in visual_backbones() and "logmel" in audio_backbones()
    vids = tmp_path / "vids"
    _ring_clip(vids / "ring.mp4")
    assert main(["extract", str(vids), "--out", str(tmp_path / "out"), "--seconds", "4", "--fps", "4",
                 "--workers", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "1 rows (1 videos)" in printed and "0 failed" in printed
    store = open_store(tmp_path / "out")
    assert store.spec.visual.backbone == "efficientnet-lite0" and store.spec.audio.backbone == "logmel"
    assert store.spec.visual.frames_per_segment == 4
    row = store.read([0])
    assert row["audio"].shape == (1, 4, 128) and row["visual"].shape == (1, 4, 7, 7, 1280)
    assert np.isfinite(row["audio"]).all() and np.isfinite(row["visual"]).all()
    audio = row["audio"][0]
    # the sound seconds differ from silence much more than silence differs from itself
    assert np.abs(audio[1] - audio[0]).mean() > 10 * np.abs(audio[3] - audio[0]).mean() + 1e-3
    vis = row["visual"][0].mean(axis=(1, 2))
    assert np.abs(vis[0] - vis[1]).mean() > 1e-3                      # red and green seconds differ
    np.testing.assert_allclose(vis[0], vis[3], rtol=1e-4, atol=1e-4)  # red again


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    """12 s of random 32x32 frames at 8 fps with a tone: every frame differs."""
    frames = np.random.default_rng(5).integers(0, 256, (96, 32, 32, 3), dtype=np.uint8)
    return write_clip(tmp_path_factory.mktemp("long") / "long.mp4", frames, 8, tone(12, amplitude=0.2))


@pytest.mark.parametrize("kw", [{}, {"seconds": 14}, {"seconds": 5}])
def test_chunked_extraction_is_identical_to_one_chunk(long_clip, kw):
    whole = extract_video(long_clip, audio_backbone=FakeAudio(), visual_backbone=FakeVisual(), fps=4,
                          batch_frames=6, chunk_seconds=None, **kw)
    for chunk in (1, 2, 5):
        f = extract_video(long_clip, audio_backbone=FakeAudio(), visual_backbone=FakeVisual(), fps=4,
                          batch_frames=6, chunk_seconds=chunk, **kw)
        np.testing.assert_array_equal(f.visual, whole.visual)
        np.testing.assert_array_equal(f.audio, whole.audio)
        assert f.flags == whole.flags and f.duration == whole.duration
    assert whole.seconds == kw.get("seconds", 12)


def test_chunked_extraction_bounds_the_frames_held(long_clip, monkeypatch):
    """Frame arrays alive (decoded and not yet released) at each backbone call stay within one chunk and one
    batch, instead of the whole video."""
    alive = [0]

    class CountingStream(extract_video_module.VideoStream):
        def __iter__(self):
            for s, frames, times in super().__iter__():
                alive[0] += 1
                weakref.finalize(frames, lambda: alive.__setitem__(0, alive[0] - 1))
                yield s, frames, times

    class PeakVisual(FakeVisual):
        peak = 0

        def __call__(self, frames):
            self.peak = max(self.peak, alive[0])
            return super().__call__(frames)

    monkeypatch.setattr(extract_video_module, "VideoStream", CountingStream)
    fps, batch = 4, 6
    peaks = {}
    for chunk in (None, 1, 3):
        visual = PeakVisual()
        f = extract_video(long_clip, audio_backbone=FakeAudio(), visual_backbone=visual, fps=fps,
                          batch_frames=batch, chunk_seconds=chunk)
        assert f.seconds == 12 and visual.frames_seen == 48
        peaks[chunk] = visual.peak                                    # seconds of frames alive
    assert peaks[None] == 12                                         # one chunk: the whole video
    assert peaks[1] <= 1 + -(-batch // fps) + 1
    assert peaks[3] <= 3 + -(-batch // fps) + 1
    # the store path streams too: a 12 s row through extract with 2 s chunks
    visual = PeakVisual()
    res = _run([str(long_clip)], long_clip.parent / "out", seconds=12, visual_backbone=visual, batch_frames=batch,
               chunk_seconds=2)
    assert res.failed == 0 and visual.frames_seen == 48 and visual.peak <= 2 * 2 + -(-batch // fps) + 1


def test_cli_visual_size_is_recorded_and_refused_where_fixed(tmp_path):
    """`avel extract --visual-size` reaches the backbone, lands in the spec, and a backbone with a
    fixed input size refuses it with a clear error instead of a traceback."""
    clip = tmp_path / "in" / "a.mp4"
    clip.parent.mkdir()
    write_clip(clip, color_frames([(200, 30, 30), (30, 200, 30)], 16, (48, 64)), 16, None)
    assert main(["extract", str(clip.parent), "--out", str(tmp_path / "out"), "--visual-size", "64",
                 "--seconds", "2", "--no-progress"]) == 0
    spec = json.loads((tmp_path / "out" / "features.json").read_text())["spec"]["visual"]
    assert spec["input_size"] == [64, 64] and spec["grid"] == [2, 2]
    with h5py.File(tmp_path / "out" / "visual_feature.h5") as f:
        assert f["avadataset"].shape == (1, 2, 2, 2, 1280)
    assert main(["extract", str(clip.parent), "--out", str(tmp_path / "vgg"), "--visual", "vgg19-pool5",
                 "--visual-weights", "random", "--visual-size", "64", "--no-progress"]) == 2


# ---------------------------------------------------------------------------------------------- streamed sound

class BlockAudio(FakeAudio):
    """FakeAudio that records the longest waveform it was handed."""

    longest = 0

    def __call__(self, waveform, seconds):
        self.longest = max(self.longest, len(waveform))
        return super().__call__(waveform, seconds)


@pytest.mark.parametrize("kw", [{}, {"seconds": 14}, {"seconds": 5}])
def test_streamed_sound_gives_the_whole_waveform_features(long_clip, monkeypatch, kw):
    """The audio backbone runs on blocks of AUDIO_BLOCK_SECONDS as the sound is decoded, never on the whole
    waveform, and the features equal those of one call on decode_video's whole waveform, bit for bit (the
    logmel backbone included), whatever the chunking."""
    from avel.features.backbones.logmel import LogMelBackbone
    from avel.features.decode import decode_video

    monkeypatch.setattr(extract_video_module, "AUDIO_BLOCK_SECONDS", 5)
    whole = decode_video(long_clip, fps=4, size=(8, 8), **kw)
    for backbone in (FakeAudio(), LogMelBackbone()):
        expect = backbone(whole.waveform, whole.seconds)
        for chunk in (None, 1, 3):
            audio = BlockAudio() if isinstance(backbone, FakeAudio) else backbone
            f = extract_video(long_clip, audio_backbone=audio, visual_backbone=FakeVisual(), fps=4, batch_frames=6,
                              chunk_seconds=chunk, frame_size=(8, 8), **kw)
            np.testing.assert_array_equal(f.audio, expect)
            if isinstance(audio, BlockAudio):
                assert audio.longest <= 5 * 16000
    assert whole.seconds == kw.get("seconds", 12)


# ---------------------------------------------------------------------------------------------- bad inputs

@pytest.fixture
def fake_cli_backbones(monkeypatch):
    """`avel extract` with the tiny fake backbones (the CLI's own backbones are tested above)."""
    monkeypatch.setattr("avel.cli.extract.build_backbones", lambda *a, **k: (FakeAudio(), FakeVisual()))


def _cli(inputs, out, *extra):
    return main(["extract", *map(str, inputs), "--out", str(out), "--seconds", "3", "--fps", "2", "--workers", "1",
                 "--no-progress", *extra])


def test_folder_gives_a_row_to_every_video_name(videos, tmp_path, fake_cli_backbones, capsys):
    """A folder named x.mp4, a broken link, a fifo (which must not hang) are rows that fail naming the file
    and saying why; the good clip is extracted; hidden names and other extensions are not videos; exit 1."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.mp4").write_bytes((videos / "v0.mp4").read_bytes())
    (d / "b_dir.mp4").mkdir()
    (d / "c_link.mp4").symlink_to(d / "gone.mp4")
    os.mkfifo(d / "d_pipe.mp4")
    (d / ".hidden.mp4").write_bytes(b"x")
    (d / "notes.txt").write_text("not a video\n")
    assert _cli([d], tmp_path / "out") == 1
    man = read_manifest(tmp_path / "out")
    assert [m["video_id"] for m in man] == ["a", "b_dir", "c_link", "d_pipe"]
    assert [m["status"] for m in man] == ["ok", "failed", "failed", "failed"]
    reasons = ["is a folder", "broken symbolic link", "not a regular file"]
    for m, reason in zip(man[1:], reasons):
        assert m["error"].startswith(f"{d / m['video_id']}.mp4: {reason}") and "\n" not in m["error"]
    assert man[2]["path"] == str(d / "c_link.mp4")                # the link, not its missing target
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("avel extract: failed: row ") for line in err)
    assert "Traceback" not in "".join(err)
    assert open_store(tmp_path / "out").read([0])["visual"].any()


def test_listed_inputs_each_get_a_row(videos, tmp_path, fake_cli_backbones, capsys):
    """Video paths on the command line and lines of a list: a broken link, a missing file or a folder is a
    failed row naming it, not the end of the run."""
    (tmp_path / "broken.mp4").symlink_to(tmp_path / "nowhere.mp4")
    (tmp_path / "folder.mkv").mkdir()
    args = [videos / "v0.mp4", tmp_path / "broken.mp4", tmp_path / "missing.mp4", videos / "v1.mp4"]
    assert _cli(args, tmp_path / "out") == 1
    man = read_manifest(tmp_path / "out")
    assert [m["status"] for m in man] == ["ok", "failed", "failed", "ok"]
    assert "broken.mp4: broken symbolic link" in man[1]["error"] and "missing.mp4: no such file" in man[2]["error"]
    capsys.readouterr()

    lst = tmp_path / "list.txt"
    lst.write_text(f"{videos / 'v2.mp4'}\nbroken.mp4\nfolder.mkv\n")
    assert _cli([lst], tmp_path / "out2") == 1
    man = read_manifest(tmp_path / "out2")
    assert [m["status"] for m in man] == ["ok", "failed", "failed"]
    assert "folder.mkv: is a folder" in man[2]["error"]
    assert len(capsys.readouterr().err.strip().splitlines()) == 2

    # an input that is no video, list or folder at all is still one clear error, before anything runs
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    assert _cli([blob], tmp_path / "out3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blob.bin: not a video" in err[0]


def test_annotations_row_names_the_folder_that_is_no_video(tmp_path):
    vids = tmp_path / "AVE"
    _clip(vids / "aaa.mp4")
    (vids / "bbb.mp4").mkdir()
    (tmp_path / "Annotations.txt").write_text("Dog&aaa&good&0&2\nDog&bbb&good&1&3\n")
    items, found = collect_videos([tmp_path / "Annotations.txt"])
    res = _run(items, tmp_path / "out", annotations=found)
    man = read_manifest(tmp_path / "out")
    assert res.failed == 1 and man[1]["status"] == "failed" and "bbb.mp4: is a folder" in man[1]["error"]


def test_second_extraction_into_the_same_out_is_refused(videos, tmp_path, fake_cli_backbones, capsys):
    from avel.io import FolderBusyError, FolderLock

    out = tmp_path / "out"
    with FolderLock(out):                                     # another live extraction holds the folder
        with pytest.raises(FolderBusyError, match=f"pid {os.getpid()}"):
            _run([str(videos / "v0.mp4")], out)
        assert _cli([videos / "v0.mp4"], out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {os.getpid()}" in err[0] and err[0].startswith("avel extract: error: ")
    assert _cli([videos / "v0.mp4"], out) == 0                # free again
    with FolderLock(out):
        with pytest.raises(FolderBusyError):
            merge_shards(out)


def test_stale_temporaries_are_removed_on_start(videos, tmp_path):
    """What a killed run left (a store file's temporary, a part's) goes when the next run starts; the run
    then completes as a fresh one would."""
    out = tmp_path / "out"
    items = [str(videos / "v0.mp4"), str(videos / "v1.mp4")]
    with pytest.raises(BackboneCrash):
        _run(items, out, visual_backbone=FakeVisual(fail_on=2))
    stale = [out / ".visual_feature.h5.k1ll3d.tmp", out / PARTS / ".000001.npz.k1ll3d.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 9_000_000)
    keep = out / "notes.tmp"                                   # not a temporary of ours
    keep.write_text("mine")
    res = _run(items, out)
    assert res.resumed == 1 and res.processed == 1
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"
    assert not list(out.rglob(".*.tmp"))
    _run(items, tmp_path / "fresh")
    for name in ("audio_feature.h5", "visual_feature.h5"):
        np.testing.assert_array_equal(_h5(out / name), _h5(tmp_path / "fresh" / name))


@pytest.mark.parametrize("where", ["part", "space", "h5", "manifest"])
def test_full_disk_is_one_line_and_a_rerun_completes(videos, tmp_path, monkeypatch, fake_cli_backbones, capsys,
                                                      where):
    """No space left while writing a part, for the h5 files (found before HDF5 writes: h5py crashes on a full
    disk), in them, or for the manifest: one line naming the file, exit 2,
    no temporaries, no store that looks finished (no manifest, no feature files of the failed finish);
    the finished parts are kept and the rerun completes to the store of an uninterrupted run."""
    import errno
    from collections import namedtuple

    from avel.features.extract import writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    inputs = [videos / "v0.mp4", videos / "v1.mp4", videos / "v2.mp4"]
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        if where == "part":
            calls = []
            real = np.savez

            def savez(f, **arrays):                            # the second part's write fails half-way
                calls.append(f)
                real(f, **arrays)
                if len(calls) == 2:
                    full()

            m.setattr(writer.np, "savez", savez)
        elif where == "space":
            m.setattr(writer.shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(1 << 30, 1 << 30, 4096))
        elif where == "h5":
            m.setattr(writer, "write_rows", full)
        else:
            real_atomic = writer.atomic_write
            m.setattr(writer, "atomic_write",
                      lambda path, data: full() if Path(path).name == "manifest.jsonl" else real_atomic(path, data))
        assert _cli(inputs, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("avel extract: error: ") and "No space left on device" in err[0]
    assert str(out) in err[0] and "Traceback" not in err[0]
    assert not (out / "manifest.jsonl").exists() and not list(out.rglob(".*.tmp"))
    assert not list(out.glob("*.h5")) and not (out / "features.json").exists()
    assert len(list((out / PARTS).glob("*.npz"))) == (1 if where == "part" else 3)

    assert _cli(inputs, out) == 0
    assert _cli(inputs, tmp_path / "fresh") == 0
    for name in ("audio_feature.h5", "visual_feature.h5", "visual_feature_vec.h5"):
        np.testing.assert_array_equal(_h5(out / name), _h5(tmp_path / "fresh" / name))
    assert read_manifest(out) == read_manifest(tmp_path / "fresh")
