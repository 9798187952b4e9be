"""CMRAN: cross-modal relation-aware network (FloretCat/CMRAN, ACM MM 2020), supervised and weak.

Written from the fixture READMEs (shared/fixtures/followups/cmran*/README.txt), not from the
reference code. The computation, top to bottom:

  visual grid -> v_fc adapter -> audio-guided channel + spatial attention -> one vector per segment
  video encoder (self-attention)  --memory-->  audio decoder (audio queries the video)
  audio encoder (self-attention)  --memory-->  video decoder (video queries the audio)
  AV interaction (product of the two query streams attends to both) -> localisation head

Everything is batch first ([B, T, d]); the transformer blocks and the note on the reference's time-
first layout are in ``avel.models.transformer``. CMBS (``avel.models.cmbs``) descends from CMRAN and
reuses from here the visual adapter, the grid attention (its channel map can be computed from a
separate ``guide``), the supervised localisation head, the segment targets and the checkpoint
conversion (the reference-name rules of the shared blocks live in one place, :func:`reference_name`).
A little over 400 lines: both variants, their decision rules, losses and the family's checkpoint
conversion read together, in forward order.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import gate_scores
from .registry import register_model
from .transformer import CrossModalInteraction, Decoder, Encoder

# ---------------------------------------------------------------------------------------------
# Visual front end: the v_fc adapter and the audio-guided grid attention
# ---------------------------------------------------------------------------------------------

def visual_adapter(visual_dim: int, dropout: float) -> nn.Sequential:
    """v_fc: Linear on the channel axis of the grid, ReLU, dropout ([B, T, H, W, Dv] -> same)."""
    return nn.Sequential(nn.Linear(visual_dim, visual_dim), nn.ReLU(), nn.Dropout(dropout))


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

class RelationStage(nn.Module):
    """Base of every CMRAN-family model (CMBS too): the four relation blocks, built and run in one order.

    Each modality is encoded by self-attention (key/value) and queries the other's encoding through
    a decoder. The blocks are attributes of the model itself, named as in the references.
    """

    def build_relation(self, *, audio_dim: int, visual_dim: int, d_model: int, heads: int, encoder_ff: int,
                       decoder_ff: int, encoder_layers: int, dropout: float = 0.1) -> None:
        enc = dict(d_model=d_model, heads=heads, ff_dim=encoder_ff, layers=encoder_layers, dropout=dropout)
        dec = dict(d_model=d_model, heads=heads, ff_dim=decoder_ff, dropout=dropout)
        self.video_encoder = Encoder(in_dim=visual_dim, **enc)
        self.audio_decoder = Decoder(in_dim=audio_dim, **dec)
        self.audio_encoder = Encoder(in_dim=audio_dim, **enc)
        self.video_decoder = Decoder(in_dim=visual_dim, **dec)

    def relate(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """audio [B, T, Da], visual [B, T, Dv] -> (video_kv, audio_q, audio_kv, video_q), each [B, T, d]."""
        video_kv = self.video_encoder(visual)
        audio_q = self.audio_decoder(audio, video_kv)                      # audio queries video
        audio_kv = self.audio_encoder(audio)
        video_q = self.video_decoder(visual, audio_kv)                     # video queries audio
        return video_kv, audio_q, audio_kv, video_q


class _CMRANTrunk(RelationStage):
    """Everything before the localisation head, built by the constructor both variants share.

    The defaults are the authors' supervised values; the weak variant changes only ``inter_heads``
    (2). A variant supplies its head through :meth:`localizer`.
    """

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, channel_hidden: int = 512, bottleneck: int = 256,
                 spatial_hidden: int = 256, d_model: int = 256, ff_dim: int = 2048, heads: int = 4,
                 encoder_layers: int = 2, inter_heads: int = 4, dropout: float = 0.1,
                 visual_dropout: float = 0.2):
        super().__init__()
        self.grid = tuple(grid)          # not needed by the computation: any H x W grid works
        self.num_classes = num_classes
        self.v_fc = visual_adapter(visual_dim, visual_dropout)
        self.spatial_channel_att = AudioGuidedChannelSpatialAttention(
            audio_dim=audio_dim, visual_dim=visual_dim, channel_hidden=channel_hidden,
            bottleneck=bottleneck, spatial_hidden=spatial_hidden,
        )
        self.build_relation(audio_dim=audio_dim, visual_dim=visual_dim, d_model=d_model, heads=heads,
                            encoder_ff=ff_dim, decoder_ff=ff_dim, encoder_layers=encoder_layers, dropout=dropout)
        self.av_inter = CrossModalInteraction(d_model=d_model, heads=inter_heads, dropout=dropout,
                                              attn_dropout=dropout)
        self.localize = self.localizer(d_model=d_model, num_classes=num_classes)

    @staticmethod
    def localizer(*, d_model: int, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def features(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, T, Da], visual [B, T, H, W, Dv] -> fused segment features [B, T, d], attention [B, T, H, W]."""
        visual = self.v_fc(visual)                                         # [B, T, H, W, Dv]
        v, attention = self.spatial_channel_att(audio, visual)             # [B, T, Dv], [B, T, H, W]
        _, audio_q, _, video_q = self.relate(audio, v)                     # [B, T, d] each
        # The audio stream enters only here (CMRAN has no second, audio-side interaction block).
        return self.av_inter(video_q, audio_q), attention                  # [B, T, d]


