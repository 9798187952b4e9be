"""CPSP: contrastive positive sample propagation (jasongief/CPSP, cpsp_avel), supervised and weak.

The backbone is the supervised PSP of ``avel.models.psp`` (projections, audio-guided attention,
BiLSTMs, PSP with pruning and re-normalisation); on top of the fused segment features sit an event
head (one logit per segment) and a category head on the segment-averaged feature. Training adds two
contrastive terms: a segment-level one (event segments of a video against its background segments)
and a video-level one (a margin between same-class and other-class videos of the batch).

The repository runs these models in float64 (``model.double()``); avel builds them in float32 and
``.double()`` reproduces the float64 reference (fixture READMEs cpsp/ and cpsp_weak/).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import gate_scores
from .psp import (
    BACKBONE_RENAMES,
    PSPBackbone,
    _shape,
    avps_loss,
    backbone_kwargs,
    backbone_reference_shapes,
    convert_state_dict,
)
from .registry import register_model

# The reference's -log(r + 1e-12) and count + 1e-12 guards.
TINY = 1e-12
# Stand-ins for "excluded" distances in the video contrastive loss (reference values).
FAR = 1e12

# Registered by the reference fully_psp_net / weakly_psp_net but never used by the 'cpsp' forward.
CPSP_UNUSED_REFERENCE_KEYS = (
    "linear_v.weight", "linear_v.bias",
    "v_classify.L1.weight", "v_classify.L2.weight", "a_classify.L1.weight", "a_classify.L2.weight",
    "L1.weight", "L2.weight",
)


def cpsp_segment_scores(event_logits: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """The CPSP decision as scores [B, T, K+1]: the video's argmax class where sigmoid(event) > 0.5
    (strictly), background elsewhere (compute_accuracy_supervised of both CPSP entry points)."""
    return gate_scores(torch.sigmoid(event_logits), torch.softmax(class_logits, dim=-1))


# --- the segment-level contrastive term -----------------------------------------------------------

def _segment_similarity(fusion: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> [B, T, T] cosine similarity of every pair of segments of a video."""
    f = F.normalize(fusion, dim=-1)                                          # [B, T, D]
    return torch.bmm(f, f.transpose(1, 2))


def segment_contrastive_loss_reference(fusion: torch.Tensor, event: torch.Tensor,
                                       temperature: float = 0.6) -> torch.Tensor:
    """The reference segment_contrastive_loss (losses.py:22-45) with its BUG, a scalar. Fixture use only.

    event [B, T] in {0, 1}; flags pos[i, j] = e_i e_j, neg[i, j] = e_i (1 - e_j). Both sums run over the
    anchor axis i, so a column j holds only positives (j an event) or only negatives (j background):
    r_j ~ 1 for event columns and exactly 0 for background ones, each of which adds -log(1e-12). The
    value is ~ (n_bg / n_event) * 27.63 averaged over videos with events, a constant of the labels.
    """
    e = event.to(torch.int64)
    s = _segment_similarity(fusion)
    pos_flag = e[:, :, None] * e[:, None, :]                                 # [B, T, T]
    neg_flag = e[:, :, None] * (1 - e[:, None, :])
    p = torch.exp(s * pos_flag / temperature) * pos_flag
    n = torch.exp(s * neg_flag / temperature) * neg_flag
    n_event = e.sum(-1)                                                      # [B] integer counts
    n_bg = (1 - e).sum(-1)
    # The reference adds 1e-12 to integer counts, which torch evaluates in float32.
    pos = p.sum(1)                                                           # [B, T] sum over anchors i
    neg = n.sum(1) / (n_bg.to(torch.float32) + TINY)[:, None]
    r = pos / (pos + neg + TINY)
    per_video = (-torch.log(r + TINY)).sum(-1) / (n_event.to(torch.float32) + TINY)
    has_event = (n_event > 0).to(per_video.dtype)
    return (per_video * has_event).sum() / has_event.sum()


