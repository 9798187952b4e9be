"""Audio-guided visual attention, in the exact form of the official AVE code.

For each one-second segment the audio feature scores the H*W visual regions; the attended
visual vector is the softmax-weighted sum of the *raw* region features. Parameter names
(affine_audio, affine_video, affine_v, affine_g, affine_h) follow the official ``att_Net`` so
that its checkpoints load by name.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, T, Da], visual [B, T, H, W, Dv] -> attended [B, T, Dv], alpha [B, T, H, W]."""
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
