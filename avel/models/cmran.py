"""CMRAN: cross-modal relation-aware network (FloretCat/CMRAN, ACM MM 2020), supervised and weak.

Written from the fixture READMEs (shared/fixtures/followups/cmran*/README.txt), not from the
reference code. The computation, top to bottom:

  visual grid -> v_fc adapter -> audio-guided channel + spatial attention -> one vector per segment
  video encoder (self-attention)  --memory-->  audio decoder (audio queries the video)
  audio encoder (self-attention)  --memory-->  video decoder (video queries the audio)
  AV interaction (product of the two query streams attends to both) -> localisation head

Layout: the reference runs its transformer blocks time first ([T, B, d], the default of
torch.nn.MultiheadAttention). Everything here is batch first ([B, T, d]); attention, the
concatenation of memories along time and the max over time are the same mathematics in either
layout, so only the axis numbers differ. Where a comment says "along time" it means dim 1.

The building blocks at the top (MultiheadAttention, EncoderLayer/Encoder, DecoderLayer/Decoder,
CrossModalInteraction, AudioGuidedChannelSpatialAttention and RegionSelfAttention) are meant for reuse
by CMBS, which descends from CMRAN: every size and dropout rate is a keyword.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import gate_scores
from .registry import register_model


# ---------------------------------------------------------------------------------------------
# Transformer-era building blocks (batch first)
# ---------------------------------------------------------------------------------------------

class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention's mathematics, batch first, key = value = ``memory``, no masks.

    Parameter names equal torch's (in_proj_weight [3d, d] with the query, key and value rows in that
    order, in_proj_bias [3d], out_proj), so reference checkpoints load by a prefix rename. Written
    out rather than wrapping nn.MultiheadAttention so that the time-first/batch-first choice and the
    eval fast path of torch never change the arithmetic.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer: x = norm1(x + drop(SA(x))); x = norm2(x + drop(FFN(x)))."""

    def __init__(self, *, d_model: int = 256, heads: int = 4, ff_dim: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model=d_model, heads=heads, dropout=dropout)
        self.ffn = FeedForward(d_model=d_model, ff_dim=ff_dim, dropout=dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                    # [B, T, d] -> [B, T, d]
        x = self.norm1(x + self.dropout1(self.self_attn(x, x)))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class Encoder(nn.Module):
    """affine_matrix (in_dim -> d_model), then ``layers`` encoder layers."""

    def __init__(self, *, in_dim: int, d_model: int = 256, heads: int = 4, ff_dim: int = 2048,
                 layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.affine_matrix = nn.Linear(in_dim, d_model)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model=d_model, heads=heads, ff_dim=ff_dim, dropout=dropout) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:                    # [B, T, in] -> [B, T, d]
        x = self.affine_matrix(x)
        for layer in self.layers:
            x = layer(x)
        return x


class DecoderLayer(nn.Module):
    """Cross-modal relation attention: the query attends to [other modality, itself] along time.

    q = norm1(q + drop(attn(q, [other; q]))); q = norm2(q + drop(FFN(q))). The reference layer also
    registers a self-attention that it never calls; it is not built here.
    """

    def __init__(self, *, d_model: int = 256, heads: int = 4, ff_dim: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.cross_attn = MultiheadAttention(d_model=d_model, heads=heads, dropout=dropout)
        self.ffn = FeedForward(d_model=d_model, ff_dim=ff_dim, dropout=dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """q [B, T, d], other [B, T', d] -> [B, T, d]."""
        memory = torch.cat([other, q], dim=1)                              # [B, T' + T, d], other first
        q = self.norm1(q + self.dropout1(self.cross_attn(q, memory)))
        return self.norm2(q + self.dropout2(self.ffn(q)))


class Decoder(nn.Module):
    """affine_matrix (in_dim -> d_model) on the query stream, then one decoder layer."""

    def __init__(self, *, in_dim: int, d_model: int = 256, heads: int = 4, ff_dim: int = 2048,
                 dropout: float = 0.1):
        super().__init__()
        self.affine_matrix = nn.Linear(in_dim, d_model)
        self.layer = DecoderLayer(d_model=d_model, heads=heads, ff_dim=ff_dim, dropout=dropout)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """x [B, T, in] (queries), other [B, T', d] (encoded other modality) -> [B, T, d]."""
        return self.layer(self.affine_matrix(x), other)


class CrossModalInteraction(nn.Module):
    """The reference's AVInter: g = x * other attends to [other, x] along time.

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


class AudioGuidedChannelSpatialAttention(nn.Module):
    """Audio-guided channel attention, then audio-guided spatial attention over the grid (CMRAN form).

    Parameter names follow the reference module (affine_audio_1, affine_video_1, affine_bottleneck,
    affine_v_c_att for the channel part; affine_audio_2, affine_video_2, affine_v_s_att for the
    spatial part). CMBS computes the channel map from self-attended regions but applies it to the
    raw ones: :meth:`channel` takes that ``guide`` separately for this reason.
    """

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, channel_hidden: int = 512,
                 bottleneck: int = 256, spatial_hidden: int = 256):
        super().__init__()
        self.affine_audio_1 = nn.Linear(audio_dim, channel_hidden)
        self.affine_video_1 = nn.Linear(visual_dim, channel_hidden)
        self.affine_bottleneck = nn.Linear(channel_hidden, bottleneck)
        self.affine_v_c_att = nn.Linear(bottleneck, visual_dim)
        self.affine_audio_2 = nn.Linear(audio_dim, spatial_hidden)
        self.affine_video_2 = nn.Linear(visual_dim, spatial_hidden)
        self.affine_v_s_att = nn.Linear(spatial_hidden, 1)

    def channel(self, audio: torch.Tensor, regions: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        """audio [N, Da], regions [N, R, Dv] -> regions * (c_att + 1) [N, R, Dv].

        The map c_att [N, Dv] is computed from ``guide`` (default: the regions themselves).
        """
        guide = regions if guide is None else guide
        q_a = F.relu(self.affine_audio_1(audio)).unsqueeze(1)              # [N, 1, hc]
        q_v = F.relu(self.affine_video_1(guide))                           # [N, R, hc]
        joint = (q_a * q_v).mean(dim=1)                                    # [N, hc]
        c_att = torch.sigmoid(self.affine_v_c_att(F.relu(self.affine_bottleneck(joint))))   # [N, Dv]
        # "+ 1": the channel map rescales around identity instead of gating towards zero.
        return regions * (c_att.unsqueeze(1) + 1)

    def spatial(self, audio: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [N, Da], regions [N, R, Dv] -> attended [N, Dv], weights [N, R]."""
        q_c = F.relu(self.affine_video_2(regions))                         # [N, R, hs]
        q_a = F.relu(self.affine_audio_2(audio)).unsqueeze(1)              # [N, 1, hs]
        score = torch.tanh(self.affine_v_s_att(q_c * q_a)).squeeze(-1)     # [N, R]
        weights = torch.softmax(score, dim=-1)                             # over the R positions
        return torch.bmm(weights.unsqueeze(1), regions).squeeze(1), weights

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, T, Da], visual [B, T, H, W, Dv] -> attended [B, T, Dv], weights [B, T, H, W]."""
        B, T, H, W, Dv = visual.shape
        regions = visual.reshape(B * T, H * W, Dv)                         # [N, R, Dv], grid row by row
        a = audio.reshape(B * T, -1)                                       # [N, Da], rows b-major then t
        attended, weights = self.spatial(a, self.channel(a, regions))
        return attended.view(B, T, Dv), weights.view(B, T, H, W)


class RegionSelfAttention(nn.Module):
    """Self-attention over the grid positions of one segment, as CMBS's attention module runs it.

    Not used by CMRAN; here for CMBS. s = norm(x + drop(softmax(Q K^T) V)) with Q = video_query(x),
    K = video_key(x), V = video_value(x). QUIRK (reference): the energies Q K^T are NOT scaled by
    1/sqrt(d). Softmax over the keys (last axis).
    """

    def __init__(self, *, visual_dim: int = 512, qk_dim: int = 128, dropout: float = 0.2):
        super().__init__()
        self.video_query = nn.Linear(visual_dim, qk_dim)
        self.video_key = nn.Linear(visual_dim, qk_dim)
        self.video_value = nn.Linear(visual_dim, visual_dim)
        self.norm = nn.LayerNorm(visual_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:            # [N, R, Dv] -> [N, R, Dv]
        energy = self.video_query(regions) @ self.video_key(regions).transpose(1, 2)   # [N, R, R], unscaled
        attended = torch.softmax(energy, dim=-1) @ self.video_value(regions)          # [N, R, Dv]
        return self.norm(regions + self.dropout(attended))


# ---------------------------------------------------------------------------------------------
# Localisation heads and their decision rules
# ---------------------------------------------------------------------------------------------

class SupervisedLocalization(nn.Module):
    """Event gate per segment, and the video's event class from the max over time."""

    def __init__(self, *, d_model: int = 256, event_classes: int = 28):
        super().__init__()
        self.classifier = nn.Linear(d_model, 1)
        self.event_classifier = nn.Linear(d_model, event_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> event logits [B, T], class logits [B, K]."""
        return self.classifier(x).squeeze(-1), self.event_classifier(x.amax(dim=1))


class WeakLocalization(nn.Module):
    """The reference WeaklyLocalizationModule: gate-weighted video logits, max-pooled over time."""

    def __init__(self, *, d_model: int = 256, num_classes: int = 29):
        super().__init__()
        self.classifier = nn.Linear(d_model, 1)
        self.event_classifier = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> event logits [B, T], raw logits [B, C], video logits [B, C]."""
        event_logits = self.classifier(x).squeeze(-1)                      # [B, T]
        raw_logits = self.event_classifier(x.amax(dim=1))                  # [B, C], background included
        fused = torch.sigmoid(event_logits).unsqueeze(-1) * raw_logits.unsqueeze(1)   # [B, T, C]
        return event_logits, raw_logits, fused.amax(dim=1)


def open_gate_scores(event_prob: torch.Tensor, video_prob: torch.Tensor) -> torch.Tensor:
    """Scores of CMRAN weak's rule: background unless event prob > 0.5, else the argmax over ALL C classes.

    event_prob [B, T]; video_prob [B, C] (background column C-1 included, so a foreground segment can
    still be predicted background). Returns [B, T, C]: the video's best class scores ``event_prob``
    and the others proportionally less; on segments with event_prob <= 0.5 background is lifted
    strictly above every other column (a tie at exactly 0.5 decides background, as "> 0.5" says).
    """
    best = video_prob.max(dim=-1, keepdim=True).values.clamp_min(torch.finfo(video_prob.dtype).tiny)
    scores = event_prob.unsqueeze(-1) * (video_prob / best).unsqueeze(1)   # [B, T, C], top = p
    floor = torch.maximum(1 - event_prob, torch.nextafter(event_prob, torch.full_like(event_prob, 2.0)))
    background = torch.where(event_prob > 0.5, scores[..., -1], torch.maximum(scores[..., -1], floor))
    return torch.cat([scores[..., :-1], background.unsqueeze(-1)], dim=-1)


# ---------------------------------------------------------------------------------------------
# Losses (per video) and the reference's buggy versions, kept only to match fixture values
# ---------------------------------------------------------------------------------------------

def segment_event_targets(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """target [B, T, C] one-hot (C-1 = background) -> (is_event [B, T] float, video class [B] long).

    The video class follows the reference: the max over segments of the per-segment argmax over the
    C-1 event columns. That argmax is 0 on background segments, so a video without event segments
    gets class 0 (see :func:`reference_event_class_loss`).
    """
    events = target[..., :-1]                                              # [B, T, K]
    return events.amax(dim=-1), events.argmax(dim=-1).amax(dim=1)


def reference_event_class_loss(class_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REFERENCE BUG (cmran README quirk 1): cross-entropy towards class 0 for videos with no event. [B]."""
    _, video_class = segment_event_targets(target)
    return F.cross_entropy(class_logits, video_class, reduction="none")


def reference_weak_loss(video_logits: torch.Tensor, video_label: torch.Tensor) -> torch.Tensor:
    """REFERENCE BUG (cmran_weak README quirk 1): MultiLabelSoftMarginLoss on softmax probabilities. [B]."""
    probs = torch.softmax(video_logits, dim=-1)
    return F.multilabel_soft_margin_loss(probs, video_label.to(probs.dtype), reduction="none")


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------

class _CMRANTrunk(nn.Module):
    """Everything before the localisation head; shared by the supervised and the weak model."""

    def __init__(self, *, audio_dim: int, visual_dim: int, grid: tuple[int, int], num_classes: int,
                 channel_hidden: int, bottleneck: int, spatial_hidden: int, d_model: int, ff_dim: int,
                 heads: int, encoder_layers: int, inter_heads: int, dropout: float, visual_dropout: float):
        super().__init__()
        self.grid = tuple(grid)          # not needed by the computation: any H x W grid works
        self.num_classes = num_classes
        self.v_fc = nn.Linear(visual_dim, visual_dim)
        self.visual_dropout = nn.Dropout(visual_dropout)
        self.spatial_channel_att = AudioGuidedChannelSpatialAttention(
            audio_dim=audio_dim, visual_dim=visual_dim, channel_hidden=channel_hidden,
            bottleneck=bottleneck, spatial_hidden=spatial_hidden,
        )
        blocks = dict(d_model=d_model, heads=heads, ff_dim=ff_dim, dropout=dropout)
        self.video_encoder = Encoder(in_dim=visual_dim, layers=encoder_layers, **blocks)
        self.audio_decoder = Decoder(in_dim=audio_dim, **blocks)
        self.audio_encoder = Encoder(in_dim=audio_dim, layers=encoder_layers, **blocks)
        self.video_decoder = Decoder(in_dim=visual_dim, **blocks)
        self.av_inter = CrossModalInteraction(d_model=d_model, heads=inter_heads, dropout=dropout,
                                              attn_dropout=dropout)

    def features(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, T, Da], visual [B, T, H, W, Dv] -> fused segment features [B, T, d], attention [B, T, H, W]."""
        visual = self.visual_dropout(F.relu(self.v_fc(visual)))            # [B, T, H, W, Dv]
        v, attention = self.spatial_channel_att(audio, visual)             # [B, T, Dv], [B, T, H, W]
        video_kv = self.video_encoder(v)                                   # [B, T, d]
        audio_q = self.audio_decoder(audio, video_kv)                      # [B, T, d] audio queries video
        audio_kv = self.audio_encoder(audio)                               # [B, T, d]
        video_q = self.video_decoder(v, audio_kv)                          # [B, T, d] video queries audio
        # The audio stream enters only here (CMRAN has no second, audio-side interaction block).
        return self.av_inter(video_q, audio_q), attention                  # [B, T, d]


_SIZES = dict(channel_hidden=512, bottleneck=256, spatial_hidden=256, d_model=256, ff_dim=2048,
              heads=4, encoder_layers=2)


@register_model("cmran")
class CMRAN(_CMRANTrunk):
    """Fully supervised CMRAN (reference class supv_main_model)."""

    outputs = ("segment_scores", "event_logits", "class_logits", "attention")
    loss_weights = {"is_event": 1.0, "event_class": 1.0}
    tasks = ("supervised",)
    reference_classes = ()               # the repository saves state_dicts only

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, channel_hidden: int = 512, bottleneck: int = 256,
                 spatial_hidden: int = 256, d_model: int = 256, ff_dim: int = 2048, heads: int = 4,
                 encoder_layers: int = 2, inter_heads: int = 4, dropout: float = 0.1,
                 visual_dropout: float = 0.2):
        super().__init__(audio_dim=audio_dim, visual_dim=visual_dim, grid=grid, num_classes=num_classes,
                         channel_hidden=channel_hidden, bottleneck=bottleneck, spatial_hidden=spatial_hidden,
                         d_model=d_model, ff_dim=ff_dim, heads=heads, encoder_layers=encoder_layers,
                         inter_heads=inter_heads, dropout=dropout, visual_dropout=visual_dropout)
        self.localize = SupervisedLocalization(d_model=d_model, event_classes=num_classes - 1)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        x, attention = self.features(audio, visual)                        # [B, T, d]
        event_logits, class_logits = self.localize(x)                      # [B, T], [B, K]
        # Rule: foreground where the event logit > 0, then the argmax of the K class logits.
        segment_scores = gate_scores(torch.sigmoid(event_logits), torch.softmax(class_logits, dim=-1))
        return {"segment_scores": segment_scores, "event_logits": event_logits,
                "class_logits": class_logits, "attention": attention}

    def loss_terms(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
        if task != "supervised":
            raise ValueError(f"cmran trains only the supervised task, not {task!r}")
        logits = out["event_logits"]
        is_event, video_class = segment_event_targets(batch["target"].to(logits.dtype))
        # Per video: the mean over its T segments; the batch mean is then the reference's mean over B*T.
        bce = F.binary_cross_entropy_with_logits(logits, is_event, reduction="none").mean(dim=1)
        # FIX of the reference's class-0 target: a video without event segments has no event class, so
        # it adds nothing to the class term (the gate term already trains it towards background).
        has_event = is_event.amax(dim=1)
        ce = F.cross_entropy(out["class_logits"], video_class, reduction="none") * has_event
        return {"is_event": bce, "event_class": ce}

    @staticmethod
    def convert_reference(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
        return _convert_reference(CMRAN, state_dict, background_column=False)


@register_model("cmran_weak")
class CMRANWeak(_CMRANTrunk):
    """Weakly supervised CMRAN (reference class weak_main_model): video labels only.

    Extra output ``raw_logits`` [B, C]: the head's class logits of the time-max-pooled features,
    background included; the reference's inference rule takes their argmax.
    """

    outputs = ("segment_scores", "event_logits", "raw_logits", "video_logits", "attention")
    loss_weights = {"event_class": 1.0}
    tasks = ("weak",)
    reference_classes = ()               # the repository saves state_dicts only

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, channel_hidden: int = 512, bottleneck: int = 256,
                 spatial_hidden: int = 256, d_model: int = 256, ff_dim: int = 2048, heads: int = 4,
                 encoder_layers: int = 2, inter_heads: int = 2, dropout: float = 0.1,
                 visual_dropout: float = 0.2):
        super().__init__(audio_dim=audio_dim, visual_dim=visual_dim, grid=grid, num_classes=num_classes,
                         channel_hidden=channel_hidden, bottleneck=bottleneck, spatial_hidden=spatial_hidden,
                         d_model=d_model, ff_dim=ff_dim, heads=heads, encoder_layers=encoder_layers,
                         inter_heads=inter_heads, dropout=dropout, visual_dropout=visual_dropout)
        self.localize = WeakLocalization(d_model=d_model, num_classes=num_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        x, attention = self.features(audio, visual)                        # [B, T, d]
        event_logits, raw_logits, video_logits = self.localize(x)          # [B, T], [B, C], [B, C]
        # Rule: foreground where the event logit > 0, then the argmax of raw_logits over all C columns.
        segment_scores = open_gate_scores(torch.sigmoid(event_logits), torch.softmax(raw_logits, dim=-1))
        return {"segment_scores": segment_scores, "event_logits": event_logits, "raw_logits": raw_logits,
                "video_logits": video_logits, "attention": attention}

    def loss_terms(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
        if task != "weak":
            raise ValueError(f"cmran_weak trains only the weak task, not {task!r}")
        logits = out["video_logits"]
        # FIX of the reference, which applies this loss (a sigmoid per class) to the softmax
        # probabilities: here it gets the pooled logits, its intended input.
        label = batch["video_label"].to(logits.dtype)
        return {"event_class": F.multilabel_soft_margin_loss(logits, label, reduction="none")}

    @staticmethod
    def convert_reference(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
        return _convert_reference(CMRANWeak, state_dict, background_column=True)


# ---------------------------------------------------------------------------------------------
# Reference checkpoint conversion
# ---------------------------------------------------------------------------------------------

# Registered by the reference and saved, but never used by its forward: the attention module's
# affine_video_guided_1/2, the template layers the encoder/decoder stacks were deep-copied from, and
# the decoder layer's never-called self-attention.
UNUSED_REFERENCE_KEYS = (
    r"spatial_channel_att\.affine_video_guided_[12]\.(weight|bias)",
    r"(video|audio)_encoder\.encoder_layer\..+",
    r"(video|audio)_decoder\.decoder_layer\..+",
    r"(video|audio)_decoder\.decoder\.layers\.0\.self_attn\..+",
)

# Reference name -> avel name, by prefix (first match wins; the rest of the name is kept).
_RENAMES = (
    (r"(video|audio)_encoder\.encoder\.layers\.(\d+)\.linear([12])\.", r"\1_encoder.layers.\2.ffn.linear\3."),
    (r"(video|audio)_encoder\.encoder\.layers\.(\d+)\.", r"\1_encoder.layers.\2."),
    (r"(video|audio)_decoder\.decoder\.layers\.0\.multihead_attn\.", r"\1_decoder.layer.cross_attn."),
    (r"(video|audio)_decoder\.decoder\.layers\.0\.linear([12])\.", r"\1_decoder.layer.ffn.linear\2."),
    (r"(video|audio)_decoder\.decoder\.layers\.0\.", r"\1_decoder.layer."),
    (r"AVInter\.video_multihead\.", "av_inter.attn."),
    (r"AVInter\.norm1\.", "av_inter.norm."),
    (r"localize_module\.", "localize."),
)
_UNUSED = tuple(re.compile(p) for p in UNUSED_REFERENCE_KEYS)
_RENAMES_RE = tuple((re.compile(p), r) for p, r in _RENAMES)


def _shape(state_dict: dict[str, torch.Tensor], key: str, dim: int) -> int:
    if key not in state_dict:
        raise ValueError(f"reference state_dict lacks {key!r}")
    return int(state_dict[key].shape[dim])


def _convert_reference(cls: type[nn.Module], state_dict: dict[str, torch.Tensor], *, background_column: bool):
    """Shared by both variants: infer the sizes, rename, drop the unused keys, check every shape."""
    sd = state_dict
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"video_encoder\.encoder\.layers\.(\d+)\.", k))}
    classes = _shape(sd, "localize_module.event_classifier.weight", 0)
    kwargs = dict(
        audio_dim=_shape(sd, "spatial_channel_att.affine_audio_1.weight", 1),
        visual_dim=_shape(sd, "v_fc.weight", 1),
        num_classes=classes if background_column else classes + 1,
        channel_hidden=_shape(sd, "spatial_channel_att.affine_video_1.weight", 0),
        bottleneck=_shape(sd, "spatial_channel_att.affine_bottleneck.weight", 0),
        spatial_hidden=_shape(sd, "spatial_channel_att.affine_video_2.weight", 0),
        d_model=_shape(sd, "video_encoder.affine_matrix.weight", 0),
        ff_dim=_shape(sd, "video_encoder.encoder.layers.0.linear1.weight", 0),
        encoder_layers=max(layer_ids) + 1,
    )
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}                                            # avel name -> reference name
    for key, value in sd.items():
        if any(p.fullmatch(key) for p in _UNUSED):
            continue
        new = key
        for pattern, repl in _RENAMES_RE:
            if pattern.match(key):
                new = pattern.sub(repl, key, count=1)
                break
        out[new], origin[new] = value, key
    # The expected names and shapes, from a parameter-free (meta) build of the model.
    with torch.device("meta"):
        expected = {k: v.shape for k, v in cls(**kwargs).state_dict().items()}
    for key in expected:
        if key not in out:
            raise ValueError(f"reference state_dict lacks the parameter that becomes {key!r}")
        if out[key].shape != expected[key]:
            raise ValueError(f"{origin[key]!r}: shape {tuple(out[key].shape)}, expected {tuple(expected[key])}")
    unexpected = sorted(origin[k] for k in set(out) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected reference key(s): {unexpected}")
    return kwargs, out