def segment_contrastive_loss(fusion: torch.Tensor, event: torch.Tensor, temperature: float = 0.6) -> torch.Tensor:
    """The segment contrastive term as it was meant (a scalar): the reference with its sums fixed.

    With the reference's flags the anchors are the rows i (e_i = 1): each event segment i of a video
    is pulled to the video's event segments j (positives, itself included) and pushed from its
    background segments, pos_i = sum_j exp(s_ij / t) e_j, neg_i = sum_j exp(s_ij / t) (1 - e_j) / n_bg
    (the reference's per-background average), r_i = pos_i / (pos_i + neg_i); the video's loss is the
    mean of -log r_i over its event anchors; the batch loss the mean over videos with an event. The
    reference summed over i instead of j (see segment_contrastive_loss_reference), which made the term
    a constant of the labels. A video without background segments contributes ~0 (nothing to push).
    """
    e = event.to(fusion.dtype)                                               # [B, T]
    s = _segment_similarity(fusion)
    sim = torch.exp(s / temperature)                                         # [B, T, T]
    n_event = e.sum(-1)                                                      # [B]
    n_bg = (1 - e).sum(-1)
    pos = (sim * e[:, None, :]).sum(-1)                                      # [B, T] per anchor i
    neg = (sim * (1 - e)[:, None, :]).sum(-1) / (n_bg + TINY)[:, None]
    r = pos / (pos + neg + TINY)
    per_video = (-torch.log(r + TINY) * e).sum(-1) / n_event.clamp_min(1)    # only event anchors count
    has_event = (n_event > 0).to(per_video.dtype)
    return (per_video * has_event).sum() / has_event.sum().clamp_min(1)


# --- the video-level contrastive term -------------------------------------------------------------

def video_contrastive_loss(fusion: torch.Tensor, labels: torch.Tensor, margin: float = 0.2,
                           neg_num: int = 3) -> torch.Tensor:
    """Per-video margin term [B] (losses.py:48-78); its batch mean is the reference loss.

    g = segment mean of the L2-normalised fusion; D = pairwise distances (|a|^2 + |b|^2 - 2ab, clamped at
    1e-12, square root); dp = the farthest same-class video (the video itself, D ~ 1e-6, included);
    dn = the mean of the neg_num nearest other-class videos, same-class entries (itself included) set to
    1e12; loss = max(0, dp - dn + margin). With fewer than neg_num other-class videos the 1e12 entries
    enter the mean and the term is 0, as in the reference. The reference raises for a batch smaller than
    neg_num; here the nearest min(neg_num, B) entries are used (the same 0).
    """
    g = F.normalize(fusion, dim=-1).mean(1)                                  # [B, D]
    sq = g.pow(2).sum(1, keepdim=True)                                       # [B, 1]
    dist = (sq + sq.t()) - 2 * (g @ g.t())
    dist = dist.clamp_min(TINY).sqrt()                                       # [B, B]
    same = labels[:, None] == labels[None, :]
    dp = torch.where(same, dist, torch.full_like(dist, -FAR)).max(1).values  # [B]
    others = torch.where(same, torch.full_like(dist, FAR), dist)
    dn = others.topk(min(neg_num, dist.shape[1]), dim=1, largest=False).values.mean(1)
    return (margin - (dn - dp)).clamp_min(0)                                 # MarginRankingLoss, target 1


