"""One video through the backbones, streaming: decoded a chunk of seconds at a time (frames and sound),
each chunk run through the backbones before the next is decoded, so memory does not grow with the
video: only the per-second features are kept.

The visual backbone always sees batches of ``batch_frames`` consecutive frames counted from the first
frame (:class:`_VisualSums`), the audio backbone blocks of ``AUDIO_BLOCK_SECONDS`` seconds of waveform
counted from the start (:class:`_AudioSeconds`), so the features are the same bit for bit however the
video is chunked. :class:`Prefetch` decodes one video in a pool thread ahead of the CNN (what the job
runner uses).
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..decode import DecodedVideo, VideoStream


@dataclass
class VideoFeatures:
    audio: np.ndarray      # float32 [T, Da]
    visual: np.ndarray     # float32 [T, gh, gw, Dv] ([T, Dv] for vector backbones)
    flags: dict            # decode flags (see avel.features.decode), only those set
    duration: float        # of the file, seconds

    @property
    def seconds(self) -> int:
        return int(self.audio.shape[0])


def frame_size_for(visual_backbone, frame_size):
    """'auto': the backbone's ``input_size`` (height, width) or square ``image_size``, else the source size."""
    if isinstance(frame_size, str):
        if frame_size != "auto":
            raise ValueError(f"frame_size must be 'auto', None or (height, width), not {frame_size!r}")
        size = getattr(visual_backbone, "input_size", None) or getattr(visual_backbone, "image_size", None)
        return (size, size) if isinstance(size, int) else size
    return frame_size


def sample_rate_for(audio_backbone) -> int:
    return int(getattr(getattr(audio_backbone, "spec", None), "sample_rate", 0) or 16000)


DEFAULT_CHUNK_SECONDS = 30   # seconds of frames decoded ahead of the visual backbone (memory bound, not results)
AUDIO_BLOCK_SECONDS = 30     # seconds of waveform per audio backbone call (fixed: the features never depend on
                             # the chunking; an AVE clip of 10 s is one call on its whole waveform)


class Chunk(NamedTuple):
    """A piece of one video as decoded: its per-second frame arrays and the samples decoded meanwhile."""

    frames: list[np.ndarray]
    audio: np.ndarray
    seconds: int | None = None     # T of the video when already known (the features are then allocated once)


