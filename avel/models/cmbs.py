"""CMBS: cross-modal background suppression (Xia & Zhao, CVPR 2022), supervised and weakly supervised.

Written from the fixture READMEs (followups/cmbs, followups/cmbs_weak), which describe the public
marmot-xy/CMBS code at commit 48e1ffc; no reference code was copied. CMBS extends CMRAN:

  visual grid --v_fc--> spatial-channel attention (audio guided, plus a self-attention branch)
  [supervised only: BiLSTMs over audio and attended visual]
  each modality: encoder (self-attention) -> key/value; decoder (cross-modal relation attention,
  memory = [other modality's encoding, own query]) -> query stream
  gates from the encoders re-weight the other stream; class-activation sequences (CAS) on the
  gated streams; two "interaction" blocks (product + attention) fuse the streams; heads.

Reused from CMRAN unchanged (one implementation each): the transformer blocks of
``avel.models.transformer`` (Encoder, Decoder, CrossModalInteraction = the reference's AVInter/VAInter),
and from ``avel.models.cmran`` the v_fc adapter, the audio-guided channel and spatial steps (extended
here by :class:`SpatialChannelAttention`), the supervised localisation head, the segment targets and
the checkpoint conversion. The computation is batch first ([B, T, d]); avel calls
forward(audio, visual); the reference calls model(visual, audio).

avel's parameter names are the CMRAN blocks'; ``convert_reference`` maps the reference names onto
them (and drops the parameters the reference registers but never uses).

A little over 400 lines: the two variants share the attention block and the conversion, and each
keeps its reference-bug helpers beside it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import bilstm, encode
from .cmran import (
    UNUSED_STACK_KEYS,
    AudioGuidedChannelSpatialAttention,
    RelationStage,
    SupervisedLocalization,
    convert_renamed,
    reference_name,
    reference_shape,
    segment_event_targets,
    visual_adapter,
)
from .cmran import reference_weak_loss as cmran_reference_weak_loss
from .heads import gate_scores
from .registry import register_model
from .transformer import CrossModalInteraction

# ----------------------------------------------------------------------------------------------
# The CMBS spatial-channel attention: CMRAN's, plus a region self-attention branch and a beta term
# ----------------------------------------------------------------------------------------------

class RegionSelfAttention(nn.Module):
    """Self-attention over the grid positions of one segment (the first step of CMBS's attention).

    s = norm(x + drop(softmax(Q K^T) V)) with Q = video_query(x), K = video_key(x), V = video_value(x).
    QUIRK (reference): the energies Q K^T are NOT scaled by 1/sqrt(d). Softmax over the keys (last axis).
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


class SpatialChannelAttention(AudioGuidedChannelSpatialAttention):
    """CMBS audio-guided spatial-channel attention: CMRAN's channel and spatial steps, plus two additions.

    audio [B, T, Da], visual [B, T, H, W, Dv] -> (attended [B, T, Dv], spatial weights [B, T, H, W]).
    The regions first attend to each other (s, :class:`RegionSelfAttention`); the channel map is
    computed from s but applied to the raw regions (the parent's ``channel(..., guide=s)``); and a
    self-guided pooling of s scales the output by (1 + beta * sigmoid(.)). The parent's parameters keep
    their reference names; CMBS sizes them channel_hidden = Dv, bottleneck = spatial_hidden = hidden.
    """

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, hidden: int = 256,
                 self_att_dim: int = 128, beta: float = 0.4, dropout: float = 0.2):
        super().__init__(audio_dim=audio_dim, visual_dim=visual_dim, channel_hidden=visual_dim,
                         bottleneck=hidden, spatial_hidden=hidden)
        self.beta = beta
        self.region_att = RegionSelfAttention(visual_dim=visual_dim, qk_dim=self_att_dim, dropout=dropout)
        # Self-guided spatial pooling of s.
        self.affine_video_ave = nn.Linear(visual_dim, hidden)
        self.affine_video_3 = nn.Linear(visual_dim, hidden)
        self.ave_v_att = nn.Linear(hidden, 1)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, H, W, Dv = visual.shape
        raw = visual.reshape(B * T, H * W, Dv)                          # [N, HW, Dv], rows b-major then t
        a = audio.reshape(B * T, -1)                                    # [N, Da]

        s = self.region_att(raw)                                        # [N, HW, Dv]

        # Self-guided pooling of s (a global descriptor scores the regions).
        g = F.relu(self.affine_video_ave(s.mean(dim=1)))[:, None, :]           # [N, 1, hidden]
        q = F.relu(self.affine_video_3(s))                                     # [N, HW, hidden]
        w_self = torch.tanh(self.ave_v_att(q * g)).softmax(dim=1)              # [N, HW, 1]
        self_att_feat = (w_self * s).sum(dim=1)                                # [N, Dv]

        # Channel weights from s applied to the RAW regions (as the reference does), then CMRAN's
        # audio-guided spatial attention over the channel-weighted regions.
        cs, w_sp = self.spatial(a, self.channel(a, raw, guide=s))             # [N, Dv], [N, HW]

        # The self-attention branch gates the result up by at most beta.
        out = cs + self.beta * torch.sigmoid(self_att_feat) * cs               # [N, Dv]
        return out.view(B, T, Dv), w_sp.view(B, T, H, W)