def multilabel_soft_margin_reference(video_prob: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference weak class term, per video [B]: MultiLabelSoftMarginLoss applied to an already
    softmaxed vector (it scores sigmoid(softmax(x)); values stay near 0.71). Fixture use only."""
    return F.multilabel_soft_margin_loss(video_prob, labels.to(video_prob.dtype), reduction="none")


# --- label helpers (the reference derivations, from avel's batch) --------------------------------

def segment_events(target: torch.Tensor) -> torch.Tensor:
    """[B, T, C] one-hot -> [B, T] 1.0 for event segments (reference labels_BCE)."""
    return target[..., :-1].amax(-1)


def video_event_class(target: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> [B] the reference labels_event: max over segments of the argmax over the K event columns.

    Background rows are all zero and give 0, so a video without any event segment would get class 0.
    """
    return target[..., :-1].argmax(-1).max(1).values


def video_class(video_label: torch.Tensor) -> torch.Tensor:
    """[B, C] one-hot -> [B] class index, background-only videos = C-1 (not event class 0)."""
    return video_label.argmax(-1)


# --- the models ----------------------------------------------------------------------------------

class _CPSPBase(PSPBackbone):
    """The PSP backbone plus the two CPSP heads; shared constructor and checkpoint conversion.

    The defaults are the authors' fully supervised values (the cpsp model's); cpsp_weak changes
    threshold, vcon_margin and vcon_negatives.
    """

    reference_classes = ()                                   # the repository saves state_dicts only

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, embed_dim: int = 128, proj_hidden: int = 256, hidden: int = 128,
                 att_hidden: int = 512, head_hidden: int = 64, threshold: float = 0.099,
                 scon_temperature: float = 0.6, vcon_margin: float = 0.2, vcon_negatives: int = 3):
        super().__init__(audio_dim=audio_dim, visual_dim=visual_dim, grid=grid, embed_dim=embed_dim,
                         proj_hidden=proj_hidden, hidden=hidden, att_hidden=att_hidden, threshold=threshold)
        # head_hidden only sizes reference modules that are never used; kept so shapes convert both ways.
        self.head_hidden = head_hidden
        self.scon_temperature = scon_temperature
        self.vcon_margin = vcon_margin
        self.vcon_negatives = vcon_negatives
        self.event_head = nn.Linear(2 * hidden, 1)                           # reference event_classifier
        self.category_head = nn.Linear(2 * hidden, num_classes - 1)          # reference category_classifier

    def heads(self, audio: torch.Tensor, visual: torch.Tensor):
        fusion, avps, alpha = self.features(audio, visual)                   # [B, T, 256], [B, T], [B, T, H, W]
        event_logits = self.event_head(fusion).squeeze(-1)                   # [B, T]
        class_logits = self.category_head(fusion.mean(1))                    # [B, K] on the segment mean
        return fusion, avps, alpha, event_logits, class_logits

    @staticmethod
    def reference_shapes(kw: dict) -> dict[str, tuple[int, ...]]:
        shapes = backbone_reference_shapes(kw)
        h, hh, k = kw["hidden"], kw["head_hidden"], kw["num_classes"] - 1
        shapes.update({"L1.weight": (hh, 2 * h), "L2.weight": (k, hh),
                       "event_classifier.0.weight": (1, 2 * h), "event_classifier.0.bias": (1,),
                       "category_classifier.0.weight": (k, 2 * h), "category_classifier.0.bias": (k,)})
        return shapes

    @staticmethod
    def convert_reference(state_dict: dict) -> tuple[dict, dict]:
        kw = backbone_kwargs(state_dict)
        kw["num_classes"] = _shape(state_dict, "category_classifier.0.weight", 0) + 1      # + background
        renames = BACKBONE_RENAMES + (("event_classifier.0.", "event_head."),
                                      ("category_classifier.0.", "category_head."))
        sd = convert_state_dict(state_dict, _CPSPBase.reference_shapes(kw), renames, CPSP_UNUSED_REFERENCE_KEYS)
        return kw, sd


@register_model("cpsp")
class CPSP(_CPSPBase):
    """Fully supervised CPSP (reference fully_psp_net, flag 'cpsp', VGG features).

    Outputs: ``event_logits`` [B, T]; ``class_logits`` [B, K] (reference category_logits);
    ``segment_scores`` [B, T, C] the event-gate rule; ``avps`` [B, T] audio-visual cosine;
    ``fusion`` [B, T, 2*hidden]; ``attention`` [B, T, H, W].
    """

    outputs = ("event_logits", "class_logits", "segment_scores", "avps", "fusion", "attention")
    tasks = ("supervised",)
    # run_fully_supv.sh:36-41 (lambda_avps 100, lambda_scon 0.01, lambda_vcon 1).
    loss_weights = {"is_event": 1.0, "event_class": 1.0, "avps": 100.0, "scon": 0.01, "vcon": 1.0}
    # The constructor (and its defaults) is _CPSPBase's.

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        fusion, avps, alpha, event_logits, class_logits = self.heads(audio, visual)
        return {"event_logits": event_logits, "class_logits": class_logits,
                "segment_scores": cpsp_segment_scores(event_logits, class_logits), "avps": avps,
                "fusion": fusion, "attention": alpha}

    def loss_terms(self, out: dict, batch: dict, task: str) -> dict[str, torch.Tensor]:
        if task != "supervised":
            raise ValueError(f"cpsp is trained fully supervised only, not {task!r}")
        event_logits = out["event_logits"]
        target = batch["target"].to(event_logits.dtype)                     # [B, T, C]
        events = segment_events(target)                                      # [B, T] reference labels_BCE
        has_event = events.amax(-1) > 0                                      # [B]
        is_event = F.binary_cross_entropy_with_logits(event_logits, events, reduction="none").mean(-1)
        # FIX: a video without event segments has no event class; the reference trains it towards
        # class 0 (labels_event = 0). Here it adds nothing to the class term.
        event_class = F.cross_entropy(out["class_logits"], video_event_class(target), reduction="none")
        event_class = torch.where(has_event, event_class, torch.zeros_like(event_class))
        soft = events / (events.sum(-1, keepdim=True) + 1e-6)                # reference soft_labels
        # FIX: the reference segment term sums over the anchor axis and is a constant of the labels;
        # this is the intended per-anchor form. A batch-level value: the scalar expanded to [B].
        scon = segment_contrastive_loss(out["fusion"], events, self.scon_temperature)
        # FIX (same cause as above): background-only videos form their own class (C-1), not class 0.
        classes = video_event_class(target).masked_fill(~has_event, target.shape[-1] - 1)
        vcon = video_contrastive_loss(out["fusion"], classes, self.vcon_margin, self.vcon_negatives)
        return {"is_event": is_event, "event_class": event_class, "avps": avps_loss(out["avps"], soft),
                "scon": scon.expand(event_logits.shape[0]), "vcon": vcon}