class _VisualSums:
    """Per-second sums of the visual backbone's outputs over frames fed in order, in pieces of any size.

    The backbone always runs on batches of ``batch_frames`` consecutive frames counted from the first
    frame of the video (the last batch shorter), whatever pieces the frames arrive in, so the features
    are the same bit for bit however the video is chunked. Holds at most ``batch_frames - 1`` frames
    between calls of :meth:`add` (views of the pieces fed).
    """

    def __init__(self, backbone, fps: int, batch_frames: int):
        self.backbone, self.fps, self.batch = backbone, int(fps), max(1, int(batch_frames))
        self.pieces: deque[np.ndarray] = deque()
        self.held = 0         # frames in ``pieces``
        self.done = 0         # frames run through the backbone
        self.sums: list[np.ndarray | None] = []    # float64 sums of the seconds not finished yet (None: finished)
        self.expected: int | None = None           # T, when known before the end (see expect())
        self.out: np.ndarray | None = None         # float32 [T, ...] features of the finished seconds...
        self.overflow: list[np.ndarray] = []       # ...and of those past ``out`` (or all when T is not known)
        self.finished = 0

    def expect(self, seconds: int | None) -> None:
        """The video has ``seconds`` seconds: its features are allocated once, as one array (no per-second
        arrays left scattered over the heap, which keeps the process's memory from growing with T)."""
        if seconds is not None and self.expected is None and self.finished == 0:
            self.expected = int(seconds)

    def add(self, *pieces: np.ndarray) -> None:
        for frames in pieces:
            if len(frames):
                self.pieces.append(frames)
                self.held += len(frames)
            while self.held >= self.batch:
                self._run(self._take(self.batch))

    def finish(self, seconds: int) -> np.ndarray:
        if self.held:
            self._run(self._take(self.held))
        if len(self.sums) != seconds or self.done != seconds * self.fps:
            raise RuntimeError(f"visual features of {len(self.sums)} s ({self.done} frames) for a {seconds} s video")
        self._finish_seconds()
        kept = 0 if self.out is None else min(self.finished, len(self.out))
        if not self.overflow and kept == seconds and len(self.out) == seconds:
            out = self.out
        else:
            out = np.concatenate([*([self.out[:kept]] if kept else []), *(m[None] for m in self.overflow)])
        self.out, self.overflow = None, []
        return out

    def _finish_seconds(self) -> None:
        """Seconds whose frames have all been run: float64 sum -> float32 mean (as ``(sums / fps)`` of the
        whole stack would give, element for element), so only float32 per-second features are kept."""
        while self.finished < len(self.sums) and self.done >= (self.finished + 1) * self.fps:
            s = self.finished
            mean = (self.sums[s] / self.fps).astype(np.float32)
            self.sums[s] = None
            if self.out is None and self.expected:
                self.out = np.empty((self.expected, *mean.shape), np.float32)
            if self.out is not None and s < len(self.out):
                self.out[s] = mean
            else:
                self.overflow.append(mean)
            self.finished += 1

    def _take(self, n: int) -> np.ndarray:
        first = self.pieces[0]
        if len(first) >= n:                      # a view: no copy when a piece holds the whole batch
            batch = first[:n]
            if len(first) > n:
                self.pieces[0] = first[n:]
            else:
                self.pieces.popleft()
        else:
            parts, need = [], n
            while need:
                p = self.pieces[0]
                if len(p) <= need:
                    parts.append(self.pieces.popleft())
                    need -= len(p)
                else:
                    parts.append(p[:need])
                    self.pieces[0] = p[need:]
                    need = 0
            batch = np.concatenate(parts)
        self.held -= n
        return batch

    def _run(self, batch: np.ndarray) -> None:
        out = self.backbone(batch)
        out = out.detach().to("cpu", torch.float32).numpy() if isinstance(out, torch.Tensor) \
            else np.asarray(out, dtype=np.float32)
        sec = (self.done + np.arange(len(out))) // self.fps
        for s in np.unique(sec):
            while len(self.sums) <= s:
                self.sums.append(np.zeros(out.shape[1:], np.float64))
            self.sums[s] += out[sec == s].sum(0, dtype=np.float64)
        self.done += len(batch)
        self._finish_seconds()


class _AudioSeconds:
    """Per-second audio features of a waveform fed in order, in pieces of any size.

    The backbone runs on blocks of ``block_seconds`` seconds of samples counted from the start (the last
    block shorter, zero-padded as the whole-waveform call pads), so the features do not depend on the
    pieces; at most one block of samples is held.
    """

    def __init__(self, backbone, sample_rate: int, block_seconds: int | None = None):
        block = AUDIO_BLOCK_SECONDS if block_seconds is None else block_seconds
        self.backbone, self.rate, self.block = backbone, int(sample_rate), max(1, int(block))
        self.pieces: list[np.ndarray] = []
        self.held = 0           # samples in ``pieces``
        self.done = 0           # seconds run through the backbone
        self.outputs: list[np.ndarray] = []

    def add(self, samples: np.ndarray) -> None:
        if len(samples):
            self.pieces.append(samples)
            self.held += len(samples)
        while self.held >= self.block * self.rate:
            self._run(self._take(self.block * self.rate), self.block)

    def finish(self, seconds: int) -> np.ndarray:
        """The [seconds, dim] features: what is held runs (cut or zero-padded to ``seconds``)."""
        while self.done < seconds:
            n = min(self.block, seconds - self.done)
            got = self._take(min(self.held, n * self.rate))
            if len(got) < n * self.rate:
                got = np.concatenate([got, np.zeros(n * self.rate - len(got), np.float32)])
            self._run(got, n)
        self.pieces.clear()
        self.held = 0
        out = np.concatenate(self.outputs) if len(self.outputs) > 1 else self.outputs[0]
        self.outputs.clear()
        return out[:seconds]     # (a block past T: only when the sound outlasts an unknown length by a block)

    def _take(self, n: int) -> np.ndarray:
        if not n:
            return np.zeros(0, np.float32)
        whole = np.concatenate(self.pieces) if len(self.pieces) > 1 else self.pieces[0]
        self.pieces = [whole[n:]] if len(whole) > n else []
        self.held -= min(n, len(whole))
        return whole[:n]

    def _run(self, waveform: np.ndarray, seconds: int) -> None:
        out = self.backbone(waveform, seconds)
        out = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        out = out.astype(np.float32, copy=False)
        if out.ndim != 2 or out.shape[0] != seconds:
            raise ValueError(f"audio backbone returned shape {out.shape}, expected [{seconds}, dim]")
        self.outputs.append(out)
        self.done += seconds


