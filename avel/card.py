"""The model card: everything that travels with a model's weights, as one record.

A checkpoint folder is ``model.safetensors`` + ``config.json``; ``config.json`` is this card. It says
how to rebuild the model (registry name + complete constructor arguments), what it was trained for
(task, class names, the feature spec of its inputs, the outputs it returns), how (the run config)
and how well (training facts). ``avel.load`` returns it beside the model, and evaluate, localize and
the reports read it; nothing is stored on the ``nn.Module``.

The one feature-compatibility rule lives here too (:func:`feature_problems`): wherever features meet
a model (training on a store, evaluating, localizing a video), the store's spec and array shapes are
checked against the card, and the dimensions the model was built with are the ones checked.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch.nn as nn

from ._version import __version__
from .spec import FeatureSpec

# Card keys in config.json, in the order written. Older checkpoints stored training facts at the top
# level; :meth:`ModelCard.from_dict` still reads them.
_TRAINING_KEYS = ("epoch", "selection", "selection_score", "val_metrics", "segments")


class CardError(ValueError):
    """A model card that is malformed or does not fit what it is used with."""


@dataclass(frozen=True)
class ModelCard:
    model: str                                   # registry name
    model_kwargs: dict                           # complete constructor arguments (defaults filled in)
    task: str = "supervised"                     # supervised | weak | cml
    class_names: tuple[str, ...] = ()            # index -> name; the last is background for segment tasks
    feature_spec: FeatureSpec | None = None      # what made the features the model was trained on
    outputs: tuple[str, ...] = ()                # the keys the model's forward returns
    run_config: dict | None = None               # the run's RunConfig as a dict (None: not trained by avel)
    training: dict = field(default_factory=dict)  # epoch, selection key and score, validation metrics, ...
    source: dict = field(default_factory=dict)   # provenance of converted weights (file, class, kind)
    avel_version: str = __version__

    # --- derived facts --------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return int(self.model_kwargs.get("num_classes", len(self.class_names)))

    @property
    def audio_dim(self) -> int | None:
        return self.model_kwargs.get("audio_dim")

    @property
    def visual_dim(self) -> int | None:
        return self.model_kwargs.get("visual_dim")

    @property
    def grid(self) -> tuple[int, ...] | None:
        g = self.model_kwargs.get("grid")
        return None if g is None else tuple(g)

    def replace(self, **changes) -> ModelCard:
        return dataclasses.replace(self, **changes)

    # --- config.json ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "model_kwargs": _jsonable(self.model_kwargs),
            "task": self.task,
            "class_names": list(self.class_names),
            "feature_spec": self.feature_spec.to_dict() if self.feature_spec else None,
            "outputs": list(self.outputs),
            "run_config": _jsonable(self.run_config),
            "training": _jsonable(self.training),
            "source": _jsonable(self.source),
            "avel_version": self.avel_version,
        }

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "config.json") -> ModelCard:
        if not isinstance(d, dict):
            raise CardError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if not isinstance(d.get("model"), str):
            raise CardError(f"{where}: field 'model' (the registry name) is missing or not a string")
        kwargs = d.get("model_kwargs", {})
        if not isinstance(kwargs, dict):
            raise CardError(f"{where}: field 'model_kwargs' must be an object")
        names = d.get("class_names") or ()
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise CardError(f"{where}: field 'class_names' must be a list of strings")
        spec = d.get("feature_spec")
        try:
            spec = FeatureSpec.from_dict(spec) if spec else None
        except (KeyError, TypeError, ValueError) as e:
            raise CardError(f"{where}: field 'feature_spec' is malformed ({type(e).__name__}: {e})") from None
        run_config = d.get("run_config")
        if run_config is not None and not isinstance(run_config, dict):
            raise CardError(f"{where}: field 'run_config' must be an object")
        training = dict(d.get("training") or {})
        for key in _TRAINING_KEYS:                       # the layout written before the card existed
            if key in d and key not in training:
                training[key] = d[key]
        task = d.get("task") or (run_config or {}).get("task") or "supervised"
        return cls(model=d["model"], model_kwargs=dict(kwargs), task=str(task), class_names=tuple(names),
                   feature_spec=spec, outputs=tuple(d.get("outputs") or ()), run_config=run_config,
                   training=training, source=dict(d.get("source") or {}),
                   avel_version=str(d.get("avel_version", "unknown")))


class Loaded(NamedTuple):
    """What ``avel.load`` (and ``avel.compat.load_original``) return: the model and its card."""

    model: nn.Module
    card: ModelCard


def feature_problems(card: ModelCard, spec: FeatureSpec | None, *, audio_shape=None, visual_shape=None) -> list[str]:
    """Why features with ``spec`` (and these per-row array shapes) cannot feed the card's model.

    The one rule, used wherever a store meets a model: the spec must agree with the card's spec
    (backbone, dims, grid, weights, input size), and the arrays' last dimensions must equal the
    dimensions the model was built with. Empty when they fit.
    """
    problems: list[str] = []
    if spec is not None and card.feature_spec is not None:
        problems += spec.compatible_with(card.feature_spec)
    if audio_shape is not None and card.audio_dim is not None and audio_shape[-1] != card.audio_dim:
        problems.append(f"audio features are {audio_shape[-1]}-d, the model takes {card.audio_dim}-d")
    if visual_shape is not None and card.visual_dim is not None:
        if visual_shape[-1] != card.visual_dim:
            problems.append(f"visual features are {visual_shape[-1]}-d, the model takes {card.visual_dim}-d")
        grid = tuple(visual_shape[-3:-1]) if len(visual_shape) >= 4 else (1, 1)
        if card.grid is not None and grid != card.grid and "attention" in card.outputs:
            problems.append(f"visual grid is {list(grid)}, the model's attention takes {list(card.grid)}")
    return problems


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
