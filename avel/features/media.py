"""Write small media clips with PyAV: H.264 (yuv420p) video and AAC audio, constant or variable frame rate.

Used by the demo, the attention overlay video and the tests (real, decodable mp4 files). The container
is chosen from the file extension (``.mp4``, ``.mkv``, ``.mov``, ``.m4a``...).

Example::

    frames = np.zeros((48, 64, 64, 3), np.uint8)            # 3 s at 16 fps
    audio = 0.1 * np.sin(2 * np.pi * 440 * np.arange(48000) / 16000)
    write_clip("clip.mp4", frames, 16, audio)
"""
from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# Fine time base for explicit (variable frame rate) timestamps: 1/90000 s, the MPEG clock.
VFR_TIME_BASE = Fraction(1, 90000)
AUDIO_CHUNK = 1024  # samples per audio frame handed to the encoder (AAC's frame size)


def _video_codec_name(preferred: str) -> str:
    for name in (preferred, "libx264", "h264"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - codec not in this FFmpeg build
            continue
    raise RuntimeError("no H.264 encoder in PyAV's FFmpeg build (tried libx264, h264)")


def _even_frames(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: replicate the last row/column when odd."""
    n, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def write_clip(path: str | Path, frames: np.ndarray | None, fps: float = 16, audio: np.ndarray | None = None,
               sample_rate: int = 16000, *, vfr_pts: Sequence[float] | None = None, video_codec: str = "libx264",
               crf: int = 18, gop: int | None = None, faststart: bool = False, audio_codec: str = "aac",
               audio_bitrate: int | None = None) -> Path:
    """Encode ``frames`` (uint8 RGB [N, H, W, 3], or None for audio only) and ``audio`` into ``path``.

    ``fps``: frame rate for constant-rate clips (frame k shown at k / fps seconds).
    ``vfr_pts``: explicit presentation time in seconds of every frame (increasing, N values) for a
    variable-frame-rate clip; stored with a 1/90000 s time base. The last frame lasts 1/fps.
    ``audio``: float samples in [-1, 1], mono [S] or [S, C] (C = 1 or 2) at ``sample_rate``; None for a
    clip without an audio stream. Odd frame sizes are padded by one replicated row/column (yuv420p).
    ``faststart``: put the mp4 index (moov) before the data, as streaming files do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames is None and audio is None:
        raise ValueError("write_clip needs frames, audio or both")
    if frames is not None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
        if len(frames) == 0:
            raise ValueError("frames is empty")
        frames = _even_frames(frames)
        if vfr_pts is not None:
            times = np.asarray(vfr_pts, dtype=np.float64)
            if times.shape != (len(frames),):
                raise ValueError(f"vfr_pts needs one time per frame ({len(frames)}), got shape {times.shape}")
            if np.any(np.diff(times) <= 0) or times[0] < 0:
                raise ValueError("vfr_pts must be increasing and non-negative")
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        vstream = astream = None
        rate = Fraction(fps).limit_denominator(1001)
        if frames is not None:
            vstream = container.add_stream(_video_codec_name(video_codec), rate=rate)
            vstream.width, vstream.height = frames.shape[2], frames.shape[1]
            vstream.pix_fmt = "yuv420p"
            if vfr_pts is not None:
                vstream.codec_context.time_base = VFR_TIME_BASE
                vstream.time_base = VFR_TIME_BASE
                # No B-frames: with reordering the mp4 muxer derives the duration from shifted dts.
                vstream.codec_context.max_b_frames = 0
            if gop:
                vstream.codec_context.gop_size = gop
            if vstream.codec_context.name == "libx264":
                vstream.options = {"crf": str(crf), "preset": "veryfast"}
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim == 1:
                audio = audio[:, None]
            if audio.ndim != 2 or audio.shape[1] not in (1, 2):
                raise ValueError(f"audio must be [S] or [S, C] with C = 1 or 2, got shape {audio.shape}")
            layout = "mono" if audio.shape[1] == 1 else "stereo"
            astream = container.add_stream(audio_codec, rate=int(sample_rate))
            astream.layout = layout
            if audio_bitrate:
                astream.bit_rate = int(audio_bitrate)

        if vstream is not None:
            for k, img in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                if vfr_pts is not None:
                    frame.pts = int(round(times[k] / VFR_TIME_BASE))
                    frame.time_base = VFR_TIME_BASE
                else:
                    frame.pts = k
                    frame.time_base = 1 / rate
                for packet in vstream.encode(frame):
                    container.mux(packet)
            for packet in vstream.encode(None):
                container.mux(packet)

        if astream is not None:
            fmt = astream.codec_context.codec.audio_formats[0].name if astream.codec_context.codec.audio_formats else "fltp"
            planar = np.ascontiguousarray(np.clip(audio, -1.0, 1.0).T)  # [C, S]
            for lo in range(0, planar.shape[1], AUDIO_CHUNK):
                chunk = np.ascontiguousarray(planar[:, lo:lo + AUDIO_CHUNK])
                if fmt == "fltp":
                    frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
                else:  # s16 encoders
                    frame = av.AudioFrame.from_ndarray(
                        (chunk.T.reshape(1, -1) * 32767).astype(np.int16), format="s16", layout=layout)
                frame.sample_rate = int(sample_rate)
                frame.pts = lo
                frame.time_base = Fraction(1, int(sample_rate))
                for packet in astream.encode(frame):
                    container.mux(packet)
            for packet in astream.encode(None):
                container.mux(packet)
    return path
