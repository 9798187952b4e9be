"""Tasks: what to train on, how to turn model outputs into a loss, and how to score predictions.

The trainer and evaluator call only these methods, so any registered model trains in any task
whose inputs it accepts, and no engine code branches on a model's name.

- supervised: per-segment targets; loss on every segment.
- weak: video labels only (plus background-only videos); segment scores are max-pooled over
  time to a video prediction for the loss (multiple-instance learning); evaluation still scores
  every segment.
- cml: cross-modal matching; pairs of (visual second, audio second) with a contrastive loss;
  evaluation is the A2V / V2A window search.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics
from .config import RunConfig
from .data.datasets import AVEData, ConcatRows, GridMeanRows, PairRows, SegmentRows
from .data.errors import DataError
from .data.store import open_store
from .models.cml import pairwise_distance
from .models.registry import model_name


def segment_losses(logits: torch.Tensor, target: torch.Tensor, kind: str, smoothing: float = 0.0) -> torch.Tensor:
    """Per-video loss [B] from logits [B, ..., C] and one-hot targets of the same shape (``smoothing``: ce only)."""
    if kind == "softmax_mlsm":
        # The 2018 code: MultiLabelSoftMarginLoss (sigmoid BCE averaged over every element)
        # applied to the *softmax probabilities*, not to logits.
        probs = logits.softmax(-1)
        bce = F.binary_cross_entropy_with_logits(probs, target, reduction="none")
        return bce.flatten(1).mean(1)
    if kind == "ce":
        ce = F.cross_entropy(logits.flatten(0, -2), target.flatten(0, -2).argmax(-1), reduction="none",
                             label_smoothing=smoothing)
        return ce.view(logits.shape[0], -1).mean(1)
    raise ValueError(f"unknown loss {kind!r} for this task (softmax_mlsm | ce)")


def model_loss_terms(model, out: dict, batch: dict, task: str, weights: dict[str, float]) -> dict[str, torch.Tensor] | None:
    """The model's own named loss terms (the loss-term hook), or None when it has none.

    A model that defines ``loss_terms(out, batch, task)`` returns its unweighted terms, each [B] per
    video; ``weights`` (the recipe's ``loss_weights`` over the class's ``loss_weights``) scale them.
    """
    hook = getattr(model, "loss_terms", None)
    if hook is None:
        return None
    terms = hook(out, batch, task)
    declared = getattr(model, "loss_weights", {})
    return {name: term * float(weights.get(name, declared.get(name, 1.0))) for name, term in terms.items()}


def _inner(model):
    return getattr(model, "module", model)          # the model under DistributedDataParallel


@dataclass
class SupervisedTask:
    name: str = "supervised"
    loss: str = "softmax_mlsm"
    selection_key: str = "accuracy"
    loss_weights: dict = field(default_factory=dict)   # recipe overrides of a model's term weights
    label_smoothing: float = 0.0            # ce only (RunConfig.label_smoothing)

    output: str = "segment_scores"          # what every model must return for this task

    def model_dims(self, data: AVEData) -> dict:
        v = data.store.visual.shape
        # Vector visual features [N, T, D] are read as a 1x1 grid (see SegmentRows.read).
        grid = tuple(v[2:4]) if len(v) == 5 else (1, 1)
        return {"audio_dim": data.store.audio.shape[-1], "visual_dim": v[-1], "grid": grid,
                "num_classes": data.num_classes}

    def rows(self, data: AVEData, split: str) -> SegmentRows:
        return SegmentRows(data.store, data.targets, data.video_labels, data.split(split))

    def train_source(self, data: AVEData, config: RunConfig):
        return self.rows(data, config.data.train_split)

    def eval_source(self, data: AVEData, split: str):
        return self.rows(data, split)

    def default_terms(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        """The task's own loss, for models without the loss-term hook: every segment's class."""
        return {"segment": segment_losses(out["logits"], batch["target"], self.loss, self.label_smoothing)}

    def loss_terms(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Named, weighted per-video loss terms [B]; the training loss is their sum."""
        out = model(batch["audio"], batch["visual"])
        terms = model_loss_terms(_inner(model), out, batch, self.name, self.loss_weights)
        return self.default_terms(out, batch) if terms is None else terms

    def losses(self, model, batch: dict) -> torch.Tensor:
        """The total per-video loss [B]."""
        return sum(self.loss_terms(model, batch).values())

    def predict(self, model, batch: dict) -> dict[str, np.ndarray]:
        return self.predictions(model(batch["audio"], batch["visual"]), batch)

    def predictions(self, out: dict, batch: dict) -> dict[str, np.ndarray]:
        """What the evaluator collects from one batch's model outputs."""
        pred = {"scores": out["segment_scores"].float().cpu().numpy(), "target": batch["target"].cpu().numpy(),
                "index": batch["index"].cpu().numpy()}
        # Other decision rules a model declares (``<rule>_segment_scores``) are scored beside its own.
        for key, value in out.items():
            if key.endswith("_segment_scores"):
                pred[key[: -len("_segment_scores")] + "_scores"] = value.float().cpu().numpy()
        return pred

    def score(self, out: dict[str, np.ndarray], class_names: list[str]) -> dict:
        result = metrics.summarize(out["scores"], out["target"], class_names)
        for key in out:
            if key.endswith("_scores") and key not in ("scores", "video_scores"):
                rule = key[: -len("_scores")]
                result[f"{rule}_rule_accuracy"] = metrics.summarize(out[key], out["target"], class_names)["accuracy"]
        return result