@register_model("cmran")
class CMRAN(_CMRANTrunk):
    """Fully supervised CMRAN (reference class supv_main_model); the constructor is the trunk's."""

    outputs = ("segment_scores", "event_logits", "class_logits", "attention")
    loss_weights = {"is_event": 1.0, "event_class": 1.0}
    tasks = ("supervised",)
    reference_classes = ()               # the repository saves state_dicts only

    @staticmethod
    def localizer(*, d_model: int, num_classes: int) -> nn.Module:
        return SupervisedLocalization(d_model=d_model, event_classes=num_classes - 1)

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
        kwargs = _kwargs_from_reference(state_dict)
        kwargs["num_classes"] = reference_shape(state_dict, "localize_module.event_classifier.weight")[0] + 1
        return convert_renamed(CMRAN, state_dict, kwargs, reference_name, UNUSED_REFERENCE_KEYS)


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

    # Only the inter_heads default differs from the trunk's (the weak reference uses 2 heads).
    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, channel_hidden: int = 512, bottleneck: int = 256,
                 spatial_hidden: int = 256, d_model: int = 256, ff_dim: int = 2048, heads: int = 4,
                 encoder_layers: int = 2, inter_heads: int = 2, dropout: float = 0.1,
                 visual_dropout: float = 0.2):
        super().__init__(audio_dim=audio_dim, visual_dim=visual_dim, grid=grid, num_classes=num_classes,
                         channel_hidden=channel_hidden, bottleneck=bottleneck, spatial_hidden=spatial_hidden,
                         d_model=d_model, ff_dim=ff_dim, heads=heads, encoder_layers=encoder_layers,
                         inter_heads=inter_heads, dropout=dropout, visual_dropout=visual_dropout)

    @staticmethod
    def localizer(*, d_model: int, num_classes: int) -> nn.Module:
        return WeakLocalization(d_model=d_model, num_classes=num_classes)

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
        kwargs = _kwargs_from_reference(state_dict)
        # The weak head's classes include background.
        kwargs["num_classes"] = reference_shape(state_dict, "localize_module.event_classifier.weight")[0]
        return convert_renamed(CMRANWeak, state_dict, kwargs, reference_name, UNUSED_REFERENCE_KEYS)


# ---------------------------------------------------------------------------------------------
# Reference checkpoint conversion (also CMBS's: its shared blocks carry the same names)
# ---------------------------------------------------------------------------------------------

# Registered by the reference and saved, but never used by its forward (fnmatch patterns): the
# template layers the encoder/decoder stacks were deep-copied from, and the decoder layer's
# never-called self-attention. CMBS's references have them too.
UNUSED_STACK_KEYS = (
    "video_encoder.encoder_layer.*", "audio_encoder.encoder_layer.*",
    "video_decoder.decoder_layer.*", "audio_decoder.decoder_layer.*",
    "video_decoder.decoder.layers.0.self_attn.*", "audio_decoder.decoder.layers.0.self_attn.*",
)
# CMRAN's attention module also registers affine_video_guided_1/2 and never calls them.
UNUSED_REFERENCE_KEYS = UNUSED_STACK_KEYS + ("spatial_channel_att.affine_video_guided_[12].*",)

