"""Model + card + video -> per-second classes, scores, merged event spans and attention maps.

:class:`Localizer` is built from what :func:`avel.engine.checkpoint.load` returns, the model and its
card, and reads every fact from the card: the classes, the dimensions the model was built with, the
outputs it declares, and the feature spec whose backbones it rebuilds (one function,
:func:`avel.features.build_backbones`, also used by ``avel extract``). Features come from
:func:`avel.features.extract.extract_video`, the same code ``avel extract`` runs, and are checked
against the card by the one rule, :func:`avel.card.feature_problems`.

Per-second scores are always the model's ``segment_scores`` (every segment model returns them; their
argmax per second is the model's own decision), attention maps its ``attention`` when the card
declares it. A card without ``segment_scores`` (the cross-modal ``cml`` model) is refused.

Variable length
---------------
A video of T whole seconds (its container duration, floored; at least 1) gives T segments. The
models run over the segment axis, so they accept any T: the whole sequence is run at once, with no
windowing. A model trained on 10 s clips thus sees its training length only for 10 s videos; a much
longer video is still one pass, a 3 s video is three segments.

Memory
------
A video streams through the backbones as ``avel extract`` streams it (:func:`extract_video`):
``chunk_seconds`` seconds of frames at a time (default 30), the sound in blocks as it is decoded, the
same features bit for bit as one pass. Only the per-second features are kept, so the peak memory does
not grow with the clip beyond them (``benchmarks/localize_memory.py`` measures it against clip length).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from .._version import __version__
from ..card import ModelCard, feature_problems
from ..data.errors import DataError
from ..engine.checkpoint import load
from ..features import BackboneError, build_backbones
from ..features.decode import VideoDecodeError
from ..features.extract import DEFAULT_CHUNK_SECONDS, VideoFeatures, extract_video
from ..spec import FeatureSpec
from .results import Localization, merge_spans


class LocalizeError(DataError):
    """A video or a checkpoint cannot be localized; the message says which and why."""


def class_names_of(card: ModelCard) -> list[str]:
    """The card's class names; numbered names when a card records none (background last)."""
    names = list(card.class_names)
    if len(names) != card.num_classes:
        names = [f"class {i}" for i in range(card.num_classes - 1)] + ["background"]
    return names


