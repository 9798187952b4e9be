"""Typed run configuration: frozen dataclasses, recipe presets, YAML in/out, ``a.b=c`` overrides.

A run is fully described by a :class:`RunConfig`; presets are functions returning a fresh one,
so no mutable dict is ever shared between runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"              # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "step"          # step | cosine | constant
    step_every: int = 15000         # iterations between x gamma decays (step)
    gamma: float = 0.1
    warmup_iters: int = 0
    grad_clip: float = 0.0          # 0 = off


@dataclass(frozen=True)
class DataConfig:
    root: str = ""
    layout: str = "auto"            # auto | h5 | packed
    train_split: str = "train"
    val_split: str = "val"
    background: tuple[str, ...] = ()   # extra background-only feature folders (weak task)
    official_background: bool = True  # use *_noisy.h5 in the data root when present (weak task)


@dataclass(frozen=True)
class RunConfig:
    model: str = "av_att"
    task: str = "supervised"        # supervised | weak | cml
    recipe: str = "original"
    epochs: int = 300
    batch_size: int = 64
    loss: str = "softmax_mlsm"      # softmax_mlsm (original) | ce
    shuffle: bool = False
    eval_every: int = 5
    seed: int = 0
    selection: str = "default"      # task-specific: weak -> 'video' (default) or 'segment'
    margin: float = 2.0             # contrastive margin (cml)
    threads: int = 0                # torch threads; 0 = torch default
    model_kwargs: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        optim = dict(d.pop("optim", None) or {})
        data = dict(d.pop("data", None) or {})
        data["background"] = tuple(data.get("background", ()))
        for section, kind, values in (("", cls, d), ("optim.", OptimConfig, optim), ("data.", DataConfig, data)):
            unknown = set(values) - {f.name for f in dataclasses.fields(kind)}
            if unknown:
                raise ValueError(f"unknown config keys: {sorted(section + k for k in unknown)}")
            for f in dataclasses.fields(kind):
                # YAML 1.1 reads '3e-4' (no dot) as a string: float fields take it as the number.
                if f.type == "float" and isinstance(values.get(f.name), (str, int)) and not isinstance(values[f.name], bool):
                    try:
                        values[f.name] = float(values[f.name])
                    except ValueError:
                        raise ValueError(f"{section}{f.name}: expected a number, got {values[f.name]!r}") from None
        return cls(**d, optim=OptimConfig(**optim), data=DataConfig(**data))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def recipe(name: str, task: str = "supervised") -> RunConfig:
    """Preset of the one training loop.

    original: the 2018 code — Adam 1e-3, batch 64, multi-label soft-margin loss on softmax
      outputs, no shuffling, x0.1 every 15,000 iterations, validation every 5 epochs; 300 epochs
      supervised, 250 weak; cml: Adam 1e-3, batch 8, 20 epochs, contrastive loss, margin 2.
    modern: cross-entropy on logits, shuffling, AdamW, cosine schedule, validation every epoch.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    if task not in ("supervised", "weak", "cml"):
        raise ValueError(f"unknown task {task!r}; available: supervised, weak, cml")
    return RECIPES[name](task)


def _original(task: str) -> RunConfig:
    if task == "cml":
        return RunConfig(model="cml", task=task, recipe="original", epochs=20, batch_size=8, loss="contrastive",
                         shuffle=True, eval_every=1, optim=OptimConfig(schedule="constant"))
    return RunConfig(task=task, recipe="original", epochs=300 if task == "supervised" else 250)


def _modern(task: str) -> RunConfig:
    optim = OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-2, schedule="cosine", warmup_iters=50, grad_clip=1.0)
    if task == "cml":
        return RunConfig(model="cml", task=task, recipe="modern", epochs=20, batch_size=64, loss="contrastive",
                         shuffle=True, eval_every=1, optim=optim)
    return RunConfig(task=task, recipe="modern", epochs=100, loss="ce", shuffle=True, eval_every=1, optim=optim)


RECIPES = {"original": _original, "modern": _modern}


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``key=value`` / ``section.key=value`` strings (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        parts = key.strip().split(".")
        config = _set(config, parts, value, key)
    return config


def _set(obj, parts: list[str], value, full: str):
    name = parts[0]
    if name == "model_kwargs" and len(parts) == 2 and isinstance(obj, RunConfig):
        return replace(obj, model_kwargs={**obj.model_kwargs, parts[1]: value})
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields:
        raise ValueError(f"unknown config key {full!r} (known here: {', '.join(fields)})")
    if len(parts) > 1:
        return replace(obj, **{name: _set(getattr(obj, name), parts[1:], value, full)})
    current = getattr(obj, name)
    if isinstance(current, tuple):
        value = tuple(value) if isinstance(value, (list, tuple)) else tuple(str(value).split(","))
    elif isinstance(current, bool):
        value = bool(value)
    elif isinstance(current, float) and isinstance(value, (int, str)):
        try:
            value = float(value)   # YAML 1.1 reads '3e-4' as a string
        except ValueError:
            raise ValueError(f"{full}: expected a number, got {value!r}") from None
    elif current is not None and not isinstance(value, type(current)):
        raise ValueError(f"{full}: expected {type(current).__name__}, got {value!r}")
    return replace(obj, **{name: value})
