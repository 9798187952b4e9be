"""The one training loop, for every model and every task.

Seeded and deterministic on CPU; per-epoch ``metrics.jsonl``; validation every ``eval_every``
epochs; the best-on-validation checkpoint is the run folder itself (``model.safetensors`` +
``config.json``); ``last/`` holds the resumable state, rewritten atomically after every epoch.
Under torchrun each rank takes its slice of every global batch and only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..card import ModelCard
from ..config import RunConfig
from ..data.datasets import AVEData, Batches, auto_prefetch
from ..data.errors import DataError
from ..io import FolderLock, atomic_write, remove_stale_temporaries
from ..models.registry import build_model, complete_arguments, model_class
from ..tasks import build_task, check_model
from . import checkpoint
from .distributed import all_reduce_sum, barrier, broadcast_object, init_from_env, is_writer
from .evaluate import evaluate

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out_dir: Path
    best_epoch: int
    best_score: float
    selection_key: str
    best_metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def make_optimizer(params, config: RunConfig) -> torch.optim.Optimizer:
    o = config.optim
    params = list(params)
    if o.name in ("adam", "adamw"):
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        kw = dict(lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        # The fused kernel: one pass over every parameter instead of a dozen per-tensor ops
        # (A+V-att step on one CPU thread: +2% of the matmul rate). Same update up to float rounding.
        if _fusable(params):
            try:
                return cls(params, **kw, fused=True)
            except (RuntimeError, TypeError, ValueError):
                pass
        return cls(params, **kw)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=0.9, weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimizer {o.name!r} (adam | adamw | sgd)")


def _fusable(params) -> bool:
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return bool(flat) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in flat)


def make_schedule(optimizer, config: RunConfig, total_iters: int, iters_per_epoch: int):
    """The learning-rate factor per iteration: optional linear warm-up times the decay rule.

    ``multistep`` milestones count epochs (the reference scripts step their scheduler once per
    epoch); warm-up may be a fraction of the run, so one recipe fits any dataset size.
    """
    o = config.optim
    warm_iters = max(o.warmup_iters, round(o.warmup_fraction * total_iters))
    milestones = sorted(o.milestones)

    def factor(it: int) -> float:
        warm = min(1.0, (it + 1) / warm_iters) if warm_iters else 1.0
        if o.schedule == "step":
            return warm * o.gamma ** (it // o.step_every)
        if o.schedule == "multistep":
            epoch = it // max(1, iters_per_epoch)
            return warm * o.gamma ** sum(epoch >= m for m in milestones)
        if o.schedule == "cosine":
            # Decay over the iterations after warm-up, down to final_lr_fraction of the peak.
            t = min(1.0, max(0, it + 1 - warm_iters) / max(1, total_iters - warm_iters))
            return warm * (o.final_lr_fraction + (1 - o.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * t)))
        if o.schedule == "constant":
            return warm
        raise ValueError(f"unknown schedule {o.schedule!r} (step | multistep | cosine | constant)")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class WeightAverage:
    """An exponential moving average of the weights whose time constant is a fraction of the run.

    decay = 1 - 1 / (fraction x the run's iterations), capped by step / (step + 9) at the start so the
    initial weights fade out quickly; buffers are copied. The average is what is validated and saved.
    """

    def __init__(self, model: torch.nn.Module, fraction: float, total_iters: int):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay = 1.0 - 1.0 / max(1.0, fraction * total_iters)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold in ``model``'s weights after ``step`` optimizer steps (1, 2, ...)."""
        keep = min(self.decay, step / (step + 9))
        for avg, p in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(p, 1.0 - keep)
        for avg, b in zip(self.model.buffers(), model.buffers()):
            avg.copy_(b)


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def train(config: RunConfig, out_dir: str | Path, *, resume: bool = False, device: str = "cpu",
          progress: bool = True, callbacks: list[Callable[[dict], None]] = ()) -> TrainResult:
    """Train ``config.model`` on ``config.task``; returns the best-on-validation result.

    The run folder is locked while the run lives: a second ``train`` into it is refused.
    """
    config = config.validated()
    try:                                    # unknown constructor arguments: refused before the run folder exists
        complete_arguments(config.model, config.model_kwargs)
    except TypeError as e:
        raise ValueError(f"model_kwargs: {e}") from None
    device = check_device(device)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: --out is a file, not a run folder")
    # Only the writing process (rank 0 under torchrun) holds the run folder.
    lock = FolderLock(out_dir) if is_writer() else contextlib.nullcontext()
    try:
        with lock:
            return _train(config, out_dir, resume=resume, device=device, progress=progress, callbacks=callbacks)
    finally:
        torch.set_num_threads(threads)  # the process's setting is the caller's, not the run's


def check_device(device: str) -> str:
    """A torch device string this machine has, or a ValueError saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: only cpu, cuda and mps are supported")
    return str(dev)


def model_arguments_for(config: RunConfig, data_dims: dict) -> dict:
    """The model's constructor arguments: dimensions from the data, the rest from the config.

    A config that sets a data dimension to another value than the data has is refused (the one place
    ``visual_dim`` and friends are checked on their way from the arrays to the model).
    """
    def same(key, a, b) -> bool:
        return tuple(a) == tuple(b) if key == "grid" else a == b

    clash = {k: (v, data_dims[k]) for k, v in config.model_kwargs.items() if k in data_dims and not same(k, v, data_dims[k])}
    if clash:
        detail = "; ".join(f"{k}={a!r} but the data has {b!r}" for k, (a, b) in clash.items())
        raise ValueError(f"model_kwargs contradict the data: {detail} (drop them: dimensions come from the data)")
    try:
        return complete_arguments(config.model, {**config.model_kwargs, **data_dims})
    except TypeError as e:                  # an unknown constructor argument in model_kwargs
        raise ValueError(f"model_kwargs: {e}") from None


def _train(config: RunConfig, out_dir: Path, *, resume: bool, device: str, progress: bool,
           callbacks: list[Callable[[dict], None]]) -> TrainResult:
    dist = init_from_env(device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)

    data = AVEData.open(config.data.root, layout=config.data.layout)
    task = build_task(config)
    train_src = task.train_source(data, config)
    val_src = task.eval_source(data, config.data.val_split)
    check_model(task, model_class(config.model))
    kwargs = model_arguments_for(config, task.model_dims(data))
    model = build_model(config.model, **kwargs).to(device)
    net = DistributedDataParallel(model) if dist.world > 1 else model
    optimizer = make_optimizer(model.parameters(), config)
    if min(config.batch_size, len(train_src)) < dist.world:
        raise ValueError(f"batch size {config.batch_size} ({len(train_src)} training rows) is smaller than the "
                         f"{dist.world} processes: every process needs rows of every full batch")
    loader = Batches(train_src, config.batch_size, shuffle=config.shuffle, seed=config.seed,
                     drop_last=config.drop_last and len(train_src) >= config.batch_size,
                     rank=dist.rank, world=dist.world, pin_memory=str(device).startswith("cuda"),
                     prefetch=auto_prefetch(device))
    iters_per_epoch = len(loader)
    scheduler = make_schedule(optimizer, config, config.epochs * iters_per_epoch, iters_per_epoch)
    average = (WeightAverage(model, config.optim.ema_fraction, config.epochs * iters_per_epoch)
               if config.optim.ema_fraction else None)
    scored = average.model if average is not None else model     # the weights validated and saved

    history: list[dict] = []
    start_epoch, best_score, best_epoch, best_metrics = 0, -math.inf, -1, {}
    last = out_dir / "last"
    if dist.is_main:
        remove_stale_temporaries(out_dir)         # what a killed writer left (we hold the folder lock)
        remove_stale_temporaries(last)
    if resume:
        meta = checkpoint.load_training_state(last, model=model, optimizer=optimizer, scheduler=scheduler,
                                              average=None if average is None else average.model)
        if meta is None:
            log.warning("%s: nothing to resume, starting from scratch", last)
        else:
            if meta.get("config") != config.to_dict():
                raise ValueError(f"{last}: the run being resumed had another config; "
                                 "resume with the same options or use a new --out")
            start_epoch, best_score, best_epoch = meta["epoch"], meta["best_score"], meta["best_epoch"]
            best_metrics, history = meta.get("best_metrics", {}), meta.get("history", [])
            log.info("resumed %s at epoch %d (best %s %.4f at epoch %d)", out_dir, start_epoch,
                     task.selection_key, best_score, best_epoch)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "run.yaml", config.to_yaml())
        # metrics.jsonl restarts from the resumed history (empty for a fresh run): no lines of an
        # earlier run in the same folder, no duplicate of an epoch logged just before a kill.
        atomic_write(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    card = ModelCard(model=config.model, model_kwargs=kwargs, task=config.task, class_names=tuple(data.class_names),
                     feature_spec=data.store.spec, outputs=model_class(config.model).outputs,
                     run_config=config.to_dict())
    bar = _progress(range(start_epoch, config.epochs), progress and dist.is_main, config)
    placeholder = None
    for epoch in bar:
        t0 = time.perf_counter()
        loader.set_epoch(epoch)
        net.train()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for batch, global_size in loader:
            if batch:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                if placeholder is None and dist.world > 1:
                    placeholder = {k: v[:1].clone() for k, v in batch.items()}
                weight = dist.world / global_size
            else:
                # A short last batch left this rank no rows; it must still join DDP's gradient
                # all-reduce: a forward on one row it already saw, with zero weight.
                batch, weight = placeholder, 0.0
            terms = task.loss_terms(net, batch)                           # name -> [b], weighted
            per_video = sum(terms.values())                               # [b]
            # Sum over this rank's videos / global batch size, times world because DDP averages
            # gradients over ranks: every world size gives the one-process gradient exactly.
            loss = per_video.sum() * weight
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            if average is not None:
                average.update(model, scheduler.last_epoch)
            if weight:
                for name, term in (("train_loss", per_video), *terms.items()):
                    part = term.detach().double().sum()                   # no device sync per step
                    sums[name] = sums[name] + part if name in sums else part
                count += len(per_video)
        total = all_reduce_sum(dist, float(count))
        means = {name: all_reduce_sum(dist, float(v)) / max(1.0, total) for name, v in sums.items()}
        record = {"epoch": epoch + 1, "train_loss": means.pop("train_loss", 0.0),
                  "loss_terms": means, "lr": optimizer.param_groups[0]["lr"],
                  "train_seconds": round(time.perf_counter() - t0, 3)}
        if not math.isfinite(record["train_loss"]):
            # Name the row when the features are the cause; otherwise it is the optimisation.
            sources = getattr(train_src, "sources", [train_src])
            where = next((w for src in sources if hasattr(src, "first_nonfinite")
                          for w in [src.first_nonfinite()] if w), None)
            if where is not None:
                raise DataError(f"{where}; training stopped at epoch {epoch + 1} (its loss is not finite)")
            raise ValueError(f"training diverged at epoch {epoch + 1}: the loss is {record['train_loss']} "
                             "(the features are finite: lower optim.lr or set optim.grad_clip)")
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            improved = False
            if dist.is_main:
                t1 = time.perf_counter()
                val, _ = evaluate(scored, task, val_src, data.class_names, device=device)
                score = float(val[task.selection_key])
                record["val"] = _scalars(val)
                record["val_seconds"] = round(time.perf_counter() - t1, 3)
                if score >= best_score:  # on ties keep the later, longer-trained weights
                    best_score, best_epoch, best_metrics, improved = score, epoch + 1, _scalars(val), True
                    checkpoint.save(out_dir, scored, card.replace(training={
                        "epoch": epoch + 1, "selection": task.selection_key, "selection_score": score,
                        "selection_split": config.data.val_split, "val_metrics": best_metrics,
                        "segments": data.segments}))
            record["improved"] = broadcast_object(dist, improved)
        history.append(record)
        if dist.is_main:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            checkpoint.save_training_state(last, model=model, optimizer=optimizer, scheduler=scheduler, info={
                "epoch": epoch + 1, "best_score": best_score, "best_epoch": best_epoch,
                "best_metrics": best_metrics, "history": history, "config": config.to_dict()},
                average=None if average is None else average.model)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                                best=f"{best_score:.3f}" if best_epoch > 0 else "-")
        barrier(dist)
        for cb in callbacks:
            cb(record)
    return TrainResult(out_dir, best_epoch, best_score, task.selection_key, best_metrics, history)


def _progress(epochs, enabled: bool, config: RunConfig):
    if not enabled:
        return epochs

    return tqdm(epochs, desc=f"{config.model}/{config.task}", unit="epoch", dynamic_ncols=True)


def train_seeds(config: RunConfig, out_dir: str | Path, seeds: list[int], *, device: str = "cpu",
                progress: bool = True, resume: bool = False, report_splits=("val", "test")) -> dict:
    """Train one run per seed (``out_dir/seed-S``) and report mean ± std of each split's metrics.

    Selection is on validation inside each run; the test split is only *reported* here.
    """
    out_dir = Path(out_dir)
    per_seed = {}
    for seed in seeds:
        run = train(replace(config, seed=seed), out_dir / f"seed-{seed}", device=device, progress=progress,
                    resume=resume)
        model, _ = checkpoint.load(run.out_dir, map_location=device)
        data = AVEData.open(config.data.root, layout=config.data.layout)
        task = build_task(config)
        per_seed[seed] = {s: _scalars(evaluate(model, task, task.eval_source(data, s), data.class_names,
                                               device=device)[0]) for s in report_splits}
    summary: dict = {"seeds": seeds, "runs": {str(k): v for k, v in per_seed.items()}, "mean": {}, "std": {}}
    for split in report_splits:
        keys = per_seed[seeds[0]][split].keys()
        vals = {k: np.array([per_seed[s][split][k] for s in seeds], dtype=float) for k in keys}
        summary["mean"][split] = {k: float(v.mean()) for k, v in vals.items()}
        summary["std"][split] = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in vals.items()}
    atomic_write(out_dir / "seeds.json", json.dumps(summary, indent=2))
    return summary