class Localizer:
    """A trained segment model that localizes events in videos or precomputed features.

    >>> loc = Localizer.from_checkpoint("runs/av_att")          # doctest: +SKIP
    >>> result = loc.localize("clip.mp4")                        # doctest: +SKIP
    >>> [(s.start, s.end, s.label) for s in result.spans]        # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, card: ModelCard, *, checkpoint: str | Path | None = None,
                 device: str = "cpu", audio_weights: str | None = None, visual_weights: str | None = None,
                 chunk_seconds: int | None = DEFAULT_CHUNK_SECONDS):
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        if chunk_seconds is not None and int(chunk_seconds) < 1:
            raise ValueError(f"chunk_seconds must be >= 1 or None, got {chunk_seconds}")
        self.chunk_seconds = None if chunk_seconds is None else int(chunk_seconds)
        if "segment_scores" not in card.outputs:
            raise LocalizeError(
                f"{self.checkpoint or 'model'}: a {card.model!r} model ({card.task} task) gives no per-second class "
                f"scores (it returns {', '.join(card.outputs) or 'nothing declared'}); localization needs a segment "
                "model, one that returns segment_scores")
        self.model = model.to(device).eval()
        self.card = card
        self.device = device
        self.audio_weights = audio_weights
        self.visual_weights = visual_weights
        self.class_names = class_names_of(card)
        self._backbones = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", audio_weights: str | None = None,
                        visual_weights: str | None = None,
                        chunk_seconds: int | None = DEFAULT_CHUNK_SECONDS) -> Localizer:
        """Load a checkpoint folder (a run folder, or ``config.json`` inside it)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: checkpoint not found")
        model, card = load(path, map_location=device)
        return cls(model, card, checkpoint=path, device=device, audio_weights=audio_weights,
                   visual_weights=visual_weights, chunk_seconds=chunk_seconds)

    # --- facts -------------------------------------------------------------------------------

    @property
    def has_attention(self) -> bool:
        """Whether the model returns audio-guided attention maps (as its card declares)."""
        return "attention" in self.card.outputs

    @property
    def feature_spec(self) -> FeatureSpec | None:
        return self.card.feature_spec

    def facts(self) -> dict:
        """Model and feature facts for reports, all from the card."""
        spec = self.card.feature_spec
        return {
            "model": self.card.model,
            "task": self.card.task,
            "model_kwargs": dict(self.card.model_kwargs),
            "classes": self.class_names,
            "feature_spec": spec.to_dict() if spec else None,
            "checkpoint": self.checkpoint,
            "checkpoint_avel_version": self.card.avel_version,
            "avel_version": __version__,
            "epoch": self.card.training.get("epoch"),
            "val_metrics": self.card.training.get("val_metrics"),
        }

    # --- features ----------------------------------------------------------------------------

    def backbones(self):
        """(audio, visual) backbones that make the card's features, built once on first use."""
        if self._backbones is None:
            spec = self.card.feature_spec
            where = self.checkpoint or "the checkpoint"
            if spec is None:
                raise LocalizeError(f"{where} records no feature spec, so the backbones that made its training "
                                    "features are unknown; pass precomputed features to Localizer.localize instead "
                                    "of a video")
            try:
                self._backbones = build_backbones(spec.audio, spec.visual, audio_weights=self.audio_weights,
                                                  visual_weights=self.visual_weights, device=self.device, where=where)
            except BackboneError as e:
                raise LocalizeError(str(e)) from None
        return self._backbones

    def features(self, path: str | Path) -> VideoFeatures:
        """Extract the features of one video (any length) as the card's spec says, streaming it
        ``chunk_seconds`` at a time. Raises :class:`LocalizeError` for a missing, unreadable or silent video."""
        path = Path(path)
        check_video(path)
        audio_bb, visual_bb = self.backbones()
        try:
            feats = extract_video(path, audio_backbone=audio_bb, visual_backbone=visual_bb,
                                  fps=int(self.card.feature_spec.visual.frames_per_segment),
                                  chunk_seconds=self.chunk_seconds)
        except VideoDecodeError as e:
            raise LocalizeError(str(e)) from None
        for flag, what in (("no_audio", "audio"), ("no_video", "video frame")):
            if feats.flags.get(flag):
                raise LocalizeError(f"{path}: no {what} could be decoded; localization needs the sound and the picture")
        return feats

    # --- the model ---------------------------------------------------------------------------

    def predict(self, audio: np.ndarray, visual: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Features of one video, audio [T, Da] and visual [T, H, W, Dv] -> (segment scores [T, C],
        attention [T, H, W] or None). The whole sequence runs at once, whatever T is."""
        audio = np.asarray(audio, dtype=np.float32)
        visual = np.asarray(visual, dtype=np.float32)
        if audio.ndim != 2 or visual.ndim != 4:
            raise LocalizeError(f"features must be audio [T, Da] and visual [T, H, W, Dv], got shapes "
                                f"{audio.shape} and {visual.shape}")
        problems = feature_problems(self.card, None, audio_shape=audio.shape, visual_shape=visual.shape)
        if problems:
            raise LocalizeError("features do not fit the model: " + "; ".join(problems))
        if audio.shape[0] != visual.shape[0] or audio.shape[0] < 1:
            raise LocalizeError(f"audio has {audio.shape[0]} seconds, visual {visual.shape[0]}: need the same T >= 1")
        if not (np.isfinite(audio).all() and np.isfinite(visual).all()):
            raise LocalizeError("features contain NaN or Inf")
        with torch.inference_mode():
            out = self.model(torch.from_numpy(audio)[None].to(self.device),
                             torch.from_numpy(visual)[None].to(self.device))
        scores = out["segment_scores"][0].float().cpu().numpy()
        att = out["attention"][0].float().cpu().numpy() if self.has_attention else None
        return scores, att

    def localize(self, source: Any, *, name: str | None = None) -> Localization:
        """Localize events in ``source``: a video path, or precomputed features — an object with ``audio``
        and ``visual`` arrays (e.g. :class:`~avel.features.extract.VideoFeatures`), a mapping with those
        keys, or an ``(audio, visual)`` pair; audio [T, Da], visual [T, H, W, Dv]."""
        flags: dict = {}
        duration = None
        if isinstance(source, (str, Path)):
            feats = self.features(source)
            audio, visual, flags, duration = feats.audio, feats.visual, dict(feats.flags), feats.duration
            video = name or str(source)
        else:
            if isinstance(source, Mapping):
                audio, visual = source["audio"], source["visual"]
                flags = dict(source.get("flags") or {})
            elif isinstance(source, (tuple, list)) and len(source) == 2:
                audio, visual = source
            elif hasattr(source, "audio") and hasattr(source, "visual"):
                audio, visual = source.audio, source.visual
                flags = dict(getattr(source, "flags", {}) or {})
                duration = getattr(source, "duration", None)
            else:
                raise TypeError("localize() takes a video path, or features: (audio, visual), a mapping with "
                                f"'audio' and 'visual', or an object with those attributes; got {type(source).__name__}")
            video = name or "features"
        scores, att = self.predict(audio, visual)
        names = self.class_names
        labels = [names[c] for c in scores.argmax(-1)]
        return Localization(video, int(scores.shape[0]), names, scores, labels, merge_spans(scores, names), att,
                            flags, None if duration is None else float(duration))

    def localize_many(self, sources: Iterable[Any]) -> list[Localization | Exception]:
        """One result per source; a source that fails gives its exception instead (the others are still done)."""
        out: list[Localization | Exception] = []
        for src in sources:
            try:
                out.append(self.localize(src))
            except (LocalizeError, OSError, ValueError) as e:
                out.append(e)
        return out


def check_video(path: str | Path) -> None:
    """Fail early, with a clear message, for a missing file, a file PyAV cannot open, or a file
    without an audio or a video stream."""
    path = Path(path)
    if not path.exists():
        raise LocalizeError(f"{path}: file not found")
    if not path.is_file():
        raise LocalizeError(f"{path}: not a file")
    try:
        with av.open(str(path), mode="r") as c:
            has_audio, has_video = bool(c.streams.audio), bool(c.streams.video)
    except Exception as e:  # noqa: BLE001 - FFmpeg errors of every kind: the file is not a readable video
        raise LocalizeError(f"{path}: not a readable video file ({type(e).__name__}: {e})") from None
    if not has_video and not has_audio:
        raise LocalizeError(f"{path}: no audio or video stream")
    if not has_audio:
        raise LocalizeError(f"{path}: no audio stream; localization needs the sound and the picture")
    if not has_video:
        raise LocalizeError(f"{path}: no video stream; localization needs the sound and the picture")