@dataclass
class WeakTask(SupervisedTask):
    """Multiple-instance learning: video labels only; segments are still scored at evaluation."""

    name: str = "weak"
    selection_key: str = "video_accuracy"   # honest default: uses only weak (video) labels

    def train_source(self, data: AVEData, config: RunConfig):
        sources = [self.rows(data, config.data.train_split)]
        backgrounds = []
        if config.data.official_background and (data.root / "audio_feature_noisy.h5").is_file():
            backgrounds.append(open_store(data.root, layout="h5", audio_file="audio_feature_noisy.h5",
                                          visual_file="visual_feature_noisy.h5"))
        for folder in config.data.background:
            backgrounds.append(open_store(folder))
        for store in backgrounds:
            problems = store.spec.compatible_with(data.store.spec)
            for name in ("audio", "visual"):
                got, want = getattr(store, name).shape[1:], getattr(data.store, name).shape[1:]
                if got != want:
                    problems.append(f"{getattr(store, name).path.name} rows are {list(got)}, the data's {list(want)}")
            if problems:
                raise DataError(f"{store.root}: background features do not match the data: {'; '.join(problems)}")
            sources.append(background_rows(store, data.num_classes))
        return ConcatRows(sources) if len(sources) > 1 else sources[0]

    def default_terms(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        # The 2018 MIL rule: the video score is the max over time of the segment logits.
        return {"video": segment_losses(out["logits"].max(dim=1).values, batch["video_label"], self.loss,
                                        self.label_smoothing)}

    def predictions(self, out: dict, batch: dict) -> dict[str, np.ndarray]:
        pred = super().predictions(out, batch)
        pred["video_scores"] = video_scores(out).float().cpu().numpy()
        pred["video_label"] = batch["video_label"].cpu().numpy()
        return pred

    def score(self, out: dict[str, np.ndarray], class_names: list[str]) -> dict:
        result = super().score(out, class_names)
        result["video_accuracy"] = metrics.video_accuracy(out["video_scores"], out["video_label"])
        return result


def video_scores(out: dict) -> torch.Tensor:
    """A weak model's video prediction [B, C]: its own pooled ``video_logits`` when it has them, else
    the 2018 rule (max over time of the segment logits), else the best segment score of each class."""
    if "video_logits" in out:
        return out["video_logits"].softmax(-1)
    if "logits" in out:
        return out["logits"].max(dim=1).values.softmax(-1)
    best = out["segment_scores"].max(dim=1).values                       # [B, C]
    return best / best.sum(-1, keepdim=True).clamp_min(torch.finfo(best.dtype).tiny)


def background_rows(store, num_classes: int) -> SegmentRows:
    n, T = len(store), store.segments
    targets = np.zeros((n, T, num_classes), np.float32)
    targets[..., num_classes - 1] = 1
    video = np.zeros((n, num_classes), np.float32)
    video[:, num_classes - 1] = 1
    return SegmentRows(store, targets, video, np.arange(n))


@dataclass
class CrossModalTask:
    """Cross-modal matching: contrastive loss on (visual t, audio t) pairs; A2V/V2A search."""

    name: str = "cml"
    margin: float = 2.0
    selection_key: str = "mean_accuracy"
    output: str = "distance"

    def model_dims(self, data: AVEData) -> dict:
        return {"audio_dim": data.store.audio.shape[-1], "visual_dim": data.store.visual.shape[-1]}

    def _vectors(self, data: AVEData):
        # visual_feature_vec.h5 when present, else pool5 averaged over the grid on the fly.
        return data.visual_vectors() or GridMeanRows(data.store.visual)

    def train_source(self, data: AVEData, config: RunConfig):
        return PairRows(data.store.audio, self._vectors(data), data.event_mask,
                        data.split(config.data.train_split, match=True), data.segments)

    def eval_source(self, data: AVEData, split: str):
        return VideoVectors(data.store.audio, self._vectors(data), data.event_mask, data.split(split, match=True))

    def loss_terms(self, model, batch: dict) -> dict[str, torch.Tensor]:
        d = model(batch["audio"], batch["visual"])["distance"]             # [B]
        y = batch["target"].to(d.dtype)
        return {"contrastive": y * d.pow(2) + (1 - y) * (self.margin - d).clamp_min(0).pow(2)}

    def losses(self, model, batch: dict) -> torch.Tensor:
        return sum(self.loss_terms(model, batch).values())

    def predict(self, model, batch: dict) -> dict[str, np.ndarray]:
        e_a, e_v = model.embed(batch["audio"], batch["visual"])             # [B, T, E] each
        dists = pairwise_distance(e_v, e_a)                                 # [B, T(visual), T(audio)]
        return {"dists": dists.cpu().numpy(), "event_mask": batch["event_mask"].cpu().numpy(),
                "index": batch["index"].cpu().numpy()}

    def score(self, out: dict[str, np.ndarray], class_names: list[str]) -> dict:
        result = metrics.cross_modal_localization(out["dists"], out["event_mask"])
        result["mean_accuracy"] = (result["a2v_accuracy"] + result["v2a_accuracy"]) / 2
        return result


@dataclass
class VideoVectors:
    """Whole videos as per-second vectors for the cross-modal evaluation."""

    audio: object
    visual_vec: object
    event_mask: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, indices) -> dict[str, np.ndarray]:
        rows = self.rows[np.asarray(indices)]
        return {"audio": self.audio.read(rows), "visual": self.visual_vec.read(rows),
                "event_mask": self.event_mask[rows], "index": rows}