@register_model("cpsp_weak")
class CPSPWeak(_CPSPBase):
    """Weakly supervised CPSP (reference weakly_psp_net, flag 'cpsp', 'avg' pooling, VGG features).

    Outputs: ``event_logits`` [B, T]; ``class_logits`` [B, K] (reference category_logits, used by the
    decision rule); ``segment_scores`` [B, T, C] the event-gate rule; ``pooled_logits`` [B, K] the max
    over segments of sigmoid(event) * class logit; ``video_prob`` [B, K] its softmax (reference
    predict_video_labels); ``fusion`` [B, T, 2*hidden]; ``attention`` [B, T, H, W]. Unlike the reference,
    no size-1 axis is squeezed away, so B = 1 keeps its batch axis.
    """

    outputs = ("event_logits", "class_logits", "segment_scores", "pooled_logits", "video_prob", "fusion",
               "attention")
    tasks = ("weak",)
    loss_weights = {"event_class": 1.0, "vcon": 1.0}                         # lambda_vcon 1 (run_weakly_supv.sh:34)

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, embed_dim: int = 128, proj_hidden: int = 256, hidden: int = 128,
                 att_hidden: int = 512, head_hidden: int = 64, threshold: float = 0.095,
                 scon_temperature: float = 0.6, vcon_margin: float = 0.6, vcon_negatives: int = 4):
        # scon_temperature is unused by the weak losses; kept so both CPSP models take the same keywords.
        super().__init__(audio_dim=audio_dim, visual_dim=visual_dim, grid=grid, num_classes=num_classes,
                         embed_dim=embed_dim, proj_hidden=proj_hidden, hidden=hidden, att_hidden=att_hidden,
                         head_hidden=head_hidden, threshold=threshold, scon_temperature=scon_temperature,
                         vcon_margin=vcon_margin, vcon_negatives=vcon_negatives)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        fusion, _, alpha, event_logits, class_logits = self.heads(audio, visual)
        fused = torch.sigmoid(event_logits)[..., None] * class_logits[:, None, :]     # [B, T, K]
        pooled = fused.max(1).values                                                   # [B, K]
        return {"event_logits": event_logits, "class_logits": class_logits,
                "segment_scores": cpsp_segment_scores(event_logits, class_logits), "pooled_logits": pooled,
                "video_prob": torch.softmax(pooled, dim=-1), "fusion": fusion, "attention": alpha}

    def loss_terms(self, out: dict, batch: dict, task: str) -> dict[str, torch.Tensor]:
        if task != "weak":
            raise ValueError(f"cpsp_weak is trained weakly supervised only, not {task!r}")
        pooled = out["pooled_logits"]
        video_label = batch["video_label"].to(pooled.dtype)                 # [B, C]
        # FIX: MultiLabelSoftMarginLoss expects logits; the reference feeds it the softmax output
        # (multilabel_soft_margin_reference), which leaves almost no gradient. Here it gets the pooled
        # logits. Background stays out of the 28-way target, as in the reference (mil_labels minus bg).
        event_class = F.multilabel_soft_margin_loss(pooled, video_label[:, :-1], reduction="none")
        # FIX: background-only videos form their own class (C-1) instead of argmax of zeros = class 0.
        vcon = video_contrastive_loss(out["fusion"], video_class(video_label), self.vcon_margin, self.vcon_negatives)
        return {"event_class": event_class, "vcon": vcon}