def _video_features(visual: np.ndarray, audio: np.ndarray, flags: dict, duration: float) -> VideoFeatures:
    if not (np.isfinite(audio).all() and np.isfinite(visual).all()):
        flags["nonfinite"] = True
    return VideoFeatures(audio, visual, flags, duration)


def features_of(decoded: DecodedVideo, *, audio_backbone, visual_backbone, batch_frames: int = 64) -> VideoFeatures:
    """Run the backbones on a decoded video: per-second means of the frame maps, audio per second."""
    T, fps = decoded.seconds, decoded.fps
    sums = _VisualSums(visual_backbone, fps, batch_frames)
    sound = _AudioSeconds(audio_backbone, decoded.sample_rate)
    sums.expect(T)
    with torch.inference_mode():
        sums.add(decoded.frames)
        visual = sums.finish(T)
        sound.add(decoded.waveform)
        return _video_features(visual, sound.finish(T), decoded.active_flags(), decoded.duration)


def _chunks(stream: VideoStream, chunk_seconds: int | None) -> Iterator[Chunk]:
    """``stream`` in :class:`Chunk` s of ``chunk_seconds`` seconds of frames (None: one chunk), each with the
    samples decoded meanwhile (the rest of the waveform is ``stream.waveform`` once it is exhausted)."""
    step = None if chunk_seconds is None else int(chunk_seconds)
    if step is not None and step < 1:
        raise ValueError(f"chunk_seconds must be >= 1 or None, got {chunk_seconds}")
    chunk: list[np.ndarray] = []
    for _, frames, _ in stream:
        chunk.append(frames)
        del frames
        if step is not None and len(chunk) >= step:
            yield Chunk(chunk, stream.take_audio(), stream.seconds)
            chunk = []
    if chunk:
        yield Chunk(chunk, stream.take_audio(), stream.seconds)


def stream_features(chunks: Iterable[Chunk], source, *, audio_backbone, visual_backbone, fps: int,
                     batch_frames: int) -> VideoFeatures:
    """Features from the chunks of one video; ``source.stream`` (or ``source``) is its finished VideoStream.

    Holds the per-second features, about one chunk of frames and one block of samples: never the whole
    video or its whole waveform."""
    sums = _VisualSums(visual_backbone, fps, batch_frames)
    sound = _AudioSeconds(audio_backbone, sample_rate_for(audio_backbone))
    with torch.inference_mode():
        for chunk in chunks:
            sums.expect(chunk.seconds)
            sums.add(*chunk.frames)
            sound.add(chunk.audio)
            del chunk
        stream = getattr(source, "stream", source)
        visual = sums.finish(stream.seconds)
        sound.add(stream.waveform)
        stream.waveform = None        # taken: the stream holds no sound after this
        return _video_features(visual, sound.finish(stream.seconds), stream.active_flags(), stream.duration)


