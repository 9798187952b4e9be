"""DMRN: dual multimodal residual network (official ``TBMRF_Net``).

Same attention and BiLSTMs as A+V-att (:class:`avel.models.av_att.AttendedEncoders`); the two
segment streams are then fused by residual blocks in which each modality receives the shared update
on top of the *other* modality's state, exactly as the official code does.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .av_att import AttendedEncoders
from .heads import scored
from .registry import register_model


def _transform(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))


@register_model("dmrn")
class DMRN(AttendedEncoders):
    """The official TBMRF_Net: ``blocks`` residual fusion blocks, then a linear classifier (L2)."""

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, hidden: int = 128, att_hidden: int = 512, blocks: int = 1):
        super().__init__(audio_dim=audio_dim, visual_dim=visual_dim, grid=grid, hidden=hidden, att_hidden=att_hidden)
        self.blocks = blocks
        self.U_v = _transform(2 * hidden)
        self.U_a = _transform(2 * hidden)
        self.L2 = nn.Linear(2 * hidden, num_classes)

    def fuse(self, h_a: torch.Tensor, h_v: torch.Tensor) -> torch.Tensor:
        """[B, T, 2h] x2 -> [B, T, 2h]."""
        for _ in range(self.blocks):
            merged = (self.U_v(h_v) + self.U_a(h_a)) * 0.5
            # Cross residual: the new visual state builds on the audio state and vice versa.
            h_v, h_a = torch.tanh(h_a + merged), torch.tanh(h_v + merged)
        return (h_v + h_a) * 0.5

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        h_a, h_v, alpha = self.encode_streams(audio, visual)           # [B, T, 2h] x2, [B, T, H, W]
        logits = self.L2(self.fuse(h_a, h_v))                           # [B, T, C]
        return scored(logits, attention=alpha)
