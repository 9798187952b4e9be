"""Cross-modal matching network for cross-modality localization (A2V / V2A).

Two branches embed a one-second visual vector and a one-second audio vector into a shared
64-d space; the output is their Euclidean distance, floored at 1e-7 under the root as Keras did.
Parameter layout mirrors the official Keras file: visual = dense_1, dense_2; audio = dense_3, dense_4.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model

KERAS_EPSILON = 1e-7


def _branch(in_dim: int, hidden: int, embed: int, slope: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LeakyReLU(slope), nn.Linear(hidden, embed))


def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., N, E], b [..., M, E] -> [..., N, M] distances with the Keras floor."""
    d2 = (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(-1)
    return d2.clamp_min(KERAS_EPSILON).sqrt()


@register_model("cml")
class CrossModalMatcher(nn.Module):
    outputs = ("distance",)     # what forward returns (tasks check it); segment models return logits

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, visual_hidden: int = 128,
                 audio_hidden: int = 128, embed_dim: int = 64, slope: float = 0.3):
        super().__init__()
        self.visual = _branch(visual_dim, visual_hidden, embed_dim, slope)
        self.audio = _branch(audio_dim, audio_hidden, embed_dim, slope)

    def embed(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [..., Da], visual [..., Dv] -> embeddings [..., E] each."""
        return self.audio(audio), self.visual(visual)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        """Row-wise distance of paired inputs: audio [N, Da], visual [N, Dv] -> distance [N]."""
        e_a, e_v = self.embed(audio, visual)
        d2 = (e_v - e_a).pow(2).sum(-1)
        return {"distance": d2.clamp_min(KERAS_EPSILON).sqrt()}