def top_k_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, K] -> [B, K]: per class, the mean of the k largest values along time."""
    # A clip shorter than k seconds (a user's 3 s video) averages all of its segments.
    return x.topk(min(k, x.shape[1]), dim=1).values.mean(dim=1)


# ----------------------------------------------------------------------------------------------
# Supervised CMBS
# ----------------------------------------------------------------------------------------------

def supervised_targets(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """target [B, T, C] one-hot -> (event mask [B, T], reference video class [B], has_event [B] bool).

    CMRAN's targets (:func:`avel.models.cmran.segment_event_targets`): a video without events gets
    class 0; ``has_event`` says which videos those are.
    """
    is_event, video_class = segment_event_targets(target)
    return is_event, video_class, is_event.amax(dim=1) > 0


def reference_supervised_losses(out: dict, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The repository's four training terms (scalars), bugs included: only for checking fixtures.

    gate: BCE-with-logits on the already-sigmoided gate; cas / event_class: background-only
    videos trained towards class 0.
    """
    is_event, video_class, _ = supervised_targets(target)
    return {
        "is_event": F.binary_cross_entropy_with_logits(out["event_logits"], is_event),
        "gate": F.binary_cross_entropy_with_logits(out["audio_visual_gate"], is_event),
        "cas": F.cross_entropy(out["av_score"], video_class),
        "event_class": F.cross_entropy(out["class_logits"], video_class),
    }


