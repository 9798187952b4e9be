"""One video through the backbones, streaming: decoded a chunk of seconds at a time, each chunk run
through the visual backbone before the next is decoded, so memory does not grow with the video.

The visual backbone always sees batches of ``batch_frames`` consecutive frames counted from the first
frame (:class:`_VisualSums`), so the features are the same bit for bit however the video is chunked.
:class:`Prefetch` decodes one video in a pool thread ahead of the CNN (what the job runner uses).
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
        self.sums: list[np.ndarray] = []

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
        return (np.stack(self.sums) / self.fps).astype(np.float32)

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


def _video_features(visual: np.ndarray, waveform: np.ndarray, T: int, audio_backbone, flags: dict,
                    duration: float) -> VideoFeatures:
    audio = audio_backbone(waveform, T)
    audio = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    audio = audio.astype(np.float32, copy=False)
    if audio.ndim != 2 or audio.shape[0] != T:
        raise ValueError(f"audio backbone returned shape {audio.shape}, expected [{T}, dim]")
    if not (np.isfinite(audio).all() and np.isfinite(visual).all()):
        flags["nonfinite"] = True
    return VideoFeatures(audio, visual, flags, duration)


def features_of(decoded: DecodedVideo, *, audio_backbone, visual_backbone, batch_frames: int = 64) -> VideoFeatures:
    """Run the backbones on a decoded video: per-second means of the frame maps, audio per second."""
    T, fps = decoded.seconds, decoded.fps
    sums = _VisualSums(visual_backbone, fps, batch_frames)
    with torch.inference_mode():
        sums.add(decoded.frames)
        visual = sums.finish(T)
        return _video_features(visual, decoded.waveform, T, audio_backbone, decoded.active_flags(), decoded.duration)


def _chunks(stream: VideoStream, chunk_seconds: int | None) -> Iterator[list[np.ndarray]]:
    """The per-second frame arrays of ``stream``, ``chunk_seconds`` seconds per list (None: one list)."""
    step = None if chunk_seconds is None else int(chunk_seconds)
    if step is not None and step < 1:
        raise ValueError(f"chunk_seconds must be >= 1 or None, got {chunk_seconds}")
    chunk: list[np.ndarray] = []
    for _, frames, _ in stream:
        chunk.append(frames)
        del frames
        if step is not None and len(chunk) >= step:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def stream_features(chunks: Iterable[list[np.ndarray]], source, *, audio_backbone, visual_backbone, fps: int,
                     batch_frames: int) -> VideoFeatures:
    """Features from the chunks of one video; ``source.stream`` (or ``source``) is its finished VideoStream."""
    sums = _VisualSums(visual_backbone, fps, batch_frames)
    with torch.inference_mode():
        for chunk in chunks:
            sums.add(*chunk)
            del chunk
        stream = getattr(source, "stream", source)
        visual = sums.finish(stream.seconds)
        return _video_features(visual, stream.waveform, stream.seconds, audio_backbone, stream.active_flags(),
                               stream.duration)


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
    batch_frames`` frames are held, however long the video (None: all frames at once). The features do
    not depend on ``chunk_seconds`` (the backbone batches are the same).
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

    def chunks(self) -> Iterator[list[np.ndarray]]:
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

    def _inline(self) -> Iterator[list[np.ndarray]]:
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
