"""Pieces shared by the segment classifiers: the BiLSTM encoder and the A+V-att head."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def bilstm(input_dim: int, hidden: int) -> nn.LSTM:
    """One-layer, batch-first BiLSTM with zero initial state (the official encoder)."""
    return nn.LSTM(input_dim, hidden, num_layers=1, batch_first=True, bidirectional=True)


def encode(lstm: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> [B, T, 2*hidden]; T is whatever the input has."""
    out, _ = lstm(x)
    return out


class SegmentHead(nn.Module):
    """ReLU -> Linear(in, 64) -> ReLU -> Linear(64, C): the official A+V-att classifier (L1, L2)."""

    def __init__(self, *, in_dim: int, head_hidden: int = 64, num_classes: int = 29):
        super().__init__()
        self.L1 = nn.Linear(in_dim, head_hidden)
        self.L2 = nn.Linear(head_hidden, num_classes)
        nn.init.xavier_uniform_(self.L1.weight)
        nn.init.xavier_uniform_(self.L2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.L2(F.relu(self.L1(F.relu(x))))                      # [B, T, C]


def grid_mean(visual: torch.Tensor) -> torch.Tensor:
    """[B, T, H, W, Dv] -> [B, T, Dv]: the grid-averaged visual feature (no attention)."""
    return visual.mean(dim=(2, 3))