@register_model("cmbs")
class CMBS(RelationStage):
    """Fully supervised CMBS (reference class supv_main_model)."""

    outputs = ("segment_scores", "event_logits", "class_logits", "av_score", "audio_visual_gate",
               "attention")
    loss_weights = {"is_event": 1.0, "gate": 1.0, "cas": 1.0, "event_class": 1.0}
    tasks = ("supervised",)
    reference_classes = ()          # the repository saves state_dicts only

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, d_model: int = 256, audio_rnn_hidden: int = 128,
                 visual_rnn_hidden: int = 256, att_hidden: int = 256, self_att_dim: int = 128,
                 encoder_layers: int = 2, encoder_ffn: int = 1024, decoder_ffn: int = 1024,
                 heads: int = 4, inter_heads: int = 4, alpha: float = 0.1, gamma: float = 0.3,
                 beta: float = 0.4, top_k: int = 4):
        super().__init__()
        self.grid = tuple(grid)      # any grid works; kept for the record
        self.alpha, self.gamma, self.top_k = alpha, gamma, top_k
        K = num_classes - 1
        self.v_fc = visual_adapter(visual_dim, 0.2)
        self.spatial_channel_att = SpatialChannelAttention(
            audio_dim=audio_dim, visual_dim=visual_dim, hidden=att_hidden, self_att_dim=self_att_dim, beta=beta)
        # The reference passes dropout=0.2 to these one-layer LSTMs, which has no effect; omitted.
        self.audio_rnn = bilstm(audio_dim, audio_rnn_hidden)
        self.visual_rnn = bilstm(visual_dim, visual_rnn_hidden)
        self.build_relation(audio_dim=2 * audio_rnn_hidden, visual_dim=2 * visual_rnn_hidden, d_model=d_model,
                            heads=heads, encoder_ff=encoder_ffn, decoder_ff=decoder_ffn,
                            encoder_layers=encoder_layers)
        self.audio_gate = nn.Linear(d_model, 1)
        self.video_gate = nn.Linear(d_model, 1)
        self.video_cas = nn.Linear(d_model, K)
        self.audio_cas = nn.Linear(d_model, K)
        self.av_inter = CrossModalInteraction(d_model=d_model, heads=inter_heads, attn_dropout=0.2)
        self.va_inter = CrossModalInteraction(d_model=d_model, heads=inter_heads, attn_dropout=0.2)
        self.localize = SupervisedLocalization(d_model=d_model, event_classes=K)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        v = self.v_fc(visual)                                                  # [B, T, H, W, Dv]
        v, attention = self.spatial_channel_att(audio, v)                      # [B, T, Dv], [B, T, H, W]
        a1 = encode(self.audio_rnn, audio)                                     # [B, T, 2*128] raw audio in
        v1 = encode(self.visual_rnn, v)                                        # [B, T, 2*256]

        video_kv, aq, audio_kv, vq = self.relate(a1, v1)                       # [B, T, d] each

        audio_gate = torch.sigmoid(self.audio_gate(audio_kv))                  # [B, T, 1]
        video_gate = torch.sigmoid(self.video_gate(video_kv))                  # [B, T, 1]
        av_gate = audio_gate * video_gate                                      # [B, T, 1], loss only
        # Background suppression: each stream is boosted by the OTHER modality's gate.
        vq = vq + audio_gate * vq * self.alpha
        aq = aq + video_gate * aq * self.alpha

        # Class activation sequences on the gated streams -> top-k temporal pooling.
        av_score = (top_k_mean(self.video_cas(vq), self.top_k)
                    + top_k_mean(self.audio_cas(aq), self.top_k)) / 2          # [B, K]

        vq = self.av_inter(vq, aq)
        aq = self.va_inter(aq, vq)                                             # uses the UPDATED vq
        event_logits, class_logits = self.localize((vq + aq) / 2)              # [B, T], [B, K]
        class_logits = class_logits + self.gamma * av_score                    # reference "event_scores"

        # Decision: background unless sigmoid(event logit) > 0.5, else the video's argmax class.
        scores = gate_scores(torch.sigmoid(event_logits), class_logits.softmax(dim=-1))
        return {"segment_scores": scores, "event_logits": event_logits, "class_logits": class_logits,
                "av_score": av_score, "audio_visual_gate": av_gate.squeeze(-1), "attention": attention}

    def loss_terms(self, out: dict, batch: dict, task: str) -> dict[str, torch.Tensor]:
        """Per-video [B] terms (the reference's four, with its two target/loss bugs fixed).

        - gate: the reference feeds the gate (a product of sigmoids, already a probability) to
          BCE-with-logits; here plain BCE on the probability.
        - cas, event_class: the reference trains a video without event segments towards class 0;
          here such a video contributes 0 to these terms (it has no event class to learn; its
          segments are still trained as background by is_event and gate).
        """
        if task != "supervised":
            raise ValueError(f"cmbs supports the supervised task only, not {task!r}")
        is_event, video_class, has_event = supervised_targets(batch["target"])
        keep = has_event.to(out["class_logits"].dtype)
        gate = out["audio_visual_gate"]
        return {
            "is_event": F.binary_cross_entropy_with_logits(out["event_logits"], is_event,
                                                           reduction="none").mean(dim=1),
            "gate": F.binary_cross_entropy(gate, is_event, reduction="none").mean(dim=1),
            "cas": F.cross_entropy(out["av_score"], video_class, reduction="none") * keep,
            "event_class": F.cross_entropy(out["class_logits"], video_class, reduction="none") * keep,
        }

    @staticmethod
    def convert_reference(state_dict: dict) -> tuple[dict, dict]:
        kwargs = _dims_from_reference(state_dict, with_rnn=True)
        kwargs["num_classes"] = reference_shape(state_dict, "localize_module.event_classifier.weight")[0] + 1
        return convert_renamed(CMBS, state_dict, kwargs, _reference_name, UNUSED_REFERENCE_KEYS)