def extract_video(path: str | Path, *, audio_backbone, visual_backbone, seconds: int | None = None, fps: int = 16,
                  batch_frames: int = 64, frame_size="auto",
                  chunk_seconds: int | None = DEFAULT_CHUNK_SECONDS) -> VideoFeatures:
    """Features of one video of any length (``seconds`` None: its whole seconds). Raises
    :class:`~avel.features.decode.VideoDecodeError` when the file cannot be decoded.

    ``frame_size``: 'auto' resizes frames while decoding (swscale bilinear, aspect not kept) to the visual
    backbone's ``input_size`` (height, width) or ``image_size`` (square) when it has one, so the backbone's
    own resize is a no-op and decoded clips stay small; None keeps the source size (the backbone resizes);
    or an explicit (height, width).

    The video is decoded in one streaming pass, ``chunk_seconds`` seconds of frames at a time, each chunk
    run through the visual backbone before the next is decoded: at most about ``chunk_seconds * fps +
    batch_frames`` frames are held, however long the video (None: all frames at once). The sound streams
    alongside: the audio backbone runs on blocks of ``AUDIO_BLOCK_SECONDS`` seconds as the samples come,
    so neither the waveform nor the frames are held whole; only the per-second features grow with the
    video. The features do not depend on ``chunk_seconds`` (the backbone batches are the same).
    """
    with VideoStream(path, fps=fps, seconds=seconds, sample_rate=sample_rate_for(audio_backbone),
                     size=frame_size_for(visual_backbone, frame_size)) as stream:
        return stream_features(_chunks(stream, chunk_seconds), stream, audio_backbone=audio_backbone,
                                visual_backbone=visual_backbone, fps=stream.fps, batch_frames=batch_frames)


class DecodeFailure(Exception):
    """Decoding (not the backbones) failed: ``error`` is the original exception."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class Prefetch:
    """One video decoded ahead of the CNN: :meth:`run` (in a pool thread) puts its chunks in a bounded queue
    that :meth:`chunks` (the calling thread) takes from; without a pool, :meth:`chunks` decodes inline.
    Decoding errors come out of :meth:`chunks` as :class:`DecodeFailure`; ``stream`` is the finished
    VideoStream once the chunks are exhausted."""

    def __init__(self, open_stream, chunk_seconds: int | None, threaded: bool, depth: int = 1):
        self._open = open_stream
        self._chunk_seconds = chunk_seconds
        self._threaded = threaded
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.stream: VideoStream | None = None

    def run(self) -> None:
        try:
            with self._open() as stream:
                for chunk in _chunks(stream, self._chunk_seconds):
                    if not self._put(("chunk", chunk)):
                        return
                    del chunk
            self._put(("end", stream))
        except BaseException as e:  # noqa: BLE001 - passed on to the consumer
            self._put(("error", e))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def cancel(self) -> None:
        self._stop.set()

    def chunks(self) -> Iterator[Chunk]:
        if not self._threaded:
            yield from self._inline()
            return
        while True:
            kind, value = self._q.get()
            if kind == "chunk":
                yield value
                del value
            elif kind == "end":
                self.stream = value
                return
            elif isinstance(value, Exception):
                raise DecodeFailure(value)
            else:
                raise value

    def _inline(self) -> Iterator[Chunk]:
        try:
            stream = self._open()
        except Exception as e:  # noqa: BLE001
            raise DecodeFailure(e) from e
        with stream:
            it = _chunks(stream, self._chunk_seconds)
            while True:
                try:
                    chunk = next(it)
                except StopIteration:
                    break
                except Exception as e:  # noqa: BLE001
                    raise DecodeFailure(e) from e
                yield chunk
                del chunk
        self.stream = stream
