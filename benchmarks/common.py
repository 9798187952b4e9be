"""Shared pieces of the benchmark scripts: threads, clocks, the matmul reference rate, analytic
FLOP counts of every model, peak resident memory, AVE-shaped random batches.

Conventions (printed by every script that uses them):

* **Matmul rate**: float32 ``torch.mm`` of two 2048x2048 matrices into a preallocated output,
  measured in the same process, interleaved with the thing being timed (one matmul sample per
  round), so a busy machine slows both alike. Fractions are medians of per-round ratios.
* **Clock**: at one thread, the thread's own CPU time (``time.thread_time``): immune to other
  processes taking the core. At several threads, wall time (``time.perf_counter``).
* **FLOPs** are counted analytically, multiply-add = 2: a Linear layer is ``2*in*out`` per row; an
  LSTM ``2*4h*(in+h)`` per time step and direction; the attention's batched products
  ``2*49*Dv`` (attended) and ``2*49*49`` (affine_h) per segment. Training = forward x3 (forward,
  gradient of the input, gradient of the weights), except that nothing computes the gradient of the
  *data*: layers fed directly by features (affine_video, affine_audio, the LSTM input weights of
  the audio / grid-mean visual streams, the attended sum's regions) count x2 for those terms. This
  is the work that actually runs; the plain "x3 everything" count is printed beside it.
  Elementwise work (activations, softmax, loss, optimizer) is not counted: it is overhead.
  Models without an analytic count here (the follow-up models) are **counted** instead:
  :func:`counted_flops` runs one real forward + loss + backward under
  ``torch.utils.flop_counter.FlopCounterMode`` (matrix products as dispatched, plus the fused LSTM
  kernels, which the stock counter skips). Autograd computes no gradient of the input data, so the
  backward part is the weights' gradients and the activation gradients on the way to them, as they
  actually run; the one exception is the CPU (oneDNN) LSTM kernel, whose backward always computes
  its input's gradient and is counted because it runs.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

AVE = {"T": 10, "grid": (7, 7), "visual_dim": 512, "audio_dim": 128, "classes": 29}
MODELS = ("audio", "visual", "visual_att", "av", "av_att", "dmrn")


# --- threads, clocks ------------------------------------------------------------------------------

def all_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(n: int) -> int:
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def clock_for(threads: int):
    """Thread CPU time at one thread (robust to neighbours), wall time otherwise."""
    return time.thread_time if threads == 1 else time.perf_counter


def clock_name(threads: int) -> str:
    return "thread CPU time" if threads == 1 else "wall time"


def median(xs) -> float:
    return float(statistics.median(xs))


# --- the matmul reference ---------------------------------------------------------------------------

class MatmulRate:
    """float32 (or ``dtype``) 2048^3 matmul into a preallocated output; ``sample()`` returns FLOP/s of one call."""

    def __init__(self, n: int = 2048, device: str = "cpu", dtype: torch.dtype = torch.float32):
        g = torch.Generator().manual_seed(0)
        self.n = n
        self.device = device
        self.a = torch.randn(n, n, generator=g).to(device, dtype)
        self.b = torch.randn(n, n, generator=g).to(device, dtype)
        self.c = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(self.a, self.b, out=self.c)

    def sample(self, clock=time.perf_counter, calls: int = 2) -> float:
        """Best of ``calls`` timed calls (GEMM speed itself does not vary; interruptions do)."""
        best = float("inf")
        for _ in range(calls):
            sync(self.device)
            t = clock()
            torch.mm(self.a, self.b, out=self.c)
            sync(self.device)
            best = min(best, clock() - t)
        return 2 * self.n ** 3 / best


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# --- analytic FLOPs ---------------------------------------------------------------------------------

@dataclass
class Flops:
    forward: float = 0.0
    train: float = 0.0            # what runs: forward + backward, no gradient of the data
    train_x3: float = 0.0         # the plain 3 x forward convention

    def __add__(self, o: Flops) -> Flops:
        return Flops(self.forward + o.forward, self.train + o.train, self.train_x3 + o.train_x3)


def linear(rows: int, d_in: int, d_out: int, *, grad_input: bool = True) -> Flops:
    f = 2.0 * rows * d_in * d_out
    return Flops(f, f * (3 if grad_input else 2), 3 * f)


def lstm(seqs: int, steps: int, d_in: int, hidden: int, *, bidirectional: bool = True,
         grad_input: bool = True) -> Flops:
    dirs = 2 if bidirectional else 1
    per = seqs * steps * dirs
    f_in, f_h = 2.0 * 4 * hidden * d_in * per, 2.0 * 4 * hidden * hidden * per
    f = f_in + f_h
    return Flops(f, f_in * (3 if grad_input else 2) + 3 * f_h, 3 * f)


def attention(segments: int, regions: int, audio_dim: int, visual_dim: int, hidden: int = 512) -> Flops:
    rows = segments * regions
    f = (linear(rows, visual_dim, hidden, grad_input=False)          # affine_video on raw regions
         + linear(rows, hidden, regions)                              # affine_v
         + linear(segments, audio_dim, hidden, grad_input=False)     # affine_audio on raw audio
         + linear(segments, hidden, regions)                          # affine_g
         + linear(rows, regions, 1))                                  # affine_h
    att = 2.0 * segments * regions * visual_dim                       # alpha @ regions
    return f + Flops(att, 2 * att, 3 * att)                           # regions need no gradient


def head(rows: int, d_in: int, hidden: int = 64, classes: int = 29) -> Flops:
    return linear(rows, d_in, hidden) + linear(rows, hidden, classes)


def model_flops(name: str, *, videos: int = 1, T: int = 10, grid=(7, 7), audio_dim: int = 128,
                visual_dim: int = 512, classes: int = 29, hidden: int = 128) -> Flops:
    """FLOPs of one forward / training step of ``videos`` videos for the registered model ``name``."""
    seg, regions = videos * T, grid[0] * grid[1]
    att = attention(seg, regions, audio_dim, visual_dim)
    lstm_a = lstm(videos, T, audio_dim, hidden, grad_input=False)
    lstm_v_data = lstm(videos, T, visual_dim, hidden, grad_input=False)     # grid mean of data
    lstm_v_att = lstm(videos, T, visual_dim, hidden, grad_input=True)       # attended: needs grad
    if name == "audio":
        return lstm_a + head(seg, 2 * hidden, classes=classes)
    if name == "visual":
        return lstm_v_data + head(seg, 2 * hidden, classes=classes)
    if name == "visual_att":
        return att + lstm_v_att + head(seg, 2 * hidden, classes=classes)
    if name == "av":
        return lstm_a + lstm_v_data + head(seg, 4 * hidden, classes=classes)
    if name == "av_att":
        return att + lstm_a + lstm_v_att + head(seg, 4 * hidden, classes=classes)
    if name == "dmrn":
        fuse = linear(seg, 2 * hidden, 2 * hidden)
        fuse = fuse + fuse + fuse + fuse                                       # U_v, U_a: 2 layers each
        return att + lstm_a + lstm_v_att + fuse + linear(seg, 2 * hidden, classes)
    raise ValueError(f"no FLOP count for model {name!r}")


def has_analytic_flops(name: str) -> bool:
    return name in MODELS


# --- counted FLOPs ----------------------------------------------------------------------------------
# FlopCounterMode counts mm / addmm / bmm / baddbmm (and their out= forms, same op packet) but not the
# in-place addmm_ / baddbmm_ (the fused attention's backward accumulates with them) nor the fused RNN
# kernels (oneDNN on CPU, cuDNN on GPU), which would leave every LSTM at zero. Formulas for those:

def _bind(op, args, kwargs) -> dict:
    """Arguments of an aten call by schema name."""
    names = [a.name for a in op._schema.arguments]
    return {**dict(zip(names, args)), **kwargs}


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]              # time steps x sequences (padded or packed alike)


def _mkldnn_rnn_layer(*args, out_val=None, **kwargs) -> int:
    # One layer, one direction: weight0 [G*h, in], weight1 [G*h, h]; 2*G*h*(in+h) per row.
    a = _bind(torch.ops.aten.mkldnn_rnn_layer.default, args, kwargs)
    return 2 * _rows(a["input"]) * (a["weight0"].numel() + a["weight1"].numel())


def _mkldnn_rnn_layer_backward(*args, out_val=None, **kwargs) -> int:
    # Weight gradients (= forward) + the recurrent and input gradients (= forward again): the
    # kernel has no output mask and always computes d input, so it is counted.
    a = _bind(torch.ops.aten.mkldnn_rnn_layer_backward.default, args, kwargs)
    return 4 * _rows(a["input"]) * (a["weight1"].numel() + a["weight2"].numel())


def _cudnn_weights(weight) -> int:
    return sum(w.numel() for w in weight if w.dim() == 2)      # every layer and direction (+ projections)


def _cudnn_rnn(*args, out_val=None, **kwargs) -> int:
    a = _bind(torch.ops.aten._cudnn_rnn.default, args, kwargs)
    return 2 * _rows(a["input"]) * _cudnn_weights(a["weight"])


def _cudnn_rnn_backward(*args, out_val=None, **kwargs) -> int:
    # Backward data (always: the layers and time steps chain through it) + weights when requested.
    a = _bind(torch.ops.aten._cudnn_rnn_backward.default, args, kwargs)
    f = 2 * _rows(a["input"]) * _cudnn_weights(a["weight"])
    return f * (2 if a["output_mask"][3] else 1)


def _addmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _baddbmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


for _f in (_mkldnn_rnn_layer, _mkldnn_rnn_layer_backward, _cudnn_rnn, _cudnn_rnn_backward):
    _f._get_raw = True                        # FlopCounterMode: pass tensors and ints, not shapes


def extra_flop_formulas() -> dict:
    aten = torch.ops.aten
    return {aten.addmm_: _addmm_, aten.baddbmm_: _baddbmm_,
            aten.mkldnn_rnn_layer: _mkldnn_rnn_layer, aten.mkldnn_rnn_layer_backward: _mkldnn_rnn_layer_backward,
            aten._cudnn_rnn: _cudnn_rnn, aten._cudnn_rnn_backward: _cudnn_rnn_backward}


def counted_flops(forward_loss, backward=None) -> Flops:
    """FLOPs of one real step, counted: ``forward_loss()`` returns the loss; its backward follows.

    ``forward`` is the forward + loss; ``train`` adds the backward as it ran; ``train_x3`` is 3 x forward.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())
    with counter:
        loss = forward_loss()
        fwd = counter.get_total_flops()
        (backward or (lambda loss_: loss_.backward()))(loss)
        total = counter.get_total_flops()
    return Flops(float(fwd), float(total), 3.0 * fwd)


