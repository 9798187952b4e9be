"""Decode a video file with PyAV into what the backbones eat: frames at ``fps`` and a 16 kHz mono waveform.

Sampling rule (documented contract)
-----------------------------------
Second ``s`` of the clip is represented by ``fps`` frames sampled at the centres of its ``fps`` equal
intervals, ``t = s + (k + 0.5) / fps`` for ``k = 0 .. fps-1`` (AVE sampled 16 frames uniformly per
second). For every sample time the decoder keeps the *last decoded frame whose presentation time is
<= t* (times from each frame's pts, so variable-frame-rate files are handled; the frame index is never
used). Sample times before the first frame take the first frame. Times are measured from the
container's start time (the FFmpeg convention, so MPEG-TS files with large pts offsets start at 0).
Centres rather than ``s + k / fps`` avoid the ambiguity of a frame lying exactly on a boundary.

Length
------
``T`` = ``seconds`` when given, else the container duration in whole seconds (floor, at least 1).
Video shorter than ``T``: the last frame is repeated (flag ``padded_video``). Audio shorter than
``T``: zeros (``padded_audio``); no audio stream: zeros (``no_audio``); no video stream or no decodable
frame: black frames (``no_video``). Longer files are cut at ``T`` (``truncated``) and decoding stops
there: nothing after ``T`` is decoded.

Robustness
----------
A packet whose decoding raises an FFmpeg error is skipped and counted (``corrupt_packets``); a demuxer
error ends the file (what was decoded so far is kept, also counted). A file that cannot be opened, or
holds neither audio nor video, raises :class:`VideoDecodeError` naming the file and the reason.

Efficiency
----------
Frames stream through the decoder; only sampled frames are converted to RGB (each source frame at most
once, even when it fills several sample times, as when the source rate is below ``fps``), resized in
the same swscale call when ``size`` is given. Video packets after ``T`` are not decoded.
:class:`VideoStream` yields the frames second by second in the same single pass over the container (no
seeking), so a consumer that does not keep them (``extract_video``) holds about one second of frames
however long the video; :func:`decode_video` gathers them all. The waveform streams too: a consumer
that calls :meth:`VideoStream.take_audio` as it goes gets the samples decoded so far (final: later
packets never change them), so neither the frames nor the sound of a long clip are held whole.
"""
from __future__ import annotations

import logging
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_FPS = 16
DEFAULT_SAMPLE_RATE = 16000
NO_VIDEO_SIZE = (224, 224)   # black frames for files without video when no ``size`` is asked for
DURATION_TOLERANCE = 1e-3    # seconds: 2.9995 s counts as 3 whole seconds
AUDIO_TOLERANCE = 0.02       # seconds of missing audio tolerated before flagging ``padded_audio``

_FFMPEG_ERRORS: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(av, "FFmpegError", None), getattr(getattr(av, "error", None), "FFmpegError", None)) if e
) or (Exception,)


