"""Decision rules shared by several models, written once so every model states its rule the same way.

Every segment model returns ``segment_scores`` [B, T, C] whose per-segment argmax *is* its inference
decision (class C-1 = background); nothing downstream knows how a model decides. These helpers turn
the raw outputs of the two common head types into such scores.
"""
from __future__ import annotations

import torch


def gate_scores(event_prob: torch.Tensor, class_prob: torch.Tensor) -> torch.Tensor:
    """Scores of an event-gate head: background unless the event probability exceeds 0.5.

    event_prob [B, T] in [0, 1]; class_prob [B, K] (one video class for all segments) or [B, T, K]
    (K = C - 1 event classes, any non-negative scores). Returns [B, T, K + 1]: the best event class
    scores ``event_prob``, the others ``event_prob`` times their ratio to the best, background
    ``1 - event_prob``, so the argmax is the video's class where ``event_prob > 0.5`` and background
    elsewhere (at exactly 0.5 background wins: the rule says "exceeds").
    """
    B, T = event_prob.shape
    if class_prob.dim() == 2:
        class_prob = class_prob[:, None, :].expand(B, T, class_prob.shape[-1])      # [B, T, K]
    best = class_prob.max(dim=-1, keepdim=True).values.clamp_min(torch.finfo(class_prob.dtype).tiny)
    events = event_prob[..., None] * (class_prob / best)                             # [B, T, K], top = p
    background = 1 - event_prob
    # p <= 0.5 must decide background even on a tie with the top class (p = 0.5).
    tie_break = torch.nextafter(event_prob, torch.full_like(event_prob, 2.0))
    background = torch.where(event_prob > 0.5, background, torch.maximum(background, tie_break))
    return torch.cat([events, background[..., None]], dim=-1)                       # [B, T, K + 1]


# What a plain per-segment classifier returns: its decision is the argmax of the softmax of its logits.
CLASSIFIER_OUTPUTS = ("segment_scores", "logits")


def scored(logits: torch.Tensor, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output dict of a plain classifier: logits [B, T, C], their softmax as ``segment_scores``."""
    return {"segment_scores": logits.softmax(-1), "logits": logits, **extra}