# avel name -> reference name for the blocks of the CMRAN family, by prefix (first match wins; the
# rest of the name is kept). Encoder/decoder FFN weights sit directly on the reference layer.
_REFERENCE_NAMES = tuple((re.compile(p), r) for p, r in (
    (r"v_fc\.0\.", "v_fc."),
    (r"(video|audio)_encoder\.layers\.(\d+)\.attn\.", r"\1_encoder.encoder.layers.\2.self_attn."),
    (r"(video|audio)_encoder\.layers\.(\d+)\.(?:ffn\.)?", r"\1_encoder.encoder.layers.\2."),
    (r"(video|audio)_decoder\.layer\.attn\.", r"\1_decoder.decoder.layers.0.multihead_attn."),
    (r"(video|audio)_decoder\.layer\.(?:ffn\.)?", r"\1_decoder.decoder.layers.0."),
    (r"av_inter\.attn\.", "AVInter.video_multihead."),      # CMBS adds a second block, va_inter
    (r"av_inter\.norm\.", "AVInter.norm1."),
    (r"va_inter\.attn\.", "VAInter.video_multihead."),
    (r"va_inter\.norm\.", "VAInter.norm1."),
    (r"localize\.", "localize_module."),
))


def reference_name(name: str) -> str:
    """avel parameter name -> the reference's, for every block CMRAN and CMBS share."""
    for pattern, repl in _REFERENCE_NAMES:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1)
    return name


def reference_shape(state_dict: dict, key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"reference checkpoint lacks key {key!r}")
    return tuple(state_dict[key].shape)


def _kwargs_from_reference(sd: dict) -> dict:
    """CMRAN's sizes readable off the reference shapes (head counts are not: the defaults are the authors')."""
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"video_encoder\.encoder\.layers\.(\d+)\.", k))}
    return dict(
        audio_dim=reference_shape(sd, "spatial_channel_att.affine_audio_1.weight")[1],
        visual_dim=reference_shape(sd, "v_fc.weight")[1],
        channel_hidden=reference_shape(sd, "spatial_channel_att.affine_video_1.weight")[0],
        bottleneck=reference_shape(sd, "spatial_channel_att.affine_bottleneck.weight")[0],
        spatial_hidden=reference_shape(sd, "spatial_channel_att.affine_video_2.weight")[0],
        d_model=reference_shape(sd, "video_encoder.affine_matrix.weight")[0],
        ff_dim=reference_shape(sd, "video_encoder.encoder.layers.0.linear1.weight")[0],
        encoder_layers=max(layer_ids, default=-1) + 1,
    )


def convert_renamed(cls: type[nn.Module], state_dict: dict, kwargs: dict, rename: Callable[[str], str],
                    unused: tuple[str, ...]) -> tuple[dict, dict]:
    """Map reference names to avel names, checking keys and shapes against a meta-device model.

    ``rename(avel_name) -> reference_name``; ``unused`` = fnmatch patterns of the reference keys
    that are registered but never used (dropped). Returns (kwargs, avel state_dict); the tensors are
    the input tensors (or views of them): nothing big is allocated.
    """
    with torch.device("meta"):
        expected = cls(**kwargs).state_dict()
    out, used = {}, set()
    for name, meta in expected.items():
        ref = rename(name)
        if ref not in state_dict:
            raise ValueError(f"reference checkpoint lacks key {ref!r} (avel {name!r})")
        t = state_dict[ref]
        if t.dim() == meta.dim() + 1 and t.shape[-1] == 1:             # Conv1d(k=1) weight -> Linear
            t = t.squeeze(-1)
        if tuple(t.shape) != tuple(meta.shape):
            raise ValueError(f"reference key {ref!r} has shape {tuple(t.shape)}, expected {tuple(meta.shape)}")
        out[name] = t
        used.add(ref)
    for ref in state_dict:
        if ref not in used and not any(fnmatch.fnmatchcase(ref, p) for p in unused):
            raise ValueError(f"unexpected key {ref!r} in reference checkpoint")
    return kwargs, out
