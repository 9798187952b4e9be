"""PSP: positive sample propagation (jasongief/PSP_CVPR_2021), fully and weakly supervised.

Both models attend over the visual grid with the audio (the 2018 audio-guided attention), encode each
modality with a BiLSTM, and then let every segment of one modality gather the segments of the other
modality it is most similar to ("positive samples"): the audio-visual affinity matrix is row-normalised,
entries not above a threshold are pruned, and the survivors weight a residual update. The supervised
model classifies every segment from the fused feature; the weak model weights the segment scores in
time and averages them into a video score.

The supervised backbone (:class:`PSPBackbone`) is shared with the contrastive CPSP models of
``avel.models.cpsp``: the first 42 reference state_dict entries of CPSP are this backbone's.

Facts the reference computation depends on (fixture READMEs psp/ and psp_weak/):
- the attention adds the audio guidance per grid position (``AudioGuidedAttention`` reproduces it);
- the pruning keeps entries STRICTLY greater than the threshold and compares in the model's dtype
  (float32 by default), never rounded further: some fixture entries lie within 1e-6 of it;
- the supervised PSP re-normalises the rows after pruning and refines with fc + ReLU; the weak one
  does neither. One LayerNorm (eps 1e-6) is shared by the two modalities.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AudioGuidedAttention
from .blocks import bilstm, encode
from .registry import register_model

# Added to the row sums before dividing (reference constant).
ROW_EPS = 1e-8


# --- positive sample propagation ------------------------------------------------------------------

class PositiveSamplePropagation(nn.Module):
    """The PSP block: audio [B, T, D], visual [B, T, D] -> final (visual, audio) features [B, T, D].

    ``renormalise`` and ``refine`` are True for the supervised PSP (and CPSP), False for the weak PSP
    of the PSP repository, which neither re-normalises after pruning nor has the fc layers.
    """

    def __init__(self, *, dim: int = 256, threshold: float = 0.099, renormalise: bool = True,
                 refine: bool = True, dropout: float = 0.1):
        super().__init__()
        self.dim = dim
        self.threshold = threshold
        self.renormalise = renormalise
        self.refine = refine
        # Four branches (bias-free linear, ReLU, dropout): v1/v2 from the visual, a1/a2 from the audio.
        self.v_L1 = nn.Linear(dim, dim, bias=False)
        self.v_L2 = nn.Linear(dim, dim, bias=False)
        self.a_L1 = nn.Linear(dim, dim, bias=False)
        self.a_L2 = nn.Linear(dim, dim, bias=False)
        if refine:                                          # supervised only: fc + ReLU after propagation
            self.v_fc = nn.Linear(dim, dim, bias=False)
            self.a_fc = nn.Linear(dim, dim, bias=False)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-6)       # one module for both modalities
        self.dropout = nn.Dropout(dropout)                  # p = 0.1 at every reference position

    def _branch(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.relu(layer(x)))

    def propagation_weights(self, beta: torch.Tensor) -> torch.Tensor:
        """beta [B, Tq, Tk] (non-negative) -> row weights [B, Tq, Tk] after normalising and pruning."""
        gamma = beta / (beta.sum(-1, keepdim=True) + ROW_EPS)
        # Keep only entries strictly above the threshold; the comparison runs in gamma's own dtype.
        gamma = gamma.masked_fill(gamma <= self.threshold, 0.0)
        if self.renormalise:
            gamma = gamma / (gamma.sum(-1, keepdim=True) + ROW_EPS)
        return gamma

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v1 = self._branch(self.v_L1, visual)                                 # [B, T, D]
        v2 = self._branch(self.v_L2, visual)
        a1 = self._branch(self.a_L1, audio)
        a2 = self._branch(self.a_L2, audio)
        # Scaled affinity, rows = visual segments, columns = audio segments; ReLU keeps positives only.
        beta = F.relu(torch.bmm(v2, a1.transpose(1, 2)) / math.sqrt(self.dim))   # [B, T, T]
        gamma_va = self.propagation_weights(beta)                            # visual rows gather audio
        gamma_av = self.propagation_weights(beta.transpose(1, 2))            # audio rows gather visual
        v_psp = visual + torch.bmm(gamma_va, a2)                             # [B, T, D]
        a_psp = audio + torch.bmm(gamma_av, v1)
        if self.refine:
            v_psp = self._branch(self.v_fc, v_psp)
            a_psp = self._branch(self.a_fc, a_psp)
        return self.layer_norm(v_psp), self.layer_norm(a_psp)


def segment_cosine(visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    """[B, T, D] x2 -> [B, T]: per-segment cosine of the final features (normalize eps 1e-12)."""
    return (F.normalize(visual, dim=-1) * F.normalize(audio, dim=-1)).sum(-1)


# --- the AVPS (audio-visual pair similarity) loss and its target ----------------------------------

def avps_loss(avps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-video AVPS loss [B]: ReLU(avps) normalised over segments, squared error to the target.

    The mean over the batch is the reference MSELoss (mean over B*T). Reference form, kept: while all
    cosines of a video are <= 0, r is 0; once one turns positive, r is ~one-hot (a jump, not a slope).
    """
    r = F.relu(avps)                                                         # [B, T]
    r = r / (r.sum(-1, keepdim=True) + ROW_EPS)
    return (r - target.to(r.dtype)).pow(2).mean(-1)


