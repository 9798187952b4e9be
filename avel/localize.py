"""Checkpoint + video -> per-second classes, probabilities, merged event spans and attention maps.

:class:`Localizer` holds a trained segment classifier and builds the feature backbones its
checkpoint's feature spec names (``model.avel_config['feature_spec']``); features come from
:func:`avel.features.extract.extract_video`, the same code ``avel extract`` runs.

Variable length
---------------
A video of T whole seconds (its container duration, floored; at least 1) gives T segments. The
models are BiLSTMs over the segment axis plus per-segment layers, so they accept any T: the whole
sequence is run at once, with no windowing. A model trained on 10 s clips thus sees its training
length only for 10 s videos; a much longer video is still one pass (context flows across it in
both directions), a 3 s video is three segments.

Spans
-----
Consecutive seconds with the same non-background class merge into one span ``[start, end)`` (whole
seconds, end exclusive); its score is the mean probability of that class over the span.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .data.errors import DataError
from .spec import FeatureSpec
from .metrics import spans as class_spans
from .io import atomic_write

log = logging.getLogger(__name__)

# Streams no backbone can rebuild from a raw video.
_NOT_REAL = {"synthetic"}
# Visual backbones whose input size sets the grid (grid = ceil(size / 32)); default grid 7x7 at 224.
_SIZE_SET_GRID = {"efficientnet-lite0": 32}


class LocalizeError(DataError):
    """A video or a checkpoint cannot be localized; the message says which and why."""


# ---------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Span:
    """One event: seconds ``[start, end)``, the class name, and the mean probability of the class over it."""

    start: int
    end: int
    label: str
    score: float
    index: int = -1            # class index

    @property
    def duration(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "label": self.label, "score": round(float(self.score), 6),
                "index": self.index}


@dataclass
class Localization:
    """What :meth:`Localizer.localize` returns for one video (or one set of precomputed features)."""

    video: str                      # path, or a name for precomputed features
    seconds: int                    # T
    class_names: list[str]          # C names, background last
    probs: np.ndarray               # float32 [T, C], softmax of the model's logits
    labels: list[str]               # T predicted class names
    spans: list[Span]               # merged non-background runs
    attention: np.ndarray | None    # float32 [T, H, W] (models with audio-guided attention), else None
    flags: dict = field(default_factory=dict)     # decode flags (padding, truncation, corrupt packets...)
    duration: float | None = None   # of the file in seconds (None for precomputed features)

    @property
    def classes(self) -> np.ndarray:
        """Predicted class index per second [T]."""
        return self.probs.argmax(-1)

    @property
    def background(self) -> int:
        return len(self.class_names) - 1

    @property
    def scores(self) -> np.ndarray:
        """Probability of the predicted class per second [T]."""
        return self.probs.max(-1)

    def to_dict(self, *, attention: bool = True, digits: int = 6) -> dict:
        d = {
            "video": self.video,
            "seconds": self.seconds,
            "duration": self.duration,
            "class_names": list(self.class_names),
            "labels": list(self.labels),
            "classes": [int(c) for c in self.classes],
            "probs": np.round(self.probs.astype(np.float64), digits).tolist(),
            "spans": [s.to_dict() for s in self.spans],
            "flags": dict(self.flags),
        }
        if attention:
            d["attention"] = None if self.attention is None else np.round(self.attention.astype(np.float64), digits).tolist()
        return d

    def segments_csv(self) -> str:
        """One row per second: second, start, end, label, score, then one probability column per class."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["second", "start", "end", "label", "score", *[f"p:{c}" for c in self.class_names]])
        for t in range(self.seconds):
            w.writerow([t, t, t + 1, self.labels[t], f"{self.probs[t].max():.6f}",
                        *[f"{p:.6f}" for p in self.probs[t]]])
        return buf.getvalue()

    def spans_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["start", "end", "label", "score"])
        for s in self.spans:
            w.writerow([s.start, s.end, s.label, f"{s.score:.6f}"])
        return buf.getvalue()


def merge_spans(probs: np.ndarray, class_names: Sequence[str], background: int | None = None) -> list[Span]:
    """Runs of the same non-background argmax class -> spans scored by the class's mean probability."""
    probs = np.asarray(probs)
    if background is None:
        background = probs.shape[-1] - 1
    out = []
    for start, end, c in class_spans(probs.argmax(-1), background):
        out.append(Span(int(start), int(end), str(class_names[c]), float(probs[start:end, c].mean()), int(c)))
    return out


# ---------------------------------------------------------------------------------------------- localizer