def segment_models() -> list[str]:
    """Every registered model that returns segment scores (trains in the supervised / weak tasks)."""
    import avel
    from avel.models import model_class

    return [n for n in avel.available_models() if "segment_scores" in model_class(n).outputs]


def model_tasks(name: str) -> tuple[str, ...]:
    """The tasks a registered model trains in (its class's ``tasks``; the registry's default otherwise)."""
    from avel.models import model_class

    cls = model_class(name)
    return tuple(getattr(cls, "tasks", ("supervised", "weak") if "segment_scores" in cls.outputs else ("cml",)))


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- memory -----------------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB).

    ``VmHWM`` of /proc/self/status where there is one: the high-water mark of this process's own
    address space. ``getrusage(RUSAGE_SELF).ru_maxrss`` is the fallback, and the same number for a
    process started from a small parent; but Linux carries ru_maxrss across fork/exec, so a child
    of a big parent reports at least the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return getrusage_peak_mb()


def getrusage_peak_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


# --- batches, environment ---------------------------------------------------------------------------

def ave_batch(batch: int, *, T: int = 10, grid=(7, 7), audio_dim: int = 128, visual_dim: int = 512,
              classes: int = 29, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A random AVE-shaped supervised batch (non-negative features like pool5 / VGGish)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(batch, T, classes)
    target.scatter_(2, torch.randint(0, classes, (batch, T, 1), generator=g), 1.0)
    return {"audio": torch.rand(batch, T, audio_dim, generator=g).to(device),
            "visual": torch.rand(batch, T, *grid, visual_dim, generator=g).to(device),
            "target": target.to(device), "video_label": target.amax(1).to(device),
            "index": torch.arange(batch, device=device)}


def environment() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "cores": all_threads(), "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "")}


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def print_header(title: str) -> None:
    env = environment()
    print(f"# {title}")
    print(f"# reproduce: {command_line()}")
    print(f"# torch {env['torch']}, {env['cpu']}, {env['cores']} cores, load avg {env['load_avg']}")


def run_child(args: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run ``python args...`` in a fresh process; it prints one JSON line last; return it."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns = (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns) + " |"
            for r in rows]
    return "\n".join([head, sep, *body])