# ----------------------------------------------------------------------------------------------
# Weakly supervised CMBS
# ----------------------------------------------------------------------------------------------

def repository_weak_decision(out: dict) -> torch.Tensor:
    """The repository's weak evaluation rule (degenerate), from the model outputs -> LongTensor [B, T].

    It thresholds sigmoid(av_gate) at 0.5, but av_gate is already a probability, so every segment
    is foreground and every segment of a video gets argmax(raw_logits) (over all C columns,
    background included). Kept only to report what the repository's accuracy would have said.
    """
    gate, raw = out["av_gate"], out["raw_logits"]
    video_class = raw.argmax(dim=-1)[:, None].expand_as(gate)                 # [B, T]
    background = torch.full_like(video_class, raw.shape[-1] - 1)
    return torch.where(torch.sigmoid(gate) > 0.5, video_class, background)


def corrected_weak_decision(out: dict) -> torch.Tensor:
    """The corrected rule (the fixture's ALT_pred_segments_gate_gt_0p5) -> LongTensor [B, T]:
    argmax(raw_logits) where av_gate > 0.5, background elsewhere. segment_scores decide the same."""
    gate, raw = out["av_gate"], out["raw_logits"]
    video_class = raw.argmax(dim=-1)[:, None].expand_as(gate)
    return torch.where(gate > 0.5, video_class, torch.full_like(video_class, raw.shape[-1] - 1))


def reference_weak_loss(out: dict, video_label: torch.Tensor) -> torch.Tensor:
    """The repository's weak loss (scalar), bug included: MultiLabelSoftMargin on SOFTMAX PROBABILITIES.

    The same bug as CMRAN weak's (:func:`avel.models.cmran.reference_weak_loss`), batch-averaged.
    """
    return cmran_reference_weak_loss(out["video_logits"], video_label).mean()