def _avps_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels [B, T, C] one-hot -> (mask [B, T] of the chosen class's segments, value 1/count [B, T]).

    The chosen class is the smallest class column with any 1 in the video: the event class, or the
    background class C-1 for a video without event segments (then every segment gets 1/T).
    """
    present = (labels > 0.5).any(1)                                          # [B, C]
    first = present.to(torch.uint8).argmax(-1)                               # first True column
    on = labels.gather(2, first[:, None, None].expand(-1, labels.shape[1], 1)).squeeze(2) > 0.5
    count = on.sum(-1, keepdim=True).clamp_min(1).to(labels.dtype)
    return on, on.to(labels.dtype) / count


def avps_target(labels: torch.Tensor) -> torch.Tensor:
    """The AVPS target [B, T] of one batch, from a FRESH buffer: 1/count on the chosen class's segments.

    This is what the reference dataloader builds for its very first batch, and what the training hook
    uses for every batch (the reference's buffer is never reset; see avps_target_reference).
    """
    return _avps_pairs(labels)[1]                                            # 0 off the chosen class


def avps_target_reference(labels: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """The reference routine (PSP dataloader.py:52-69) with its BUG: writes into a persistent buffer.

    ``buffer`` [B, T] is created once per dataset and never cleared, so entries of earlier batches
    survive in every later one. Modifies ``buffer`` in place and returns it. Only for fixture tests.
    """
    on, value = _avps_pairs(labels)
    buffer[on] = value[on].to(buffer.dtype)
    return buffer


# --- the supervised backbone (shared with CPSP) ---------------------------------------------------

class PSPBackbone(nn.Module):
    """Projections, audio-guided attention, BiLSTMs and the supervised PSP block.

    audio [B, T, Da], visual [B, T, H, W, Dv] -> fusion [B, T, 2*hidden], avps [B, T], attention [B, T, H, W].
    """

    def __init__(self, *, audio_dim: int, visual_dim: int, grid: tuple[int, int], embed_dim: int,
                 proj_hidden: int, hidden: int, att_hidden: int, threshold: float):
        super().__init__()
        # Two linear maps without bias or activation between them (reference fa / fv).
        self.audio_proj = nn.Sequential(nn.Linear(audio_dim, proj_hidden, bias=False),
                                        nn.Linear(proj_hidden, embed_dim, bias=False))
        self.visual_proj = nn.Sequential(nn.Linear(visual_dim, proj_hidden, bias=False),
                                         nn.Linear(proj_hidden, embed_dim, bias=False))
        # The attention is guided by the PROJECTED audio.
        self.attention = AudioGuidedAttention(audio_dim=embed_dim, visual_dim=visual_dim, hidden=att_hidden,
                                              regions=grid[0] * grid[1])
        self.lstm_audio = bilstm(embed_dim, hidden)
        self.lstm_video = bilstm(embed_dim, hidden)
        self.psp = PositiveSamplePropagation(dim=2 * hidden, threshold=threshold)

    def features(self, audio: torch.Tensor, visual: torch.Tensor):
        fa = self.audio_proj(audio)                                          # [B, T, 128]
        attended, alpha = self.attention(fa, visual)                         # [B, T, 512], [B, T, H, W]
        fv = self.visual_proj(attended)                                      # [B, T, 128]
        h_a = encode(self.lstm_audio, fa)                                    # [B, T, 256]
        h_v = encode(self.lstm_video, fv)                                    # [B, T, 256]
        v_psp, a_psp = self.psp(h_a, h_v)                                    # [B, T, 256] each
        fusion = 0.5 * (v_psp + a_psp)                                       # [B, T, 256]
        return fusion, segment_cosine(v_psp, a_psp), alpha


# --- reference checkpoint conversion helpers -------------------------------------------------------

def _shape(state_dict: dict, key: str, dim: int) -> int:
    if key not in state_dict:
        raise ValueError(f"reference state_dict lacks key {key!r}")
    shape = state_dict[key].shape
    if len(shape) <= dim:
        raise ValueError(f"reference key {key!r} has shape {tuple(shape)}; expected at least {dim + 1} dims")
    return int(shape[dim])


def _grid(regions: int) -> tuple[int, int]:
    """Only H*W enters the computation; a square grid is assumed where the count allows it."""
    side = math.isqrt(regions)
    return (side, side) if side * side == regions else (1, regions)


def _lstm_shapes(prefix: str, input_dim: int, hidden: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for suffix in ("", "_reverse"):
        shapes[f"{prefix}weight_ih_l0{suffix}"] = (4 * hidden, input_dim)
        shapes[f"{prefix}weight_hh_l0{suffix}"] = (4 * hidden, hidden)
        shapes[f"{prefix}bias_ih_l0{suffix}"] = (4 * hidden,)
        shapes[f"{prefix}bias_hh_l0{suffix}"] = (4 * hidden,)
    return shapes


def _attention_shapes(audio_dim: int, visual_dim: int, att_hidden: int, regions: int) -> dict:
    return {
        "attention.affine_audio.weight": (att_hidden, audio_dim), "attention.affine_audio.bias": (att_hidden,),
        "attention.affine_video.weight": (att_hidden, visual_dim), "attention.affine_video.bias": (att_hidden,),
        "attention.affine_v.weight": (regions, att_hidden), "attention.affine_g.weight": (regions, att_hidden),
        "attention.affine_h.weight": (1, regions),
    }


def _psp_shapes(dim: int, refine: bool) -> dict:
    names = ("v_L1", "v_L2", "v_fc", "a_L1", "a_L2", "a_fc") if refine else ("v_L1", "v_L2", "a_L1", "a_L2")
    shapes = {f"psp.{n}.weight": (dim, dim) for n in names}
    shapes.update({"psp.layer_norm.weight": (dim,), "psp.layer_norm.bias": (dim,)})
    return shapes


def backbone_reference_shapes(kw: dict) -> dict[str, tuple[int, ...]]:
    """Reference names -> shapes of the supervised PSP backbone (also CPSP's first 42 entries)."""
    p, e, h, v = kw["proj_hidden"], kw["embed_dim"], kw["hidden"], kw["visual_dim"]
    shapes = {"fa.0.weight": (p, kw["audio_dim"]), "fa.1.weight": (e, p),
              "fv.0.weight": (p, v), "fv.1.weight": (e, p),
              "linear_v.weight": (e, v), "linear_v.bias": (e,)}
    shapes.update(_attention_shapes(e, v, kw["att_hidden"], kw["grid"][0] * kw["grid"][1]))
    shapes.update(_lstm_shapes("lstm_a_v.lstm_audio.", e, h))
    shapes.update(_lstm_shapes("lstm_a_v.lstm_video.", e, h))
    shapes.update(_psp_shapes(2 * h, refine=True))
    k, hh = kw["num_classes"] - 1, kw["head_hidden"]
    for side in ("v_classify", "a_classify"):
        shapes.update({f"{side}.L1.weight": (hh, 2 * h), f"{side}.L2.weight": (k, hh)})
    return shapes


def backbone_kwargs(sd: dict) -> dict:
    """Constructor keywords of the backbone, read from the reference shapes."""
    return {
        "audio_dim": _shape(sd, "fa.0.weight", 1),
        "visual_dim": _shape(sd, "fv.0.weight", 1),
        "grid": _grid(_shape(sd, "attention.affine_v.weight", 0)),
        "embed_dim": _shape(sd, "fa.1.weight", 0),
        "proj_hidden": _shape(sd, "fa.0.weight", 0),
        "hidden": _shape(sd, "lstm_a_v.lstm_audio.weight_hh_l0", 1),
        "att_hidden": _shape(sd, "attention.affine_audio.weight", 0),
        "head_hidden": _shape(sd, "v_classify.L1.weight", 0),
    }


# Reference prefix -> avel prefix of the backbone (unused reference modules are not listed).
BACKBONE_RENAMES = (
    ("fa.", "audio_proj."),
    ("fv.", "visual_proj."),
    ("attention.", "attention."),
    ("lstm_a_v.lstm_audio.", "lstm_audio."),
    ("lstm_a_v.lstm_video.", "lstm_video."),
    ("psp.", "psp."),
)


def convert_state_dict(sd: dict, shapes: dict, renames, unused) -> dict:
    """Check the reference keys and shapes exactly, drop the unused ones, rename the rest (no copies)."""
    missing = [k for k in shapes if k not in sd]
    if missing:
        raise ValueError(f"reference state_dict lacks key {missing[0]!r}")
    unexpected = [k for k in sd if k not in shapes]
    if unexpected:
        raise ValueError(f"unexpected reference key {unexpected[0]!r}")
    out = {}
    for key, shape in shapes.items():
        if tuple(sd[key].shape) != tuple(shape):
            raise ValueError(f"reference key {key!r} has shape {tuple(sd[key].shape)}, expected {tuple(shape)}")
        if key in unused:
            continue
        for old, new in renames:
            if key.startswith(old):
                out[new + key[len(old):]] = sd[key]
                break
        else:                                   # every used key must have a rename: a bug here, not in the file
            raise ValueError(f"no avel name for reference key {key!r}")
    return out


# --- PSP, fully supervised -----------------------------------------------------------------------

# Registered by the reference psp_net but never used by its forward.
PSP_UNUSED_REFERENCE_KEYS = (
    "linear_v.weight", "linear_v.bias",
    "v_classify.L1.weight", "v_classify.L2.weight", "a_classify.L1.weight", "a_classify.L2.weight",
    "L3.weight", "L3.bias", "L4.weight", "L4.bias",
)


@register_model("psp")
class PSP(PSPBackbone):
    """Fully supervised PSP (reference fully_model.psp_net).

    Outputs: ``logits`` [B, T, C] raw segment scores (reference ``out``); ``segment_scores`` their
    softmax (argmax = the reference decision); ``avps`` [B, T] audio-visual cosine per segment
    (reference ``cross_att``); ``fusion`` [B, T, 2*hidden]; ``attention`` [B, T, H, W].
    """

    outputs = ("logits", "segment_scores", "avps", "fusion", "attention")
    tasks = ("supervised",)
    loss_weights = {"cls": 1.0, "avps": 100.0}                    # LAMBDA = 100 (fully_supervised_main.py:39)
    reference_classes = ("fully_model.psp_net", "fully_model.AVGA", "fully_model.LSTM_A_V", "fully_model.PSP",
                         "fully_model.AVSimilarity", "fully_model.Classify")

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, embed_dim: int = 128, proj_hidden: int = 256, hidden: int = 128,
                 att_hidden: int = 512, head_hidden: int = 64, threshold: float = 0.099):
        super().__init__(audio_dim=audio_dim, visual_dim=visual_dim, grid=grid, embed_dim=embed_dim,
                         proj_hidden=proj_hidden, hidden=hidden, att_hidden=att_hidden, threshold=threshold)
        self.head = nn.Sequential(nn.Linear(2 * hidden, head_hidden, bias=False), nn.ReLU(),
                                  nn.Linear(head_hidden, num_classes, bias=False))

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        fusion, avps, alpha = self.features(audio, visual)
        logits = self.head(fusion)                                           # [B, T, C]
        return {"logits": logits, "segment_scores": torch.softmax(logits, dim=-1), "avps": avps,
                "fusion": fusion, "attention": alpha}

    def loss_terms(self, out: dict, batch: dict, task: str) -> dict[str, torch.Tensor]:
        if task != "supervised":
            raise ValueError(f"psp is trained fully supervised only, not {task!r}")
        target = batch["target"]                                             # [B, T, C] one-hot
        logits = out["logits"]
        cls = F.cross_entropy(logits.transpose(1, 2), target.argmax(-1), reduction="none").mean(-1)   # [B]
        # FIX: a fresh AVPS target per batch (the reference buffer keeps entries of earlier batches).
        return {"cls": cls, "avps": avps_loss(out["avps"], avps_target(target))}

    @staticmethod
    def reference_shapes(kw: dict) -> dict[str, tuple[int, ...]]:
        shapes = backbone_reference_shapes(kw)
        h, hh = kw["hidden"], kw["head_hidden"]
        shapes.update({"L1.weight": (hh, 2 * h), "L2.weight": (kw["num_classes"], hh),
                       "L3.weight": (hh, 2 * h), "L3.bias": (hh,), "L4.weight": (2, hh), "L4.bias": (2,)})
        return shapes

    @staticmethod
    def convert_reference(state_dict: dict) -> tuple[dict, dict]:
        kw = backbone_kwargs(state_dict)
        kw["num_classes"] = _shape(state_dict, "L2.weight", 0)
        renames = BACKBONE_RENAMES + (("L1.", "head.0."), ("L2.", "head.2."))
        sd = convert_state_dict(state_dict, PSP.reference_shapes(kw), renames, PSP_UNUSED_REFERENCE_KEYS)
        return kw, sd


# --- PSP, weakly supervised ----------------------------------------------------------------------

# Registered by the reference weakly psp_net but never used: temperature (ones at construction),
# W1 (256 -> 1) and W2 (64 -> 1).
PSP_WEAK_UNUSED_REFERENCE_KEYS = ("temperature", "W1.weight", "W2.weight")


def event_proportions(target: torch.Tensor) -> torch.Tensor:
    """Video labels of the weak PSP, [B, C]: the fraction of the video's segments in each class.

    The reference reads them from prob_label.h5 (not public); per the maintainer (PSP_CVPR_2021 issue
    #7, psp_weak README) it is the proportion of event and background segments: events/T at the event
    class, backgrounds/T at C-1. Derived here from the segment annotations (batch["target"]).
    """
    return target.mean(1)


@register_model("psp_weak")
class PSPWeak(nn.Module):
    """Weakly supervised PSP (reference weakly_model.psp_net; a different network from the supervised one).

    Outputs: ``logits`` [B, T, C] the temporally weighted segment scores (reference ``score``);
    ``segment_scores`` their softmax (the reference's test-time decision); ``raw_logits`` [B, T, C]
    the scores before the weighting; ``temporal_weight`` [B, T] the weight in [0.5, 1);
    ``video_logits`` [B, C] mean of ``logits`` over segments; ``video_prob`` [B, C] its softmax
    (reference ``out_avg``); ``fusion`` [B, T, 2*hidden]; ``attention`` [B, T, H, W].
    """

    outputs = ("logits", "segment_scores", "raw_logits", "temporal_weight", "video_logits", "video_prob",
               "fusion", "attention")
    tasks = ("weak",)
    loss_weights = {"bce": 1.0}
    reference_classes = ("weakly_model.psp_net", "weakly_model.AVGA", "weakly_model.LSTM_A_V", "weakly_model.PSP")

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, embed_dim: int = 128, hidden: int = 128, att_hidden: int = 512,
                 head_hidden: int = 64, threshold: float = 0.095):
        super().__init__()
        # No audio projection: the raw audio guides the attention and feeds its LSTM.
        self.attention = AudioGuidedAttention(audio_dim=audio_dim, visual_dim=visual_dim, hidden=att_hidden,
                                              regions=grid[0] * grid[1])
        self.visual_proj = nn.Linear(visual_dim, embed_dim)                  # reference linear_v, with bias
        self.lstm_audio = bilstm(audio_dim, hidden)
        self.lstm_video = bilstm(embed_dim, hidden)
        self.psp = PositiveSamplePropagation(dim=2 * hidden, threshold=threshold, renormalise=False, refine=False)
        self.head = nn.Sequential(nn.Linear(2 * hidden, head_hidden, bias=False), nn.ReLU(),
                                  nn.Linear(head_hidden, num_classes, bias=False))
        self.temporal_weight = nn.Linear(num_classes, 1, bias=False)        # reference W3

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        attended, alpha = self.attention(audio, visual)                      # [B, T, 512], [B, T, H, W]
        h_a = encode(self.lstm_audio, audio)                                 # [B, T, 256]
        h_v = encode(self.lstm_video, self.visual_proj(attended))            # [B, T, 256]
        v_psp, a_psp = self.psp(h_a, h_v)
        fusion = 0.5 * (v_psp + a_psp)                                       # [B, T, 256]
        raw = self.head(fusion)                                              # [B, T, C]
        # sigmoid of a ReLU: every segment keeps at least half of its score.
        weight = torch.sigmoid(F.relu(self.temporal_weight(raw)))            # [B, T, 1]
        logits = raw * weight                                                # [B, T, C]
        video_logits = logits.mean(1)                                        # AvgPool1d over all T segments
        return {"logits": logits, "segment_scores": torch.softmax(logits, dim=-1), "raw_logits": raw,
                "temporal_weight": weight.squeeze(-1), "video_logits": video_logits,
                "video_prob": torch.softmax(video_logits, dim=-1), "fusion": fusion, "attention": alpha}

    def loss_terms(self, out: dict, batch: dict, task: str) -> dict[str, torch.Tensor]:
        if task != "weak":
            raise ValueError(f"psp_weak is trained weakly supervised only, not {task!r}")
        prob = out["video_prob"]
        labels = event_proportions(batch["target"]).to(prob.dtype)           # derived from the annotations
        # BCELoss on probabilities, mean over classes per video (batch mean = the reference mean over B*C).
        return {"bce": F.binary_cross_entropy(prob, labels, reduction="none").mean(-1)}

    @staticmethod
    def reference_shapes(kw: dict) -> dict[str, tuple[int, ...]]:
        a, v, e, h, c, hh = (kw["audio_dim"], kw["visual_dim"], kw["embed_dim"], kw["hidden"], kw["num_classes"],
                             kw["head_hidden"])
        shapes = {"temperature": (1, c), "linear_v.weight": (e, v), "linear_v.bias": (e,)}
        shapes.update(_attention_shapes(a, v, kw["att_hidden"], kw["grid"][0] * kw["grid"][1]))
        shapes.update(_lstm_shapes("lstm_a_v.lstm_audio.", a, h))
        shapes.update(_lstm_shapes("lstm_a_v.lstm_video.", e, h))
        shapes.update(_psp_shapes(2 * h, refine=False))
        shapes.update({"W1.weight": (1, 2 * h), "W2.weight": (1, hh), "W3.weight": (1, c),
                       "L1.weight": (hh, 2 * h), "L2.weight": (c, hh)})
        return shapes

    @staticmethod
    def convert_reference(state_dict: dict) -> tuple[dict, dict]:
        sd = state_dict
        kw = {
            "audio_dim": _shape(sd, "lstm_a_v.lstm_audio.weight_ih_l0", 1),
            "visual_dim": _shape(sd, "linear_v.weight", 1),
            "grid": _grid(_shape(sd, "attention.affine_v.weight", 0)),
            "num_classes": _shape(sd, "L2.weight", 0),
            "embed_dim": _shape(sd, "linear_v.weight", 0),
            "hidden": _shape(sd, "lstm_a_v.lstm_audio.weight_hh_l0", 1),
            "att_hidden": _shape(sd, "attention.affine_audio.weight", 0),
            "head_hidden": _shape(sd, "L1.weight", 0),
        }
        renames = (("linear_v.", "visual_proj."), ("attention.", "attention."),
                   ("lstm_a_v.lstm_audio.", "lstm_audio."), ("lstm_a_v.lstm_video.", "lstm_video."),
                   ("psp.", "psp."), ("W3.", "temporal_weight."), ("L1.", "head.0."), ("L2.", "head.2."))
        return kw, convert_state_dict(sd, PSPWeak.reference_shapes(kw), renames, PSP_WEAK_UNUSED_REFERENCE_KEYS)
