"""The paper's baselines A, V, V-att and A+V (no official code exists; defined here).

All four use the A+V-att BiLSTM encoders (hidden 128 per direction) and head (ReLU, 64, C):
  audio       A:     audio BiLSTM -> head
  visual      V:     grid-averaged visual -> BiLSTM -> head
  visual_att  V-att: audio-guided attended visual -> BiLSTM -> head (audio only steers attention)
  av          A+V:   audio BiLSTM ++ grid-averaged visual BiLSTM -> head
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import AudioGuidedAttention
from .blocks import SegmentHead, bilstm, encode, grid_mean
from .heads import CLASSIFIER_OUTPUTS, scored
from .registry import register_model


class _Baseline(nn.Module):
    """The constructor of A, V and A+V: the BiLSTM of each modality in ``streams``, then the head.

    The head reads the concatenation of the streams' BiLSTM outputs (audio first), 2h each.
    """

    outputs = CLASSIFIER_OUTPUTS
    streams: tuple[str, ...] = ()                # "audio" and/or "video", in build (and concat) order

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, hidden: int = 128, head_hidden: int = 64):
        super().__init__()
        if "audio" in self.streams:
            self.lstm_audio = bilstm(audio_dim, hidden)
        if "video" in self.streams:
            self.lstm_video = bilstm(visual_dim, hidden)
        in_dim = 2 * hidden * len(self.streams)
        self.head = SegmentHead(in_dim=in_dim, head_hidden=head_hidden, num_classes=num_classes)


@register_model("audio")
class AudioOnly(_Baseline):
    streams = ("audio",)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        return scored(self.head(encode(self.lstm_audio, audio)))              # [B, T, C]


@register_model("visual")
class VisualOnly(_Baseline):
    streams = ("video",)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        return scored(self.head(encode(self.lstm_video, grid_mean(visual))))


@register_model("visual_att")
class VisualAtt(nn.Module):
    outputs = CLASSIFIER_OUTPUTS + ("attention",)

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, hidden: int = 128, att_hidden: int = 512, head_hidden: int = 64):
        super().__init__()
        self.attention = AudioGuidedAttention(
            audio_dim=audio_dim, visual_dim=visual_dim, hidden=att_hidden, regions=grid[0] * grid[1]
        )
        self.lstm_video = bilstm(visual_dim, hidden)
        self.head = SegmentHead(in_dim=2 * hidden, head_hidden=head_hidden, num_classes=num_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        attended, alpha = self.attention(audio, visual)                 # [B, T, Dv], [B, T, H, W]
        return scored(self.head(encode(self.lstm_video, attended)), attention=alpha)


@register_model("av")
class AudioVisual(_Baseline):
    streams = ("audio", "video")

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        h_a = encode(self.lstm_audio, audio)                            # [B, T, 2h]
        h_v = encode(self.lstm_video, grid_mean(visual))                # [B, T, 2h]
        return scored(self.head(torch.cat([h_a, h_v], dim=-1)))
