"""Audio-guided visual attention, in the exact form of the official AVE code.

For each one-second segment the audio feature scores the H*W visual regions; the attended
visual vector is the softmax-weighted sum of the *raw* region features. Parameter names
(affine_audio, affine_video, affine_v, affine_g, affine_h) follow the official ``att_Net`` so
that its checkpoints load by name.

Speed: the region projection ``affine_v(relu(affine_video(V)))`` is ~90% of the A+V-att FLOPs.
It runs as one autograd function over row chunks (:class:`_RegionScores`), so the only
[B*T*H*W, hidden] tensor made is the ReLU output that backward needs: no separate pre-activation,
ReLU-gradient or hidden-gradient tensors (each a fresh 64 MB allocation per AVE batch of 64), and
each chunk is still in cache when ``affine_v`` reads it. Same arithmetic as the plain modules;
gradients differ only in float summation order.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Rows of the region matrix handled per chunk: big enough for efficient GEMMs, small enough
# (1024 x 512 float32 = 2 MB) that the chunk of hidden activations is still in cache for affine_v.
CHUNK_ROWS = 1024


class _RegionScores(torch.autograd.Function):
    """s = relu(x @ weight.T + bias) @ score_weight.T for x [N, Dv] -> s [N, R], chunked over rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, score_weight):
        n = x.shape[0]
        h = x.new_empty((n, weight.shape[0]))
        s = x.new_empty((n, score_weight.shape[0]))
        wt, vt = weight.t(), score_weight.t()
        for lo in range(0, n, CHUNK_ROWS):
            hc = h[lo:lo + CHUNK_ROWS]
            torch.addmm(bias, x[lo:lo + CHUNK_ROWS], wt, out=hc)
            hc.clamp_min_(0)
            torch.mm(hc, vt, out=s[lo:lo + CHUNK_ROWS])
        ctx.save_for_backward(x, weight, score_weight, h)
        return s

    @staticmethod
    def backward(ctx, grad_s):
        x, weight, score_weight, h = ctx.saved_tensors
        need_x, need_w, need_b, need_v = ctx.needs_input_grad
        grad_s = grad_s.contiguous()
        grad_v = grad_s.t() @ h if need_v else None
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = weight.new_zeros(weight.shape) if need_w else None
        grad_b = weight.new_zeros(weight.shape[0]) if need_b else None
        if need_x or need_w or need_b:
            for lo in range(0, x.shape[0], CHUNK_ROWS):
                gh = grad_s[lo:lo + CHUNK_ROWS] @ score_weight           # [chunk, hidden], fresh
                # ReLU backward in place: exactly what autograd's relu does (threshold at 0 on the output).
                torch.ops.aten.threshold_backward.grad_input(gh, h[lo:lo + CHUNK_ROWS], 0, grad_input=gh)
                if need_w:
                    grad_w.addmm_(gh.t(), x[lo:lo + CHUNK_ROWS])
                if need_b:
                    grad_b += gh.sum(0)
                if need_x:
                    torch.mm(gh, weight, out=grad_x[lo:lo + CHUNK_ROWS])
        return grad_x, grad_w, grad_b, grad_v


def _region_scores_nograd(x, weight, bias, score_weight):
    """Inference: the same chunks, reusing one chunk-sized hidden buffer (no [N, hidden] tensor)."""
    n = x.shape[0]
    s = x.new_empty((n, score_weight.shape[0]))
    buf = x.new_empty((min(n, CHUNK_ROWS), weight.shape[0]))
    wt, vt = weight.t(), score_weight.t()
    for lo in range(0, n, CHUNK_ROWS):
        hc = buf[:min(CHUNK_ROWS, n - lo)]
        torch.addmm(bias, x[lo:lo + CHUNK_ROWS], wt, out=hc)
        hc.clamp_min_(0)
        torch.mm(hc, vt, out=s[lo:lo + CHUNK_ROWS])
    return s


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

    def region_scores(self, regions: torch.Tensor) -> torch.Tensor:
        """[N, Dv] -> affine_v(relu(affine_video(regions))) [N, R]."""
        x = regions.reshape(-1, regions.shape[-1])
        args = (self.affine_video.weight, self.affine_video.bias, self.affine_v.weight)
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            # GPUs, other dtypes and autocast take the plain modules: one big GEMM each.
            return self.affine_v(F.relu(self.affine_video(x)))
        if torch.is_grad_enabled() and (x.requires_grad or any(a.requires_grad for a in args)):
            return _RegionScores.apply(x.contiguous(), *args)
        return _region_scores_nograd(x.contiguous(), *args)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, T, Da], visual [B, T, H, W, Dv] -> attended [B, T, Dv], alpha [B, T, H, W]."""
        B, T, H, W, Dv = visual.shape
        regions = visual.reshape(B * T, H * W, Dv)                      # [BT, 49, Dv] raw regions V
        s = self.region_scores(regions).view(B * T, H * W, -1)          # [BT, 49, 49] = affine_v(relu(affine_video(V)))
        h_a = F.relu(self.affine_audio(audio.reshape(B * T, -1)))       # [BT, hidden]
        g = self.affine_g(h_a)                                          # [BT, 49]
        # The official code adds g[:, :, None]: entry i of g goes to every element of row i
        # (region i), not per hidden unit as the paper's equation reads. Checkpoints depend on it.
        z = self.affine_h(torch.tanh(s + g.unsqueeze(2))).squeeze(2)    # [BT, 49]
        alpha = F.softmax(z, dim=-1)                                    # [BT, 49]
        attended = torch.bmm(alpha.unsqueeze(1), regions).squeeze(1)    # [BT, Dv]
        return attended.view(B, T, Dv), alpha.view(B, T, H, W)
