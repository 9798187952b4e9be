"""Batch-first post-norm transformer blocks of CMRAN (FloretCat/CMRAN), reused unchanged by CMBS.

Written from the fixture READMEs (shared/fixtures/followups/cmran*/README.txt, cmbs*/README.txt),
not from the reference code. Both references run these blocks time first ([T, B, d], the default of
torch.nn.MultiheadAttention); everything here is batch first ([B, T, d]). Attention, the
concatenation of memories along time and every per-position layer are the same mathematics in either
layout, so only the axis numbers differ. "Along time" means dim 1.

In forward order of a CMRAN-family model:
  Encoder        projection, then post-norm self-attention layers      (one modality -> key/value)
  Decoder        projection, then one relation layer: the query attends to [other modality, itself]
  CrossModalInteraction  g = x * other attends to [other, x]; the residual is g
Encoder and decoder layers are one class, AttentionLayer: only the memory they attend to differs.

Every size and dropout rate is a keyword; the two models differ only in those values.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention's mathematics, batch first, key = value = ``memory``, no masks.

    Parameter names equal torch's (in_proj_weight [3d, d] with the query, key and value rows in that
    order, in_proj_bias [3d], out_proj), so reference checkpoints load by a prefix rename, and the
    initialisation draws in torch's order. Written out rather than wrapping nn.MultiheadAttention so
    that the time-first/batch-first choice and the eval fast path of torch never change the arithmetic.
    """

    def __init__(self, *, d_model: int = 256, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout                       # on the attention weights, as torch does
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)         # torch's initialisation
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """query [B, Lq, d], memory [B, Lk, d] -> [B, Lq, d]."""
        B, Lq, d = query.shape
        Lk = memory.shape[1]
        h, hd = self.heads, d // self.heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        # Heads split the feature axis into contiguous blocks of hd.
        q = F.linear(query, w_q, b_q).view(B, Lq, h, hd).transpose(1, 2)        # [B, h, Lq, hd]
        k = F.linear(memory, w_k, b_k).view(B, Lk, h, hd).transpose(1, 2)       # [B, h, Lk, hd]
        v = F.linear(memory, w_v, b_v).view(B, Lk, h, hd).transpose(1, 2)       # [B, h, Lk, hd]
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)  # [B, h, Lq, Lk]
        weights = F.dropout(weights, self.dropout, self.training)
        out = (weights @ v).transpose(1, 2).reshape(B, Lq, d)                    # heads concatenated
        return self.out_proj(out)


class FeedForward(nn.Module):
    """linear2(Dropout(ReLU(linear1(x)))): the position-wise block of the encoder/decoder layers."""

    def __init__(self, *, d_model: int = 256, ff_dim: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.linear1 = nn.Linear(d_model, ff_dim)
        self.linear2 = nn.Linear(ff_dim, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                    # [B, T, d] -> [B, T, d]
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class AttentionLayer(nn.Module):
    """Post-norm attention layer: q = norm1(q + drop(attn(q, memory))); q = norm2(q + drop(FFN(q))).

    The encoder runs it as self-attention (memory = q), the decoder as cross-modal relation
    attention (memory = [other modality; q]); the references have one class for each, with the
    same arithmetic.
    """

    def __init__(self, *, d_model: int = 256, heads: int = 4, ff_dim: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.attn = MultiheadAttention(d_model=d_model, heads=heads, dropout=dropout)
        self.ffn = FeedForward(d_model=d_model, ff_dim=ff_dim, dropout=dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """q [B, T, d], memory [B, L, d] -> [B, T, d]."""
        q = self.norm1(q + self.dropout1(self.attn(q, memory)))
        return self.norm2(q + self.dropout2(self.ffn(q)))


class Encoder(nn.Module):
    """affine_matrix (in_dim -> d_model), then ``layers`` self-attention layers."""

    def __init__(self, *, in_dim: int, d_model: int = 256, heads: int = 4, ff_dim: int = 2048,
                 layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.affine_matrix = nn.Linear(in_dim, d_model)
        self.layers = nn.ModuleList(
            AttentionLayer(d_model=d_model, heads=heads, ff_dim=ff_dim, dropout=dropout) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:                    # [B, T, in] -> [B, T, d]
        x = self.affine_matrix(x)
        for layer in self.layers:
            x = layer(x, x)
        return x


class Decoder(nn.Module):
    """affine_matrix (in_dim -> d_model) on the query stream, then one relation-attention layer.

    The query attends to [other modality, itself] along time, other first. The reference decoder
    layer also registers a self-attention that it never calls; it is not built here.
    """

    def __init__(self, *, in_dim: int, d_model: int = 256, heads: int = 4, ff_dim: int = 2048,
                 dropout: float = 0.1):
        super().__init__()
        self.affine_matrix = nn.Linear(in_dim, d_model)
        self.layer = AttentionLayer(d_model=d_model, heads=heads, ff_dim=ff_dim, dropout=dropout)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """x [B, T, in] (queries), other [B, T', d] (encoded other modality) -> [B, T, d]."""
        q = self.affine_matrix(x)                                          # [B, T, d]
        return self.layer(q, torch.cat([other, q], dim=1))                 # memory [B, T' + T, d]


class CrossModalInteraction(nn.Module):
    """The references' AVInter / VAInter: g = x * other attends to [other, x] along time.

    out = norm(g + drop(attn(g, [other; x]))). The residual is the product g, not x (reference
    behaviour). CMRAN supervised: 4 heads; CMRAN weak: 2 heads; CMBS uses attention dropout 0.2.
    """

    def __init__(self, *, d_model: int = 256, heads: int = 4, dropout: float = 0.1, attn_dropout: float = 0.1):
        super().__init__()
        self.attn = MultiheadAttention(d_model=d_model, heads=heads, dropout=attn_dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:   # [B, T, d] x2 -> [B, T, d]
        g = x * other
        memory = torch.cat([other, x], dim=1)                              # [B, 2T, d]
        return self.norm(g + self.dropout(self.attn(g, memory)))