@register_model("cmbs_weak")
class CMBSWeak(RelationStage):
    """Weakly supervised CMBS (reference class weak_main_model). No LSTMs."""

    # repository_segment_scores: one-hot of the repository's degenerate rule, which avel's evaluator
    # scores beside segment_scores (reported as repository_rule_accuracy) so the gap is visible.
    outputs = ("segment_scores", "event_logits", "av_gate", "raw_logits", "video_logits", "cas_scores",
               "attention", "repository_segment_scores")
    loss_weights = {"event_class": 1.0}
    tasks = ("weak",)
    reference_classes = ()          # the repository saves state_dicts only

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, d_model: int = 256, att_hidden: int = 256, self_att_dim: int = 128,
                 encoder_layers: int = 2, encoder_ffn: int = 2048, decoder_ffn: int = 1024,
                 heads: int = 4, inter_heads: int = 2, alpha: float = 0.2, gamma: float = 0.5,
                 beta: float = 0.5, top_k: int = 4):
        super().__init__()
        self.grid = tuple(grid)
        self.alpha, self.gamma, self.top_k = alpha, gamma, top_k
        C = num_classes
        self.v_fc = visual_adapter(visual_dim, 0.1)
        self.spatial_channel_att = SpatialChannelAttention(
            audio_dim=audio_dim, visual_dim=visual_dim, hidden=att_hidden, self_att_dim=self_att_dim, beta=beta)
        self.build_relation(audio_dim=audio_dim, visual_dim=visual_dim, d_model=d_model, heads=heads,
                            encoder_ff=encoder_ffn, decoder_ff=decoder_ffn, encoder_layers=encoder_layers)
        self.av_inter = CrossModalInteraction(d_model=d_model, heads=inter_heads, attn_dropout=0.2)
        self.va_inter = CrossModalInteraction(d_model=d_model, heads=inter_heads, attn_dropout=0.2)
        self.audio_gate = nn.Linear(d_model, 1)
        self.video_gate = nn.Linear(d_model, 1)
        # The reference's Conv1d(d, C, kernel 1, no bias) over time: a per-segment bias-free Linear.
        self.cas_classifier = nn.Linear(d_model, C, bias=False)
        self.audio_cas = nn.Linear(d_model, C)
        self.video_cas = nn.Linear(d_model, C)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        v = self.v_fc(visual)                                                  # [B, T, H, W, Dv]
        v, attention = self.spatial_channel_att(audio, v)                      # [B, T, Dv], [B, T, H, W]

        video_kv, aq, audio_kv, vq = self.relate(audio, v)                     # [B, T, d] each

        # Crossed relative to the supervised model (reference quirk kept): the "audio" gate reads
        # the VIDEO encoding and the "video" gate the AUDIO encoding.
        audio_gate = torch.sigmoid(self.audio_gate(video_kv))                  # [B, T, 1]
        video_gate = torch.sigmoid(self.video_gate(audio_kv))                  # [B, T, 1]
        av_gate = (audio_gate + video_gate) / 2                                # [B, T, 1] probability
        vq = (1 - self.alpha) * vq + audio_gate * vq * self.alpha
        aq = (1 - self.alpha) * aq + video_gate * aq * self.alpha

        video_cas_gate = torch.sigmoid(self.video_cas(vq))                     # [B, T, C]
        audio_cas_gate = torch.sigmoid(self.audio_cas(aq))                     # [B, T, C]

        vq = self.av_inter(vq, aq)
        aq = self.va_inter(aq, vq)                                             # uses the UPDATED vq
        cas = self.cas_classifier((vq + aq) / 2)                               # [B, T, C]
        cas = self.gamma * video_cas_gate * cas + self.gamma * audio_cas_gate * cas
        raw_logits = top_k_mean(cas, self.top_k)                               # [B, C]
        # Video logits: the gate-weighted raw logits, max-pooled over time (softmax -> reference
        # "event_scores").
        video_logits = (av_gate * raw_logits[:, None, :]).max(dim=1).values    # [B, C]

        gate = av_gate.squeeze(-1)                                             # [B, T]
        # Decision (corrected rule): the video class argmax(raw_logits) where av_gate > 0.5, else
        # background; a video whose argmax is background is background everywhere.
        K = raw_logits.shape[-1] - 1
        is_fg_video = (raw_logits.argmax(dim=-1) != K).to(gate.dtype)[:, None]
        scores = gate_scores(gate * is_fg_video, raw_logits.softmax(dim=-1)[:, :K])
        # av_gate is a MEAN of two sigmoids: there is no single pre-sigmoid score. event_logits is
        # its logit, so sigmoid(event_logits) = av_gate and event_logits > 0 <=> av_gate > 0.5.
        out = {"segment_scores": scores, "event_logits": torch.logit(gate), "av_gate": gate,
               "raw_logits": raw_logits, "video_logits": video_logits, "cas_scores": cas, "attention": attention}
        repository = repository_weak_decision(out)                               # [B, T]
        out["repository_segment_scores"] = F.one_hot(repository, raw_logits.shape[-1]).to(scores.dtype)
        return out

    def loss_terms(self, out: dict, batch: dict, task: str) -> dict[str, torch.Tensor]:
        """Per-video [B] multi-label soft-margin loss on the pooled video LOGITS.

        Fix: the reference applies the loss to softmax probabilities (reference_weak_loss), so the
        sigmoid inside it sees values in (0, 1); here it gets the pre-softmax video_logits.
        Uses only batch["video_label"] (a background-only video is one-hot at C-1, as in the reference).
        """
        if task != "weak":
            raise ValueError(f"cmbs_weak supports the weak task only, not {task!r}")
        y = batch["video_label"].to(out["video_logits"].dtype)
        return {"event_class": F.multilabel_soft_margin_loss(out["video_logits"], y, reduction="none")}

    @staticmethod
    def convert_reference(state_dict: dict) -> tuple[dict, dict]:
        kwargs = _dims_from_reference(state_dict, with_rnn=False)
        kwargs["num_classes"] = reference_shape(state_dict, "video_cas.weight")[0]
        return convert_renamed(CMBSWeak, state_dict, kwargs, _reference_name, UNUSED_REFERENCE_KEYS_WEAK)


