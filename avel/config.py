"""Typed run configuration: frozen dataclasses, recipes read from YAML in the package, ``a.b=c`` overrides.

A run is fully described by a :class:`RunConfig`. The dataclasses below are the schema (every key is
commented once, here); a recipe is a YAML file in ``avel/recipes/`` that sets some of those keys:
``<recipe>-<task>.yaml`` for every model, ``<recipe>-<task>-<model>.yaml`` for one model (the
follow-up models' ``paper`` recipes). Values are copied into a fresh frozen object every time, so
no mutable dict is ever shared between runs. A command line that contradicts itself (a ``--config``
file of task ``weak`` with ``--task supervised``, ``--epochs 5`` with ``--set epochs=9``) is refused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path

import yaml

TASKS = ("supervised", "weak", "cml")
DEFAULT_RECIPE = "modern"           # what `avel train` runs unless a recipe is named


class ConfigError(ValueError):
    """A run config, recipe or override that cannot be used; says which key and why."""


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"              # adam | adamw | sgd
    lr: float = 1e-3                # peak learning rate
    weight_decay: float = 0.0       # L2 (adam, sgd) or decoupled (adamw) weight decay
    betas: tuple[float, ...] = (0.9, 0.999)   # Adam/AdamW moment coefficients
    schedule: str = "step"          # step (x gamma every step_every iterations) | multistep (x gamma at
                                    # each epoch in milestones) | cosine | constant
    step_every: int = 15000         # iterations between x gamma decays (step)
    milestones: tuple[int, ...] = ()  # epochs after which the lr is multiplied by gamma (multistep)
    gamma: float = 0.1              # decay factor (step, multistep)
    warmup_iters: int = 0           # linear warm-up length in iterations (0 = none)
    warmup_fraction: float = 0.0    # linear warm-up as a fraction of the run's iterations (scales with the run)
    final_lr_fraction: float = 0.0  # cosine: the lr at the end, as a fraction of lr
    grad_clip: float = 0.0          # max total L2 norm of the gradients; 0 = off
    ema_fraction: float = 0.0       # validate and save an EMA of the weights, time constant this fraction of the run's iterations; 0 = off


@dataclass(frozen=True)
class DataConfig:
    root: str = ""                  # the AVE-layout folder
    layout: str = "auto"            # auto | h5 | packed
    train_split: str = "train"      # split trained on
    val_split: str = "val"          # split the checkpoint is selected on (never test)
    background: tuple[str, ...] = ()   # extra background-only feature folders (weak task)
    official_background: bool = True  # use *_noisy.h5 in the data root when present (weak task)


@dataclass(frozen=True)
class RunConfig:
    model: str = "av_att"           # registered model name
    task: str = "supervised"        # supervised | weak | cml
    recipe: str = "original"        # the recipe this config came from (recorded, not read)
    epochs: int = 300               # passes over the training rows
    batch_size: int = 64            # videos (or cml pairs) per step
    drop_last: bool = False         # drop the last partial batch of each epoch (as some reference scripts)
    loss: str = "softmax_mlsm"      # task loss for models without their own terms: softmax_mlsm (2018) | ce
    label_smoothing: float = 0.0    # ce only: weight of the uniform distribution mixed into the one-hot target
    loss_weights: dict = field(default_factory=dict)   # weights of a model's named loss terms (over its defaults)
    shuffle: bool = False           # reshuffle the training rows every epoch
    eval_every: int = 5             # validate every N epochs (and after the last)
    seed: int = 0                   # seeds torch, numpy and the shuffling
    selection: str = "default"      # task-specific: weak -> 'video' (default) or 'segment'
    margin: float = 2.0             # contrastive margin (cml)
    threads: int = 0                # torch threads; 0 = torch default
    model_kwargs: dict = field(default_factory=dict)   # model hyper-parameters (data dimensions come from the data)
    fixes: tuple[str, ...] = ()     # where this recipe departs from its source on purpose (recorded in the run)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d, *, where: str = "config") -> RunConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping of config keys, got {type(d).__name__}")
        d = dict(d)
        sections = {"optim": OptimConfig, "data": DataConfig}
        parts = {}
        for name in sections:
            value = d.pop(name, None) or {}
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name} must be a mapping, got {type(value).__name__}")
            parts[name] = value
        config = cls()
        for prefix, values in (("", d), ("optim.", parts["optim"]), ("data.", parts["data"])):
            for key, value in values.items():
                config = _set(config, (prefix + str(key)).split("."), value, prefix + str(key), where)
        return config.validated(where)

    def validated(self, where: str = "config") -> RunConfig:
        """Refuse values no run can use (checked once, wherever the config came from)."""
        checks = [
            (self.task in TASKS, "task", f"one of {', '.join(TASKS)}"),
            (self.epochs >= 1, "epochs", "at least 1"),
            (self.batch_size >= 1, "batch_size", "at least 1"),
            (self.eval_every >= 1, "eval_every", "at least 1"),
            (self.threads >= 0, "threads", "0 (torch default) or a positive count"),
            (self.loss in ("softmax_mlsm", "ce", "contrastive"), "loss", "softmax_mlsm, ce or contrastive"),
            (self.optim.name in ("adam", "adamw", "sgd"), "optim.name", "adam, adamw or sgd"),
            (self.optim.schedule in ("step", "multistep", "cosine", "constant"), "optim.schedule",
             "step, multistep, cosine or constant"),
            (self.optim.lr > 0, "optim.lr", "positive"),
            (self.optim.step_every >= 1, "optim.step_every", "at least 1"),
            (0 <= self.optim.warmup_fraction < 1, "optim.warmup_fraction", "in [0, 1)"),
            (self.optim.warmup_iters >= 0, "optim.warmup_iters", "0 or more"),
            (self.optim.grad_clip >= 0, "optim.grad_clip", "0 (off) or positive"),
            (0 <= self.optim.ema_fraction <= 1, "optim.ema_fraction", "in [0, 1] (0 = off)"),
            (0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)"),
            (self.label_smoothing == 0 or self.loss == "ce", "label_smoothing", "0 unless loss is ce"),
            (self.data.layout in ("auto", "h5", "packed"), "data.layout", "auto, h5 or packed"),
            (self.data.val_split != "test", "data.val_split", "a validation split: selecting on test is refused"),
        ]
        for ok, key, want in checks:
            if not ok:
                raise ConfigError(f"{where}: {key} must be {want}, got {_value(self, key)!r}")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot be read ({e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
        return cls.from_dict(raw or {}, where=str(path))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _value(config, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


# --- recipes: YAML files in avel/recipes (package data, shipped in the wheel) ---------------------

def _recipe_files() -> dict[str, str]:
    return {p.name[: -len(".yaml")]: p.name for p in files("avel").joinpath("recipes").iterdir()
            if p.name.endswith(".yaml")}


def available_recipes() -> list[str]:
    """Recipe names (``original``, ``modern``, ``paper``, ...)."""
    return sorted({stem.split("-")[0] for stem in _recipe_files()})


def recipe_file(name: str, task: str, model: str | None = None) -> str | None:
    """The YAML file of ``name`` for ``task`` (and ``model`` where the recipe is model-specific)."""
    known = _recipe_files()
    for stem in ((f"{name}-{task}-{model}",) if model else ()) + (f"{name}-{task}",):
        if stem in known:
            return known[stem]
    return None


def recipe(name: str, task: str = "supervised", model: str | None = None) -> RunConfig:
    """A fresh :class:`RunConfig` of recipe ``name`` for ``task`` (and ``model``, if the recipe names one)."""
    if name not in available_recipes():
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(available_recipes())}")
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    found = recipe_file(name, task, model)
    if found is None:
        models = sorted(s.split("-", 2)[2] for s in _recipe_files() if s.startswith(f"{name}-{task}-"))
        hint = f" (it exists for {', '.join(models)})" if models else ""
        who = f" and model {model!r}" if model else ""
        raise ConfigError(f"recipe {name!r} has no preset for task {task!r}{who}{hint}")
    text = files("avel").joinpath("recipes", found).read_text()
    config = RunConfig.from_dict(yaml.safe_load(text) or {}, where=f"avel/recipes/{found}")
    if model is not None and config.model != model:
        if found.count("-") >= 2:                 # a model's own recipe names that model
            raise ConfigError(f"recipe {name!r} for {model!r} is written for model {config.model!r}")
        config = replace(config, model=model)
    return config


# --- overrides ---------------------------------------------------------------------------------

def apply_overrides(config: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """Apply ``key=value`` / ``section.key=value`` strings (values parsed as YAML scalars)."""
    seen: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key in seen and seen[key] != raw:
            raise ConfigError(f"--set {key} is given twice ({seen[key]!r} and {raw!r})")
        seen[key] = raw
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        config = _set(config, key.split("."), value, key, "--set")
    return config.validated("--set")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _set(obj, parts: list[str], value, full: str, where: str):
    name = parts[0]
    if name in ("model_kwargs", "loss_weights") and isinstance(obj, RunConfig):
        if len(parts) == 1:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {full} must be a mapping, got {value!r}")
            return replace(obj, **{name: dict(value)})
        if len(parts) == 2:
            if name == "loss_weights":
                value = _number(value, full, where)
            return replace(obj, **{name: {**getattr(obj, name), parts[1]: value}})
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields:
        raise ConfigError(f"{where}: unknown config key {full!r} (known here: {', '.join(fields)})")
    if len(parts) > 1:
        sub = getattr(obj, name)
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"{where}: {'.'.join(full.split('.')[:-1])} has no sub-keys")
        return replace(obj, **{name: _set(sub, parts[1:], value, full, where)})
    current = getattr(obj, name)
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"{where}: {full} is a section; set its keys ({full}.KEY=VALUE)")
    return replace(obj, **{name: _coerce(current, value, full, where, str(fields[name].type))})


def _coerce(current, value, full: str, where: str, annotation: str = ""):
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE + _FALSE:
            return str(value).lower() in _TRUE
        raise ConfigError(f"{where}: {full} must be true or false, got {value!r}")
    if isinstance(current, tuple):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v != ""]
        if annotation.startswith(("tuple[int", "tuple[float")):
            return tuple(_number(v, full, where, int_only=annotation.startswith("tuple[int")) for v in items)
        return tuple(str(v) for v in items)
    if isinstance(current, float):
        return _number(value, full, where)
    if isinstance(current, int):
        return _number(value, full, where, int_only=True)
    if isinstance(current, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {full} must be a mapping, got {value!r}")
        return dict(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {full} must be a string, got {value!r}")
    return value


def _number(value, full: str, where: str, *, int_only: bool = False):
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {full} must be a number, got {value!r}")
    try:
        number = float(value)               # YAML 1.1 reads '3e-4' (no dot) as a string
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {full} must be a number, got {value!r}") from None
    if int_only:
        if not number.is_integer():
            raise ConfigError(f"{where}: {full} must be a whole number, got {value!r}")
        return int(number)
    return number


# --- the command line's view: one function resolves recipe, file, flags and --set -----------------

_FLAG_KEYS = {"epochs": "epochs", "batch_size": "batch_size", "seed": "seed", "selection": "selection",
              "background": "data.background", "official_background": "data.official_background",
              "data_root": "data.root", "layout": "data.layout", "threads": "threads"}


def resolve_run_config(*, config_file: str | Path | None = None, recipe_name: str | None = None,
                       task: str | None = None, model: str | None = None, overrides=(), **flags) -> RunConfig:
    """The run config of ``avel train``: a recipe (or a config file), then flags, then ``--set``.

    A flag left at None is unset. A flag that contradicts the config file, or a ``--set`` of the same
    key, is refused with a :class:`ConfigError`; nothing is silently dropped.
    """
    unknown = sorted(set(flags) - set(_FLAG_KEYS))
    if unknown:
        raise ConfigError(f"unknown run option(s) {unknown}")
    if config_file is not None:
        config = RunConfig.from_yaml(config_file)
        for flag, value, key in (("--recipe", recipe_name, "recipe"), ("--task", task, "task"),
                                 ("--model", model, "model")):
            if value is not None and value != getattr(config, key):
                raise ConfigError(f"{flag} {value} contradicts {config_file} ({key}: {getattr(config, key)}); "
                                  f"drop {flag} or edit the file")
    else:
        # No recipe named: the recommended one (``original`` stays the 2018 protocol, by name).
        config = recipe(recipe_name or DEFAULT_RECIPE, task or "supervised", model)
        if model is not None:
            config = replace(config, model=model)
    set_keys = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    for flag, value in flags.items():
        if value is None:
            continue
        key = _FLAG_KEYS[flag]
        if key in set_keys:
            raise ConfigError(f"--{flag.replace('_', '-')} and --set {key} both set {key}; give it once")
        if flag == "background":
            value = tuple(str(v) for v in value)
            if not value:
                continue
        config = _set(config, key.split("."), str(value) if flag == "data_root" else value, key,
                      f"--{flag.replace('_', '-')}")
    return apply_overrides(config, list(overrides))
