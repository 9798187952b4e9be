"""Audio-guided visual attention, in the exact form of the official AVE code.

For each one-second segment the audio feature scores the H*W visual regions; the attended
visual vector is the softmax-weighted sum of the *raw* region features. Parameter names
(affine_audio, affine_video, affine_v, affine_g, affine_h) follow the official ``att_Net`` so
that its checkpoints load by name.

Speed (CPU, float32): the region projection ``affine_v(relu(affine_video(V)))`` is ~90% of the
A+V-att FLOPs and its [B*T*H*W, 512] activations are 64 MB per AVE batch of 64. Written as
separate modules, every step allocates four such blocks (pre-activation, ReLU output and two
gradients), each a fresh memory mapping whose pages fault in on first touch, and streams them
through memory several times. Here the region part runs as one autograd function
(:class:`_AttendFunction`) over chunks of whole segments (~1024 rows): projection, ReLU, scores,
tanh, ``affine_h``, softmax and the attended sum are done per chunk while its rows are in cache; the
only large tensor kept for backward is the ReLU output, in a buffer reused from step to step
(:class:`Workspace`); backward walks the same chunks. One CPU thread, B=64: the training step goes
from ~56% to ~75% of the float32 matmul rate (``benchmarks/train_step.py --reference``).
Forward values match the plain modules to float rounding (~1e-7); gradients differ only in
summation order. GPUs, other dtypes, autocast and ``torch.compile`` take the plain modules
(:meth:`AudioGuidedAttention.reference`), which is also the official code line by line.
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

# Rows of the region matrix per chunk (rounded down to whole segments): big enough for efficient
# GEMMs, small enough (1024 x 512 float32 = 2 MB) to stay in cache between the chunk's steps.
CHUNK_ROWS = 1024


class Workspace:
    """One reusable buffer for the ReLU outputs that backward needs.

    A fresh [B*T*H*W, hidden] block per step is a new memory mapping on most allocators, and
    faulting its pages in costs about a tenth of an A+V-att step on CPU. The buffer is reused only
    when nothing else references its storage any more (the previous step's backward released it);
    otherwise a new one is made, so a retained graph, a second forward before backward or another
    thread never has its saved values overwritten.
    """

    def __init__(self):
        self._buf: torch.Tensor | None = None
        self._lock = threading.Lock()

    def take(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        with self._lock:
            buf = self._buf
            if (buf is None or buf.numel() < rows * cols or buf.dtype != like.dtype
                    or buf.device != like.device or not _unshared(buf)):
                buf = self._buf = like.new_empty(rows * cols)
            return buf[:rows * cols].view(rows, cols)        # a view: holds the storage until freed

    def clear(self) -> None:
        with self._lock:
            self._buf = None

    def __deepcopy__(self, memo):
        return Workspace()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def _storage_refs(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


try:                                    # private API: without it the buffer is simply never reused
    _ALONE = _storage_refs(torch.empty(1))          # the count of a storage with one tensor on it
except (AttributeError, RuntimeError):
    _ALONE = None


def _unshared(t: torch.Tensor) -> bool:
    """True when ``t`` is the only tensor referencing its storage."""
    return _ALONE is not None and _storage_refs(t) == _ALONE


def _attend(x, g, weight, bias, score_weight, h_weight, hidden_out):
    """The chunked forward. x [S*R, Dv] regions, g [S, R] audio guidance.

    Returns attended [S, Dv], alpha [S, R] and tanh values [S, R, R]. The ReLU outputs go to
    ``hidden_out`` [S*R, hidden] when given, else to one chunk-sized scratch buffer (inference).
    """
    S, R = g.shape
    seg = max(1, CHUNK_ROWS // R)                    # segments per chunk
    wt, vt, ht = weight.t(), score_weight.t(), h_weight.t()
    scratch = hidden_out if hidden_out is not None else x.new_empty((min(S, seg) * R, weight.shape[0]))
    t = x.new_empty((S, R, score_weight.shape[0]))
    z = x.new_empty((S, R))
    attended = x.new_empty((S, x.shape[1]))
    for s0 in range(0, S, seg):
        s1 = min(S, s0 + seg)
        rows = slice(s0 * R, s1 * R)
        hc = hidden_out[rows] if hidden_out is not None else scratch[:(s1 - s0) * R]
        torch.addmm(bias, x[rows], wt, out=hc)                                # affine_video
        hc.clamp_min_(0)                                                      # relu
        tc = t[s0:s1]
        torch.mm(hc, vt, out=tc.view(-1, tc.shape[-1]))                       # affine_v
        tc.add_(g[s0:s1].unsqueeze(2)).tanh_()                                # tanh(s + g[:, :, None])
        torch.mm(tc.view(-1, tc.shape[-1]), ht, out=z[s0:s1].view(-1, 1))     # affine_h
    alpha = torch.softmax(z, dim=-1)
    for s0 in range(0, S, seg):
        s1 = min(S, s0 + seg)
        torch.bmm(alpha[s0:s1].unsqueeze(1), x[s0 * R:s1 * R].view(s1 - s0, R, -1),
                  out=attended[s0:s1].unsqueeze(1))                           # alpha @ regions
    return attended, alpha, t


class _AttendFunction(torch.autograd.Function):
    """(x, g, affine_video.weight/bias, affine_v.weight, affine_h.weight) -> (attended, alpha)."""

    @staticmethod
    def forward(ctx, x, g, weight, bias, score_weight, h_weight, workspace):
        h = workspace.take(x.shape[0], weight.shape[0], x)
        attended, alpha, t = _attend(x, g, weight, bias, score_weight, h_weight, h)
        ctx.save_for_backward(x, weight, score_weight, h_weight, h, t, alpha)
        return attended, alpha

    @staticmethod
    def backward(ctx, grad_attended, grad_alpha_out):
        x, weight, score_weight, h_weight, h, t, alpha = ctx.saved_tensors
        need_x, need_g, need_w, need_b, need_v, need_h, _ = ctx.needs_input_grad
        S, R = alpha.shape
        seg = max(1, CHUNK_ROWS // R)
        grad_attended = grad_attended.contiguous()
        regions = x.view(S, R, -1)
        # d alpha: from the attended sum (alpha @ regions) and from alpha itself.
        grad_alpha = torch.bmm(grad_attended.unsqueeze(1), regions.transpose(1, 2)).squeeze(1)
        if grad_alpha_out is not None:
            grad_alpha += grad_alpha_out
        grad_z = torch._softmax_backward_data(grad_alpha, alpha, -1, alpha.dtype)     # [S, R]
        grad_h = grad_z.view(1, -1).mm(t.view(-1, t.shape[-1])) if need_h else None  # affine_h weight
        grad_g = x.new_empty((S, R)) if need_g else None
        grad_x = None
        if need_x:
            grad_x = torch.bmm(alpha.unsqueeze(2), grad_attended.unsqueeze(1)).view_as(x)
        grad_w = weight.new_zeros(weight.shape) if need_w else None
        grad_b = weight.new_zeros(weight.shape[0]) if need_b else None
        grad_v = score_weight.new_zeros(score_weight.shape) if need_v else None
        hw = h_weight.view(1, 1, -1)
        scratch = None
        for s0 in range(0, S, seg):
            s1 = min(S, s0 + seg)
            rows = slice(s0 * R, s1 * R)
            tc = t[s0:s1]
            # through affine_h and tanh: d pre = (dz * w_h) * (1 - t^2), as tanh_backward computes it.
            grad_pre = torch.ops.aten.tanh_backward(grad_z[s0:s1].unsqueeze(2) * hw, tc)      # [k, R, R]
            if need_g:
                torch.sum(grad_pre, dim=2, out=grad_g[s0:s1])
            gs = grad_pre.view(-1, grad_pre.shape[-1])                             # d scores [k*R, R]
            hc = h[rows]
            if need_v:
                grad_v.addmm_(gs.t(), hc)
            if not (need_x or need_w or need_b):
                continue
            if scratch is None:
                scratch = h.new_empty((min(S, seg) * R, h.shape[1]))
            gh = torch.mm(gs, score_weight, out=scratch[:gs.shape[0]])              # d relu output
            torch.ops.aten.threshold_backward.grad_input(gh, hc, 0, grad_input=gh)  # relu backward, in place
            if need_w:
                grad_w.addmm_(gh.t(), x[rows])
            if need_b:
                grad_b += gh.sum(0)
            if need_x:
                grad_x[rows].addmm_(gh, weight)
        return grad_x, grad_g, grad_w, grad_b, grad_v, grad_h, None


class AudioGuidedAttention(nn.Module):
    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, hidden: int = 512, regions: int = 49):
        super().__init__()
        self.affine_audio = nn.Linear(audio_dim, hidden)
        self.affine_video = nn.Linear(visual_dim, hidden)
        self.affine_v = nn.Linear(hidden, regions, bias=False)
        self.affine_g = nn.Linear(hidden, regions, bias=False)
        self.affine_h = nn.Linear(regions, 1, bias=False)
        for layer in (self.affine_audio, self.affine_video, self.affine_v, self.affine_g, self.affine_h):
            nn.init.xavier_uniform_(layer.weight)
        self._workspace = Workspace()

    def train(self, mode: bool = True):
        if not mode:
            self._workspace.clear()           # inference keeps no activations: give the buffer back
        return super().train(mode)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, T, Da], visual [B, T, H, W, Dv] -> attended [B, T, Dv], alpha [B, T, H, W]."""
        if not self._fast_path(visual):
            return self.reference(audio, visual)
        B, T, H, W, Dv = visual.shape
        h_a = F.relu(self.affine_audio(audio.reshape(B * T, -1)))       # [BT, hidden]
        g = self.affine_g(h_a)                                          # [BT, 49]
        x = visual.reshape(B * T * H * W, Dv).contiguous()
        args = (self.affine_video.weight, self.affine_video.bias, self.affine_v.weight, self.affine_h.weight)
        if torch.is_grad_enabled() and (x.requires_grad or g.requires_grad or any(a.requires_grad for a in args)):
            attended, alpha = _AttendFunction.apply(x, g, *args, self._workspace)
        else:
            attended, alpha, _ = _attend(x, g, *args, None)
        return attended.view(B, T, Dv), alpha.view(B, T, H, W)

    def _fast_path(self, visual: torch.Tensor) -> bool:
        return (visual.device.type == "cpu" and visual.dtype == torch.float32 and self.affine_video.bias is not None
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())

    def reference(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain-module form (the official code line by line); the fused path computes the same."""
        B, T, H, W, Dv = visual.shape
        regions = visual.reshape(B * T, H * W, Dv)                      # [BT, 49, Dv] raw regions V
        h_v = F.relu(self.affine_video(regions))                        # [BT, 49, hidden]
        h_a = F.relu(self.affine_audio(audio.reshape(B * T, -1)))       # [BT, hidden]
        s = self.affine_v(h_v)                                          # [BT, 49, 49]
        g = self.affine_g(h_a)                                          # [BT, 49]
        # The official code adds g[:, :, None]: entry i of g goes to every element of row i
        # (region i), not per hidden unit as the paper's equation reads. Checkpoints depend on it.
        z = self.affine_h(torch.tanh(s + g.unsqueeze(2))).squeeze(2)    # [BT, 49]
        alpha = F.softmax(z, dim=-1)                                    # [BT, 49]
        attended = torch.bmm(alpha.unsqueeze(1), regions).squeeze(1)    # [BT, Dv]
        return attended.view(B, T, Dv), alpha.view(B, T, H, W)