# ----------------------------------------------------------------------------------------------
# Checkpoint conversion shared by both variants (the mechanics and the shared blocks' names: cmran)
# ----------------------------------------------------------------------------------------------

def _dims_from_reference(sd: dict, with_rnn: bool) -> dict:
    """Constructor kwargs readable off the reference shapes (names as in the reference).
    Head counts, alpha / beta / gamma and top_k are not in the shapes: the defaults are the authors'."""
    def shape(key):
        return reference_shape(sd, key)
    enc_layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("video_encoder.encoder.layers.")})
    kw = {
        "audio_dim": shape("spatial_channel_att.affine_audio_1.weight")[1],
        "visual_dim": shape("v_fc.weight")[1],
        "att_hidden": shape("spatial_channel_att.affine_bottleneck.weight")[0],
        "self_att_dim": shape("spatial_channel_att.video_query.weight")[0],
        "d_model": shape("AVInter.norm1.weight")[0],
        "encoder_ffn": shape("video_encoder.encoder.layers.0.linear1.weight")[0],
        "decoder_ffn": shape("video_decoder.decoder.layers.0.linear1.weight")[0],
        "encoder_layers": len(enc_layers),
    }
    if with_rnn:
        kw["audio_rnn_hidden"] = shape("audio_visual_rnn_layer.audio_rnn.weight_hh_l0")[1]
        kw["visual_rnn_hidden"] = shape("audio_visual_rnn_layer.visual_rnn.weight_hh_l0")[1]
    return kw


# avel prefix -> reference prefix for the CMBS-only pieces; the rest as in CMRAN (reference_name).
_CMBS_NAMES = (
    ("spatial_channel_att.region_att.", "spatial_channel_att."),   # the reference has no sub-module
    ("audio_rnn.", "audio_visual_rnn_layer.audio_rnn."),
    ("visual_rnn.", "audio_visual_rnn_layer.visual_rnn."),
    ("audio_gate.", "audio_gated.0."),
    ("video_gate.", "video_gated.0."),
    ("cas_classifier.", "CAS_model.classifier.0."),                # cmbs_weak: a Conv1d(k=1) there
)


def _reference_name(name: str) -> str:
    """avel name -> reference name, for both variants."""
    for ours, theirs in _CMBS_NAMES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return reference_name(name)


# Reference parameters that never affect an output; convert_reference drops them (fnmatch patterns).
_UNUSED_COMMON = UNUSED_STACK_KEYS + ("spatial_channel_att.ave_bottleneck.*",)   # defined, never called
UNUSED_REFERENCE_KEYS = _UNUSED_COMMON + ("video_norm.*", "audio_norm.*")       # cmbs: LayerNorms never called
UNUSED_REFERENCE_KEYS_WEAK = _UNUSED_COMMON + ("classifier.*",)                 # cmbs_weak: Linear never called