class VideoDecodeError(RuntimeError):
    """The file cannot be decoded at all; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be a video file (a missing file, a broken link, a folder, a fifo, socket or
    device: opening a fifo would wait forever), or None for a regular file (readable or not)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        if p.is_symlink():
            try:
                target = os.readlink(p)
            except OSError:
                target = "?"
            return f"broken symbolic link (to {target})"
        return "no such file"
    except OSError as e:
        return f"cannot read ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a video file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a fifo, socket or device), not a video file"
    return None


@dataclass
class DecodedVideo:
    path: str
    frames: np.ndarray            # uint8 [T * fps, H, W, 3] RGB
    waveform: np.ndarray          # float32 [T * sample_rate] mono
    seconds: int                  # T
    fps: int
    sample_rate: int
    duration: float               # of the file in seconds (container duration, else what was decoded)
    frame_times: np.ndarray       # float64 [T * fps]: pts (s, from the start) of the frame chosen per sample; NaN = black
    flags: dict = field(default_factory=dict)   # padded_video, padded_audio, no_audio, no_video, truncated: bool;
                                                # corrupt_packets: int; padded_frames: int

    @property
    def sample_times(self) -> np.ndarray:
        return sample_times(self.seconds, self.fps)

    def active_flags(self) -> dict:
        """Only the flags that are set (for manifests)."""
        return {k: v for k, v in self.flags.items() if v}


def sample_times(seconds: int, fps: int) -> np.ndarray:
    """The sample times of the rule above: ``(k + 0.5) / fps`` for ``k < seconds * fps``."""
    return (np.arange(int(seconds) * int(fps), dtype=np.float64) + 0.5) / fps


def _norm_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive (height, width), got {size}")
    return (h, w)


def _container_duration(container) -> float | None:
    if container.duration is not None and container.duration > 0:
        return container.duration / 1e6   # AV_TIME_BASE
    best = None
    for s in container.streams:
        if s.duration is not None and s.time_base is not None:
            d = float(s.duration * s.time_base)
            best = d if best is None else max(best, d)
    return best


def decode_video(path: str | Path, *, fps: int = DEFAULT_FPS, seconds: int | None = None,
                 sample_rate: int = DEFAULT_SAMPLE_RATE, size: int | tuple[int, int] | None = None,
                 video: bool = True, audio: bool = True, threads: int = 0) -> DecodedVideo:
    """Decode ``path``: frames at ``fps`` per second (the sampling rule above) and a mono waveform.

    ``size``: (height, width) (or one int for a square) to resize frames while decoding, aspect ratio
    not kept (as AVE's 224x224); None keeps the source size. ``video``/``audio`` False skip a stream
    (its output is then black/silent without a flag). ``threads``: FFmpeg decoder threads (0 = auto).
    All frames are held in memory (``T * fps`` of them); :class:`VideoStream` gives them second by second.
    """
    with VideoStream(path, fps=fps, seconds=seconds, sample_rate=sample_rate, size=size, video=video,
                     audio=audio, threads=threads) as vs:
        frames, times = [], []
        for _, f, t in vs:
            frames.append(f)
            times.append(t)
    frames = np.concatenate(frames) if len(frames) > 1 else frames[0]
    frame_times = np.concatenate(times) if len(times) > 1 else times[0]
    return DecodedVideo(str(vs.path), frames, vs.waveform, vs.seconds, vs.fps, vs.sample_rate, vs.duration,
                        frame_times, vs.flags)


class VideoStream:
    """One streaming pass over a video, second by second, with the rules of :func:`decode_video`.

    Iterating yields ``(s, frames, frame_times)`` for ``s = 0 .. T-1`` in order: ``frames`` uint8
    [fps, H, W, 3] and ``frame_times`` float64 [fps], exactly the rows ``s * fps .. (s+1) * fps - 1`` of
    :func:`decode_video`'s arrays. A second is yielded as soon as the demuxer has passed it, so only
    about one second of frames is held (plus the waveform decoded so far, unless :meth:`take_audio`
    takes it as the iteration goes). Once the iteration is over (from the end of the demuxing on,
    before the last seconds are yielded), ``seconds`` (T), ``waveform``, ``duration`` and ``flags`` are
    set as in :class:`DecodedVideo` (``seconds`` is known from the start when given or when the
    container has a duration; else seconds are yielded only once the content decoded so far proves them
    < T). ``waveform`` is then the part of the ``T * sample_rate`` samples not taken by
    :meth:`take_audio` (the whole waveform when nothing was taken), zero-padded to the end.

    Opening raises :class:`VideoDecodeError` as :func:`decode_video` does; use it as a context manager
    (or call :meth:`close`) so that a pass abandoned early closes the file. One pass only.
    """

    def __init__(self, path: str | Path, *, fps: int = DEFAULT_FPS, seconds: int | None = None,
                 sample_rate: int = DEFAULT_SAMPLE_RATE, size: int | tuple[int, int] | None = None,
                 video: bool = True, audio: bool = True, threads: int = 0):
        self.path = Path(path)
        self.fps = int(fps)
        if self.fps < 1:
            raise ValueError(f"fps must be >= 1, got {fps}")
        self.size = _norm_size(size)
        self.sample_rate = sample_rate
        self.seconds: int | None = None
        self.waveform: np.ndarray | None = None
        self.duration: float | None = None
        self.flags: dict | None = None
        self.audio_taken = 0                       # samples handed out by take_audio()
        self._audio: list[np.ndarray] = []         # decoded samples not taken yet, in order
        self._audio_limit: int | None = None       # T * sample_rate, once T is known
        problem = file_problem(self.path)
        if problem is not None:
            raise VideoDecodeError(self.path, problem)
        try:
            self._container = av.open(str(self.path), mode="r")
        except _FFMPEG_ERRORS + (OSError, ValueError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise VideoDecodeError(self.path, f"cannot open ({type(e).__name__}: {reason})") from None
        self._gen = _stream(self._container, self.path, self.fps, seconds, sample_rate, self.size, video, audio,
                            threads, self)

    def __iter__(self):
        return self._gen

    def close(self) -> None:
        self._gen.close()
        self._container.close()

    def __enter__(self) -> VideoStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def active_flags(self) -> dict:
        return {k: v for k, v in (self.flags or {}).items() if v}

    def take_audio(self) -> np.ndarray:
        """The mono float32 samples decoded since the last call (from sample ``audio_taken`` on), never
        past ``T * sample_rate`` when T is known; call it between seconds of the iteration (from the
        thread that iterates). What it returns is final: later packets only add samples after it."""
        pieces = self._audio
        if not pieces:
            return np.zeros(0, np.float32)
        a = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        pieces.clear()
        if self._audio_limit is not None:
            a = a[:max(0, self._audio_limit - self.audio_taken)]
        self.audio_taken += len(a)
        return a


def _stream(container, path, fps, seconds, sample_rate, size, want_video, want_audio, threads, out):
    vstream = container.streams.video[0] if container.streams.video else None
    astream = container.streams.audio[0] if container.streams.audio else None
    if vstream is None and astream is None:
        raise VideoDecodeError(path, "no audio or video stream")
    duration = _container_duration(container)
    origin = container.start_time / 1e6 if container.start_time is not None else 0.0

    if seconds is not None:
        T = int(seconds)
        if T < 1:
            raise ValueError(f"seconds must be >= 1, got {seconds}")
    elif duration is not None:
        T = max(1, int(math.floor(duration + DURATION_TOLERANCE)))
    else:
        T = None   # unknown until decoded
    out.seconds = T
    n_samples = None if T is None else T * fps
    audio_needed = None if T is None else T * sample_rate
    out._audio_limit = audio_needed

    decode_v = want_video and vstream is not None
    decode_a = want_audio and astream is not None
    streams = []
    if decode_v:
        vstream.thread_type = "AUTO"
        vstream.thread_count = int(threads)
        streams.append(vstream)
    if decode_a:
        streams.append(astream)
    if not streams:
        raise VideoDecodeError(path, "none of the requested streams is present")

    corrupt = 0
    # --- video selection state: samples taken and not yet yielded (``pending``: RGB arrays, the same array
    # repeated when one frame fills several sample times), ``taken`` samples in all, ``emitted`` seconds yielded
    pending: list[np.ndarray] = []
    pending_t: list[float] = []
    taken = 0
    emitted = 0
    cur_frame = None            # last decoded frame (pts <= next sample time)
    cur_t = None
    last_dt = 1.0 / fps         # duration of the last frame (for ``padded_video``)
    video_done = not decode_v
    video_end = None            # end time of the last decoded frame
    # --- audio state
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate) if decode_a else None
    chunks = out._audio           # decoded samples not taken yet (VideoStream.take_audio takes them)
    gap_tolerance = int(AUDIO_TOLERANCE * sample_rate)
    audio_have = 0
    audio_done = not decode_a

    converted = [None, None]    # (frame, RGB array) of the last conversion: each frame converted once

    def to_rgb(frame):
        if converted[0] is not frame:
            if size is None:
                arr = frame.to_ndarray(format="rgb24")
            else:
                arr = frame.reformat(width=size[1], height=size[0], format="rgb24").to_ndarray()
            converted[:] = [frame, arr]
        return converted[1]

    def take(frame, t):
        nonlocal taken
        pending.append(to_rgb(frame))
        pending_t.append(t)
        taken += 1

    def on_video(frame):
        nonlocal cur_frame, cur_t, last_dt, video_done, video_end
        t = frame.time
        if t is None:
            t = (cur_t + last_dt) if cur_t is not None else 0.0
        else:
            t -= origin
        if cur_t is not None and t < cur_t:
            return   # out-of-order frame from a damaged stream: keep the monotone timeline
        if cur_t is not None and t > cur_t:
            last_dt = t - cur_t
        k = taken
        while (n_samples is None or k < n_samples) and (k + 0.5) / fps < t:
            take(cur_frame if cur_frame is not None else frame, cur_t if cur_frame is not None else t)
            k += 1
        cur_frame, cur_t = frame, t
        video_end = t + last_dt
        if n_samples is not None and k >= n_samples:
            video_done = True

    def on_audio_frames(frames):
        nonlocal audio_have, audio_done
        for f in frames:
            a = f.to_ndarray().reshape(-1).astype(np.float32, copy=False)
            # Place samples by timestamp: silence before a late start or across a gap (lost packets),
            # overlapping samples dropped, so the audio stays aligned with the frames.
            if f.time is not None:
                pos = int(round((f.time - origin) * sample_rate))
                if pos - audio_have > gap_tolerance or (audio_have == 0 and pos > 0):
                    chunks.append(np.zeros(pos - audio_have, np.float32))
                    audio_have = pos
                elif audio_have - pos > gap_tolerance or pos < 0:
                    a = a[audio_have - pos:]
            chunks.append(a)
            audio_have += len(a)
        if audio_needed is not None and audio_have >= audio_needed:
            audio_done = True

    def certain_seconds() -> int:
        """Complete seconds that are surely < T: with T unknown, T >= floor(the content seen so far)."""
        complete = taken // fps
        if T is not None:
            return complete
        seen = max(cur_t if cur_t is not None else 0.0, audio_have / sample_rate)
        return min(complete, int(math.floor(seen + DURATION_TOLERANCE)))

    def emit(upto):
        nonlocal emitted
        while emitted < upto:
            frames = np.stack(pending[:fps])
            times = np.asarray(pending_t[:fps], dtype=np.float64)
            del pending[:fps], pending_t[:fps]
            emitted += 1
            yield emitted - 1, frames, times

    demux = container.demux(*streams)
    while not (video_done and audio_done):
        try:
            packet = next(demux)
        except StopIteration:
            break
        except _FFMPEG_ERRORS as e:   # a demuxer error ends the generator: keep what was decoded
            corrupt += 1
            log.warning("%s: demuxer error, keeping what was decoded (%s)", path, e)
            break
        is_video = decode_v and packet.stream.index == vstream.index
        if (is_video and video_done) or (not is_video and audio_done):
            continue
        try:
            decoded = packet.decode()
        except _FFMPEG_ERRORS as e:
            corrupt += 1
            log.debug("%s: skipping a corrupt %s packet (%s)", path, packet.stream.type, e)
            continue
        if is_video:
            for frame in decoded:
                on_video(frame)
                if video_done:
                    break
            del decoded
            if taken >= (emitted + 1) * fps:
                yield from emit(certain_seconds())
        else:
            try:
                on_audio_frames([r for f in decoded for r in resampler.resample(f)])
            except _FFMPEG_ERRORS as e:
                corrupt += 1
                log.debug("%s: skipping undecodable audio (%s)", path, e)
            if T is None and taken >= (emitted + 1) * fps:
                yield from emit(certain_seconds())
    if decode_a and not audio_done:
        try:
            on_audio_frames(resampler.resample(None))
        except _FFMPEG_ERRORS:
            pass

    # --- the length, once everything available was decoded
    audio_len = audio_have / sample_rate
    if T is None:
        content = max(video_end or 0.0, audio_len)
        duration = content
        T = max(1, int(math.floor(content + DURATION_TOLERANCE)))
        n_samples, audio_needed = T * fps, T * sample_rate
        out._audio_limit = audio_needed
    if duration is None:
        duration = max(video_end or 0.0, audio_len)
    flags = {"padded_video": False, "padded_audio": False, "no_audio": False, "no_video": False,
             "truncated": duration > T + DURATION_TOLERANCE + 1.0 / fps, "corrupt_packets": corrupt,
             "padded_frames": 0}

    # --- frames: the rest of the sample times take the last frame; past its end, that is padding
    times = sample_times(T, fps)
    if cur_frame is None:
        h, w = size or ((vstream.height, vstream.width) if vstream is not None and vstream.height else NO_VIDEO_SIZE)
        flags["no_video"] = want_video
    else:
        keep = n_samples - emitted * fps   # emitted <= T always (certain_seconds)
        del pending[keep:], pending_t[keep:]
        while len(pending) < keep:
            take(cur_frame, cur_t)
        padded = int(np.sum(times >= video_end + 1e-9))
        flags["padded_frames"] = padded
        flags["padded_video"] = padded > 0

    # --- waveform
    # (the samples from ``out.audio_taken`` on: what take_audio() has not handed out; all when never called)
    rest = max(0, audio_needed - out.audio_taken)
    if decode_a:
        if audio_have == 0:          # every sample placed, gaps and leading silence included
            flags["no_audio"] = True
        elif audio_have < audio_needed - AUDIO_TOLERANCE * sample_rate:
            flags["padded_audio"] = True
        wave = out.take_audio()
        out.audio_taken -= len(wave)  # the waveform below is not "taken"
        if len(wave) == rest:
            waveform = wave
        else:
            waveform = np.zeros(rest, np.float32)
            waveform[:len(wave)] = wave
        del wave
    else:
        waveform = np.zeros(rest, np.float32)
        flags["no_audio"] = want_audio
    out.seconds, out.waveform, out.duration, out.flags = T, waveform, float(duration), flags

    # --- the seconds not yielded yet
    if cur_frame is None:
        for s in range(emitted, T):
            yield s, np.zeros((fps, h, w, 3), np.uint8), np.full(fps, np.nan)
    else:
        yield from emit(T)
