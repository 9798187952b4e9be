"""A+V-att: audio-guided visual attention, two BiLSTMs, and a small per-segment classifier.

Reads top to bottom in the order the official ``att_Net`` runs. Returns logits; the official
forward applied a softmax at the end, which avel applies only where probabilities are asked for.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import AudioGuidedAttention
from .blocks import SegmentHead, bilstm, encode
from .heads import CLASSIFIER_OUTPUTS, scored
from .registry import register_model


@register_model("av_att")
class AVAtt(nn.Module):
    outputs = CLASSIFIER_OUTPUTS + ("attention",)

    def __init__(
        self,
        *,
        audio_dim: int = 128,
        visual_dim: int = 512,
        grid: tuple[int, int] = (7, 7),
        num_classes: int = 29,
        hidden: int = 128,
        att_hidden: int = 512,
        head_hidden: int = 64,
    ):
        super().__init__()
        self.attention = AudioGuidedAttention(
            audio_dim=audio_dim, visual_dim=visual_dim, hidden=att_hidden, regions=grid[0] * grid[1]
        )
        self.lstm_audio = bilstm(audio_dim, hidden)
        self.lstm_video = bilstm(visual_dim, hidden)
        self.head = SegmentHead(in_dim=4 * hidden, head_hidden=head_hidden, num_classes=num_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        attended, alpha = self.attention(audio, visual)                 # [B, T, Dv], [B, T, H, W]
        h_a = encode(self.lstm_audio, audio)                            # [B, T, 2h]
        h_v = encode(self.lstm_video, attended)                         # [B, T, 2h]
        logits = self.head(torch.cat([h_a, h_v], dim=-1))               # [B, T, C]
        return scored(logits, attention=alpha)