def _class_names(config: dict, num_classes: int) -> list[str]:
    names = list(config.get("class_names") or [])
    if len(names) != num_classes:
        names = [f"class {i}" for i in range(num_classes - 1)] + ["background"]
    return names


class Localizer:
    """A trained segment classifier that localizes events in videos or precomputed features.

    >>> loc = Localizer.from_checkpoint("runs/av_att")          # doctest: +SKIP
    >>> result = loc.localize("clip.mp4")                        # doctest: +SKIP
    >>> [(s.start, s.end, s.label) for s in result.spans]        # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, *, checkpoint: str | Path | None = None, device: str = "cpu",
                 audio_weights: str | None = None, visual_weights: str | None = None):
        self.model = model.to(device).eval()
        self.device = device
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.config: dict = dict(getattr(model, "avel_config", {}) or {})
        self.audio_weights = audio_weights
        self.visual_weights = visual_weights
        self._backbones = None
        task = self.config.get("task", "supervised")
        if task == "cml" or not self._has_logits():
            raise LocalizeError(
                f"{self.checkpoint or 'model'}: a {self.model_name!r} model ({task} task) gives no per-second class "
                "scores; localization needs a segment classifier (supervised or weak task)")

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", audio_weights: str | None = None,
                        visual_weights: str | None = None) -> "Localizer":
        """Load a checkpoint folder (a run folder, or ``config.json`` inside it)."""
        from .engine.checkpoint import load

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: checkpoint not found")
        model = load(path, map_location=device)
        return cls(model, checkpoint=path, device=device, audio_weights=audio_weights, visual_weights=visual_weights)

    # --- facts -------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        spec = getattr(self.model, "avel_spec", None) or {}
        return str(self.config.get("model") or spec.get("name") or type(self.model).__name__)

    @property
    def model_kwargs(self) -> dict:
        spec = getattr(self.model, "avel_spec", None) or {}
        return dict(self.config.get("model_kwargs") or spec.get("kwargs") or {})

    @property
    def task(self) -> str:
        return str(self.config.get("task", "supervised"))

    @property
    def feature_spec(self) -> FeatureSpec | None:
        spec = self.config.get("feature_spec")
        return FeatureSpec.from_dict(spec) if spec else None

    @property
    def num_classes(self) -> int:
        return int(self.model_kwargs.get("num_classes") or len(self.config.get("class_names") or []) or 29)

    @property
    def class_names(self) -> list[str]:
        return _class_names(self.config, self.num_classes)

    @property
    def has_attention(self) -> bool:
        """Whether the model returns audio-guided attention maps (probed with one zero segment)."""
        return "attention" in self._probe()

    def facts(self) -> dict:
        """Model and feature facts for reports."""
        from . import __version__

        spec = self.feature_spec
        return {
            "model": self.model_name,
            "task": self.task,
            "model_kwargs": self.model_kwargs,
            "classes": self.class_names,
            "feature_spec": spec.to_dict() if spec else None,
            "checkpoint": self.checkpoint,
            "checkpoint_avel_version": self.config.get("avel_version"),
            "avel_version": __version__,
            "epoch": self.config.get("epoch"),
            "val_metrics": self.config.get("val_metrics"),
        }

    def _dims(self) -> tuple[int, tuple[int, int], int]:
        kw = self.model_kwargs
        spec = self.feature_spec
        audio_dim = int(kw.get("audio_dim") or (spec.audio.dim if spec else 128))
        grid = tuple(kw.get("grid") or (spec.visual.grid if spec else (7, 7)))
        visual_dim = int(kw.get("visual_dim") or (spec.visual.dim if spec else 512))
        return audio_dim, grid, visual_dim

    def _has_logits(self) -> bool:
        try:
            return "logits" in self._probe()
        except Exception as e:  # noqa: BLE001 - a model that cannot even run one segment
            log.debug("probe of %s failed: %s", self.model_name, e)
            return False

    def _probe(self) -> dict:
        if not hasattr(self, "_probe_keys"):
            audio_dim, grid, visual_dim = self._dims()
            with torch.inference_mode():
                out = self.model(torch.zeros(1, 1, audio_dim, device=self.device),
                                 torch.zeros(1, 1, *grid, visual_dim, device=self.device))
            self._probe_keys = {k: None for k in out}
        return self._probe_keys

    # --- features ----------------------------------------------------------------------------

    def backbones(self):
        """(audio, visual) backbones for the checkpoint's feature spec, built once on first use."""
        if self._backbones is None:
            self._backbones = build_backbones(self.feature_spec, device=self.device, audio_weights=self.audio_weights,
                                              visual_weights=self.visual_weights, checkpoint=self.checkpoint)
        return self._backbones

    def features(self, path: str | Path):
        """Extract the features of one video (any length) as the checkpoint's spec says ->
        :class:`avel.features.extract.VideoFeatures`. Raises :class:`LocalizeError` for a missing,
        unreadable or silent video."""
        from .features.decode import VideoDecodeError
        from .features.extract import extract_video

        path = Path(path)
        check_video(path)
        audio_bb, visual_bb = self.backbones()
        fps = int(self.feature_spec.visual.frames_per_segment or 16)
        try:
            feats = extract_video(path, audio_backbone=audio_bb, visual_backbone=visual_bb, fps=fps)
        except VideoDecodeError as e:
            raise LocalizeError(str(e)) from None
        if feats.flags.get("no_audio"):
            raise LocalizeError(f"{path}: no audio could be decoded; localization needs the sound and the picture")
        if feats.flags.get("no_video"):
            raise LocalizeError(f"{path}: no video frame could be decoded; localization needs the sound and the picture")
        return feats

    # --- the model ---------------------------------------------------------------------------

    def predict(self, audio: np.ndarray, visual: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Features of one video, audio [T, Da] and visual [T, H, W, Dv] -> (probs [T, C], attention [T, H, W] or None).
        The whole sequence runs at once, whatever T is."""
        audio = np.asarray(audio, dtype=np.float32)
        visual = np.asarray(visual, dtype=np.float32)
        audio_dim, grid, visual_dim = self._dims()
        if audio.ndim != 2 or audio.shape[1] != audio_dim:
            raise LocalizeError(f"audio features must be [T, {audio_dim}], got shape {audio.shape}")
        if visual.ndim != 4 or tuple(visual.shape[1:3]) != tuple(grid) or visual.shape[3] != visual_dim:
            raise LocalizeError(f"visual features must be [T, {grid[0]}, {grid[1]}, {visual_dim}], got shape {visual.shape}")
        if audio.shape[0] != visual.shape[0] or audio.shape[0] < 1:
            raise LocalizeError(f"audio has {audio.shape[0]} seconds, visual {visual.shape[0]}: need the same T >= 1")
        if not (np.isfinite(audio).all() and np.isfinite(visual).all()):
            raise LocalizeError("features contain NaN or Inf")
        with torch.inference_mode():
            out = self.model(torch.from_numpy(audio)[None].to(self.device), torch.from_numpy(visual)[None].to(self.device))
        probs = out["logits"][0].float().softmax(-1).cpu().numpy()
        att = out.get("attention")
        att = None if att is None else att[0].float().cpu().numpy()
        return probs, att

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
        probs, att = self.predict(audio, visual)
        names = self.class_names
        if probs.shape[1] != len(names):
            names = _class_names({}, probs.shape[1])
        labels = [names[c] for c in probs.argmax(-1)]
        return Localization(video, int(probs.shape[0]), names, probs, labels, merge_spans(probs, names), att,
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


# ---------------------------------------------------------------------------------------------- backbones

def build_backbones(spec: FeatureSpec | None, *, device: str = "cpu", audio_weights: str | None = None,
                    visual_weights: str | None = None, checkpoint: str | None = None):
    """The (audio, visual) backbones that make features of ``spec``; errors name what is missing."""
    from .features.backbones import build_audio_backbone, build_visual_backbone

    where = checkpoint or "the checkpoint"
    if spec is None:
        raise LocalizeError(f"{where} records no feature spec, so the backbones that made its training features "
                            "are unknown; pass precomputed features to Localizer.localize instead of a video")
    fake = [n for n, s in (("audio", spec.audio), ("visual", spec.visual)) if s.backbone in _NOT_REAL]
    if fake:
        raise LocalizeError(f"{where} was trained on synthetic features ({', '.join(fake)}: backbone "
                            f"{spec.audio.backbone if 'audio' in fake else spec.visual.backbone!r}); no backbone can "
                            "compute them from a video. Train on features extracted from real media "
                            "(`avel extract`), or pass precomputed features")
    audio = build_audio_backbone(spec.audio.backbone, weights=_weights_arg(spec.audio.weights, audio_weights),
                                 device=device)
    vkw = {}
    per_cell = _SIZE_SET_GRID.get(spec.visual.backbone)
    if per_cell and spec.visual.input_size:
        vkw["image_size"] = int(spec.visual.input_size[0])    # recorded by the extractor
    elif per_cell and spec.visual.grid and tuple(spec.visual.grid) != (7, 7):   # specs older than input_size
        vkw["image_size"] = per_cell * int(spec.visual.grid[0])
    visual = build_visual_backbone(spec.visual.backbone, weights=_weights_arg(spec.visual.weights, visual_weights),
                                   device=device, **vkw)
    made = FeatureSpec(audio.spec, visual.spec)
    problems = made.compatible_with(spec)
    if problems:
        raise LocalizeError(f"the backbones built for {where} do not make the features it was trained on: "
                            + "; ".join(problems) + " (pass --audio-weights / --visual-weights with the right files)")
    return audio, visual


def _weights_arg(tag: str, given: str | None) -> str | None:
    if given is not None:
        return given
    return "random" if tag == "random" else None


def check_video(path: str | Path) -> None:
    """Fail early, with a clear message, for a missing file, a file PyAV cannot open, or a file
    without an audio or a video stream."""
    import av

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


# ---------------------------------------------------------------------------------------------- CLI

def _unique_stem(path: Path, used: set[str]) -> str:
    stem = path.stem or "video"
    name, k = stem, 2
    while name in used:
        name, k = f"{stem}-{k}", k + 1
    used.add(name)
    return name


def write_result(result: Localization, out: Path, stem: str, fmt: str) -> list[Path]:

    if fmt == "json":
        path = out / f"{stem}.json"
        atomic_write(path, json.dumps(result.to_dict(), indent=1))
        return [path]
    if fmt == "csv":
        a, b = out / f"{stem}.csv", out / f"{stem}_spans.csv"
        atomic_write(a, result.segments_csv())
        atomic_write(b, result.spans_csv())
        return [a, b]
    raise ValueError(f"format must be json or csv, not {fmt!r}")


def run_localize(videos: Sequence[str | Path], *, checkpoint: str | Path, out: str | Path = "avel-localize",
                 fmt: str = "json", report: bool = False, device: str = "cpu", audio_weights: str | None = None,
                 visual_weights: str | None = None) -> int:
    """``avel localize``: one result file per video in ``out`` plus ``summary.<fmt>`` (and ``report.html``).

    Returns 0 when every video was localized, 1 when some failed (each named with its reason in the
    summary and on stderr; the others are done), 2 when nothing could run (checkpoint, backbones)."""
    from .features.weights import WeightsNotFoundError

    out = Path(out)
    try:
        loc = Localizer.from_checkpoint(checkpoint, device=device, audio_weights=audio_weights,
                                        visual_weights=visual_weights)
        loc.backbones()
    except WeightsNotFoundError as e:
        print(f"avel localize: error: {e}\n(on the command line: --audio-weights FILE / --visual-weights FILE)",
              file=sys.stderr)
        return 2
    except (LocalizeError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"avel localize: error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    summary, results = [], []
    for video in videos:
        video = Path(video)
        stem = _unique_stem(video, used)
        try:
            result = loc.localize(video)
        except (LocalizeError, OSError, ValueError) as e:
            msg = str(e)
            print(f"avel localize: error: {msg}", file=sys.stderr)
            summary.append({"video": str(video), "status": "failed", "error": msg, "files": []})
            continue
        files = write_result(result, out, stem, fmt)
        results.append(result)
        summary.append({"video": str(video), "status": "ok", "error": None, "seconds": result.seconds,
                        "spans": [s.to_dict() for s in result.spans], "files": [str(f) for f in files],
                        "flags": result.flags})
        spans_text = ", ".join(f"{s.label} {s.start}-{s.end} s ({s.score:.2f})" for s in result.spans) or "no event"
        print(f"{video}: {result.seconds} s: {spans_text}")
    if fmt == "json":
        atomic_write(out / "summary.json", json.dumps({"checkpoint": str(checkpoint), "videos": summary}, indent=1))
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["video", "status", "seconds", "spans", "error"])
        for s in summary:
            spans_text = ";".join(f"{d['label']}:{d['start']}-{d['end']}" for d in s.get("spans", []))
            w.writerow([s["video"], s["status"], s.get("seconds", ""), spans_text, s["error"] or ""])
        atomic_write(out / "summary.csv", buf.getvalue())
    if report and results:
        from .viz.report import ReportEntry, write_report

        entries = []
        for r in results:
            frames = None
            if r.attention is not None:
                try:
                    from .viz.attention import middle_frames

                    frames = middle_frames(r.video, r.seconds)
                except Exception as e:  # noqa: BLE001 - a report without frames is still a report
                    log.warning("%s: no frames for the report (%s)", r.video, e)
            entries.append(ReportEntry(r, frames=frames))
        path = write_report(out / "report.html", entries, facts=loc.facts(),
                            failures=[s for s in summary if s["status"] == "failed"])
        print(f"report: {path}")
    failed = sum(s["status"] == "failed" for s in summary)
    print(f"{len(summary) - failed} of {len(summary)} videos localized; results in {out}")
    return 1 if failed else 0
