"""A+V-att: audio-guided visual attention, two BiLSTMs, and a small per-segment classifier.

Reads top to bottom in the order the official ``att_Net`` runs. Returns logits; the official
forward applied a softmax at the end, which avel applies only where probabilities are asked for.
The front end (attention + BiLSTMs) is :class:`AttendedEncoders`, which DMRN reuses.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import AudioGuidedAttention
from .blocks import SegmentHead, bilstm, encode
from .heads import CLASSIFIER_OUTPUTS, scored
from .registry import register_model


class AttendedEncoders(nn.Module):
    """Audio-guided attention over the grid, then one BiLSTM per modality (A+V-att and DMRN)."""

    outputs = CLASSIFIER_OUTPUTS + ("attention",)     # what both heads return: logits, their softmax, the map

    def __init__(self, *, audio_dim: int, visual_dim: int, grid: tuple[int, int], hidden: int, att_hidden: int):
        super().__init__()
        self.attention = AudioGuidedAttention(
            audio_dim=audio_dim, visual_dim=visual_dim, hidden=att_hidden, regions=grid[0] * grid[1]
        )
        self.lstm_audio = bilstm(audio_dim, hidden)
        self.lstm_video = bilstm(visual_dim, hidden)

    def encode_streams(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """audio [B, T, Da], visual [B, T, H, W, Dv] -> h_a [B, T, 2h], h_v [B, T, 2h], alpha [B, T, H, W]."""
        attended, alpha = self.attention(audio, visual)                 # [B, T, Dv], [B, T, H, W]
        return encode(self.lstm_audio, audio), encode(self.lstm_video, attended), alpha


@register_model("av_att")
class AVAtt(AttendedEncoders):
    """The official att_Net: both BiLSTM streams concatenated into the A+V-att head (ReLU, 64, C)."""

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, hidden: int = 128, att_hidden: int = 512, head_hidden: int = 64):
        super().__init__(audio_dim=audio_dim, visual_dim=visual_dim, grid=grid, hidden=hidden, att_hidden=att_hidden)
        self.head = SegmentHead(in_dim=4 * hidden, head_hidden=head_hidden, num_classes=num_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        h_a, h_v, alpha = self.encode_streams(audio, visual)           # [B, T, 2h] x2, [B, T, H, W]
        logits = self.head(torch.cat([h_a, h_v], dim=-1))               # [B, T, C]
        return scored(logits, attention=alpha)