def check_model(task, model_cls: type) -> None:
    """Refuse a model class whose outputs the task cannot use, before anything is built."""
    produces = model_cls.outputs
    supported = getattr(model_cls, "tasks", ("supervised", "weak") if "segment_scores" in produces else ("cml",))
    if task.name not in supported:
        raise ValueError(f"model {model_name(model_cls)!r} trains the {'/'.join(supported)} task, not {task.name!r}")
    if task.output not in produces:
        raise ValueError(f"model {model_name(model_cls)!r} returns {', '.join(produces)}; "
                         f"the {task.name} task needs {task.output!r}")
    if task.output == "segment_scores" and not hasattr(model_cls, "loss_terms") and "logits" not in produces:
        raise ValueError(f"model {model_name(model_cls)!r} has neither logits nor loss terms to train on")
    unknown = sorted(set(getattr(task, "loss_weights", {})) - set(getattr(model_cls, "loss_weights", {})))
    if unknown:
        raise ValueError(f"loss_weights {unknown} are not loss terms of {model_name(model_cls)!r} "
                         f"(it has {sorted(getattr(model_cls, 'loss_weights', {}))})")


def build_task(config: RunConfig):
    if config.task == "supervised":
        return SupervisedTask(loss=config.loss, loss_weights=dict(config.loss_weights),
                              label_smoothing=config.label_smoothing)
    if config.task == "weak":
        key = {"default": "video_accuracy", "video": "video_accuracy", "segment": "accuracy"}.get(config.selection)
        if key is None:
            raise ValueError(f"weak task selection must be 'video' or 'segment', not {config.selection!r}")
        return WeakTask(loss=config.loss, selection_key=key, loss_weights=dict(config.loss_weights),
                        label_smoothing=config.label_smoothing)
    if config.task == "cml":
        return CrossModalTask(margin=config.margin)
    raise ValueError(f"unknown task {config.task!r} (supervised | weak | cml)")
