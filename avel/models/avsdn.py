"""AVSDN: audio-visual sequence-to-sequence dual network (the baseline shipped with the CPSP code).

One network serves both settings; the reference's ``flag`` ('fully' / 'weakly') changes only which
outputs are returned, never the parameters, so here forward always computes every output and
:meth:`AVSDN.loss_terms` picks the terms of the task.

Computation, top to bottom:
  1. audio-guided attention over the H*W grid with the raw audio (the 2018 AVE attention, reused);
  2. a BiLSTM encodes the attended visual sequence and another the audio; their final (h, c) states
     are mixed by one shared residual block and start a third BiLSTM that reads [audio, visual]
     concatenated; ``fusion`` = ReLU of its outputs;
  3. heads: a per-segment event logit, and video class logits from the segment mean of ``fusion``;
     the weak head scales the class logits by each segment's event probability, max-pools over the
     segments and takes a softmax over the event classes.
Inference (both settings): a segment is an event where sigmoid(event logit) > 0.5, labelled with the
argmax of the video class logits, otherwise background.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AudioGuidedAttention
from .blocks import bilstm
from .heads import gate_scores
from .registry import register_model

# Every parameter the reference registers is used, so no reference key is dropped on conversion.
UNUSED_REFERENCE_KEYS: tuple[str, ...] = ()

# Reference name (after the DataParallel "module." prefix) -> avel name, for names that change.
# Every other reference key (the three LSTMs, U_v, U_a) keeps its name.
_RENAMES = {
    "affine_audio.": "attention.affine_audio.",
    "affine_video.": "attention.affine_video.",
    "affine_v.": "attention.affine_v.",
    "affine_g.": "attention.affine_g.",
    "affine_h.": "attention.affine_h.",
    "event_classifier.0.": "event_head.",
    "category_classifier.0.": "category_head.",
}


def _transform(dim: int) -> nn.Sequential:
    """Linear -> tanh -> Linear: the U_v / U_a maps of the mixing block (index 1 has no weights)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))


@register_model("avsdn")
class AVSDN(nn.Module):
    outputs = ("segment_scores", "event_logits", "class_logits", "attention", "fusion",
               "pooled_logits", "video_prob")
    # Reference weights: supervised = BCE(event) + CE(class) (the only AVSDN configuration the
    # reference script can run, see the README's Losses section); weak = video-class loss + 1 * vcon.
    loss_weights = {"is_event": 1.0, "event_class": 1.0, "video_class": 1.0, "vcon": 1.0}
    tasks = ("supervised", "weak")
    reference_classes: tuple[str, ...] = ()     # the repository saves only state_dicts

    def __init__(self, *, audio_dim: int = 128, visual_dim: int = 512, grid: tuple[int, int] = (7, 7),
                 num_classes: int = 29, hidden: int = 128, att_hidden: int = 512,
                 vcon_margin: float = 0.6, vcon_negatives: int = 4):
        super().__init__()
        # vcon_* are the weak setting's video contrastive loss settings (run_weakly_supv.sh).
        self.vcon_margin = vcon_margin
        self.vcon_negatives = vcon_negatives
        self.attention = AudioGuidedAttention(audio_dim=audio_dim, visual_dim=visual_dim,
                                              hidden=att_hidden, regions=grid[0] * grid[1])
        self.lstm_video = bilstm(visual_dim, hidden)
        self.lstm_audio = bilstm(audio_dim, hidden)
        # The mixing block works on per-direction LSTM states, hence width `hidden`, not 2*hidden.
        self.U_v = _transform(hidden)
        self.U_a = _transform(hidden)
        self.lstm_a_v = bilstm(audio_dim + visual_dim, hidden)
        self.event_head = nn.Linear(2 * hidden, 1)
        self.category_head = nn.Linear(2 * hidden, num_classes - 1)

    def mix(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One residual block on final LSTM states: a, v [2, B, hidden] -> [2, B, hidden]."""
        m = 0.5 * (self.U_v(v) + self.U_a(a))
        # Each modality's tanh is taken on its own state plus the shared update, then averaged.
        return 0.5 * (torch.tanh(a + m) + torch.tanh(v + m))

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        # 1. audio-guided attention (identical to AudioGuidedAttention, incl. its g[:, :, None] broadcast)
        video_t, alpha = self.attention(audio, visual)                  # [B, T, Dv], [B, T, H, W]

        # 2. seq2seq: two encoders whose final states seed the joint BiLSTM
        _, (h_v, c_v) = self.lstm_video(video_t)                        # [2, B, h] each
        _, (h_a, c_a) = self.lstm_audio(audio)                          # [2, B, h] each
        # The same block (same weights) mixes the hidden and the cell states.
        h0 = self.mix(F.relu(h_a), F.relu(h_v))                         # [2, B, h]
        c0 = self.mix(F.relu(c_a), F.relu(c_v))                         # [2, B, h]
        joint, _ = self.lstm_a_v(torch.cat([audio, video_t], dim=-1), (h0, c0))  # [B, T, 2h], audio first
        fusion = F.relu(joint)                                          # [B, T, 2h]

        # 3. heads
        event_logits = self.event_head(fusion).squeeze(-1)              # [B, T]
        class_logits = self.category_head(fusion.mean(dim=1))           # [B, K]
        # Weak head: class logits gated by each segment's event probability, max over segments.
        gated = torch.sigmoid(event_logits)[:, :, None] * class_logits[:, None, :]   # [B, T, K]
        pooled_logits = gated.max(dim=1).values                         # [B, K]
        video_prob = torch.softmax(pooled_logits, dim=-1)               # [B, K] (predict_video_labels)

        # Rule of both settings: event where sigmoid > 0.5, class = argmax of the raw class logits.
        segment_scores = gate_scores(torch.sigmoid(event_logits), torch.softmax(class_logits, dim=-1))
        return {
            "segment_scores": segment_scores,                           # [B, T, C]
            "event_logits": event_logits,
            "class_logits": class_logits,
            "attention": alpha,
            "fusion": fusion,
            "pooled_logits": pooled_logits,
            "video_prob": video_prob,
        }

    def loss_terms(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                   task: str) -> dict[str, torch.Tensor]:
        """Unweighted per-video terms [B]; their batch means are the reference terms."""
        if task == "supervised":
            is_event, video_class = supervised_targets(batch["target"])
            is_event = is_event.to(out["event_logits"].dtype)
            # BCE-with-logits, reference mean over B*T = mean over B of the per-video mean over T.
            bce = F.binary_cross_entropy_with_logits(out["event_logits"], is_event, reduction="none").mean(1)
            ce = F.cross_entropy(out["class_logits"], video_class, reduction="none")
            # Fix: a video without event segments would be trained towards class 0 (its derived class
            # index); it has no event class, so it adds nothing to the class term.
            ce = ce * (is_event.sum(1) > 0).to(ce.dtype)
            return {"is_event": bce, "event_class": ce}
        if task == "weak":
            video_label = batch["video_label"].to(out["video_prob"].dtype)     # [B, C]
            # Fix: the reference feeds the softmax probabilities to MultiLabelSoftMarginLoss, which
            # treats them as logits; here they are scored as the probabilities they are.
            bce = F.binary_cross_entropy(out["video_prob"], video_label[:, :-1], reduction="none").mean(1)
            # Class index over all C entries, so a background-only video is its own class (C-1),
            # not class 0 as the reference's 28-way argmax would make it.
            vcon = video_contrastive_loss(out["fusion"], video_label.argmax(-1),
                                          margin=self.vcon_margin, negatives=self.vcon_negatives)
            return {"video_class": bce, "vcon": vcon}
        raise ValueError(f"AVSDN supports the tasks 'supervised' and 'weak', not {task!r}")

    @staticmethod
    def convert_reference(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
        """Reference avsdn_net state_dict ("module." stripped) -> (constructor kwargs, avel state_dict)."""
        for key in ("lstm_audio.weight_ih_l0", "lstm_audio.weight_hh_l0", "affine_video.weight",
                    "affine_v.weight", "category_classifier.0.weight"):
            if key not in state_dict:
                raise ValueError(f"AVSDN reference state_dict lacks {key!r}")
        regions = state_dict["affine_v.weight"].shape[0]
        side = math.isqrt(regions)
        if side * side != regions:
            raise ValueError(f"affine_v.weight: {regions} grid positions is not a square grid")
        kwargs = {
            "audio_dim": state_dict["lstm_audio.weight_ih_l0"].shape[1],
            "visual_dim": state_dict["affine_video.weight"].shape[1],
            "grid": (side, side),
            "num_classes": state_dict["category_classifier.0.weight"].shape[0] + 1,
            "hidden": state_dict["lstm_audio.weight_hh_l0"].shape[1],
            "att_hidden": state_dict["affine_video.weight"].shape[0],
        }
        converted, reference_name = {}, {}
        for key, value in state_dict.items():
            if key in UNUSED_REFERENCE_KEYS:
                continue
            new = key
            for old, repl in _RENAMES.items():
                if key.startswith(old):
                    new = repl + key[len(old):]
                    break
            converted[new] = value
            reference_name[new] = key
        # Expected names and shapes from a parameter-free (meta device) build: allocates nothing.
        with torch.device("meta"):
            expected = {k: v.shape for k, v in AVSDN(**kwargs).state_dict().items()}
        for key, value in converted.items():
            if key not in expected:
                raise ValueError(f"unexpected AVSDN reference key {reference_name[key]!r}")
            if value.shape != expected[key]:
                raise ValueError(f"AVSDN reference key {reference_name[key]!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(expected[key])}")
        for key in expected:
            if key not in converted:
                old = next((o + key[len(n):] for o, n in _RENAMES.items() if key.startswith(n)), key)
                raise ValueError(f"AVSDN reference state_dict lacks {old!r}")
        return kwargs, converted


def supervised_targets(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment one-hot target [B, T, C] -> (event flag [B, T] float, video class [B] long).

    As the reference derives them: the flag is 1 where any event class is on; the video class is the
    largest per-segment argmax over the event columns (background rows are all zero and give 0).
    """
    events = target[..., :-1]                                           # [B, T, K]
    return events.max(dim=-1).values, events.argmax(dim=-1).max(dim=1).values


def video_contrastive_loss(fusion: torch.Tensor, classes: torch.Tensor, *, margin: float,
                           negatives: int) -> torch.Tensor:
    """The reference's video contrastive loss, per video [B] (its batch mean is the reference value).

    fusion [B, T, D], classes [B] int. Video embedding = segment mean of the L2-normalised segments;
    hinge of (hardest positive distance - mean of the `negatives` nearest other-class distances + margin).
    """
    g = F.normalize(fusion, dim=-1).mean(dim=1)                         # [B, D]
    sq = (g * g).sum(-1)
    # Distances as |a|^2 + |b|^2 - 2ab, floored at 1e-12 under the root like the reference: a video's
    # distance to itself is ~1e-6 and always takes part in the hardest positive.
    dist = (sq[:, None] + sq[None, :] - 2 * g @ g.t()).clamp_min(1e-12).sqrt()   # [B, B]
    same = classes[:, None] == classes[None, :]
    hardest_pos = dist.masked_fill(~same, -1e12).max(dim=1).values     # [B]
    # Same-class entries are pushed to 1e12; a video whose k nearest include one of them gets dn
    # ~1e12 / k and so a zero hinge. With fewer than k videos the reference fails to take k entries;
    # padding with the same 1e12 gives those videos the zero they would get in a larger batch.
    neg = dist.masked_fill(same, 1e12)
    if neg.shape[1] < negatives:
        neg = F.pad(neg, (0, negatives - neg.shape[1]), value=1e12)
    mean_neg = neg.topk(negatives, dim=1, largest=False).values.mean(dim=1)      # [B]
    # MarginRankingLoss(dn, dp, target 1) per video = max(0, dp - dn + margin).
    return F.relu(hardest_pos - mean_neg + margin)


def segment_contrastive_loss_reference(fusion: torch.Tensor, event_flag: torch.Tensor,
                                       temperature: float = 0.6) -> torch.Tensor:
    """The reference's segment contrastive loss (scalar), reproduced with its orientation bug.

    Not used in training: the reference would weight it 0.01 only when its flag is set, and as written
    it is a label-only constant (~ n_bg / n_event * -log(1e-12) per video, no useful gradient) because
    both sums run over the anchor axis, so each column holds only positives or only negatives.
    fusion [B, T, D], event_flag [B, T] (1 = event segment).
    """
    e = event_flag.long()                                               # [B, T]
    pos_flag = e[:, :, None] * e[:, None, :]                            # [B, T, T]
    neg_flag = e[:, :, None] * (1 - e[:, None, :])
    f = F.normalize(fusion, dim=-1)
    sim = f @ f.transpose(1, 2)                                         # [B, T, T]
    pos = (torch.exp(sim * pos_flag / temperature) * pos_flag).sum(dim=1)         # [B, T] sum over anchors
    n_event = e.sum(1)
    n_bg = e.shape[1] - n_event
    # The reference adds 1e-12 to the integer counts, which torch evaluates in float32.
    neg = (torch.exp(sim * neg_flag / temperature) * neg_flag).sum(dim=1) / (n_bg.float() + 1e-12)[:, None]
    ratio = pos / (pos + neg + 1e-12)
    per_video = (-torch.log(ratio + 1e-12)).sum(1) / (n_event.float() + 1e-12)
    has_event = (n_event > 0).to(per_video.dtype)
    return (per_video * has_event).sum() / has_event.sum()


def weak_video_loss_reference(video_prob: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference's weak class loss per video [B]: MultiLabelSoftMarginLoss on softmax probabilities.

    Kept to match the fixtures; training uses the fixed form in :meth:`AVSDN.loss_terms`.
    labels [B, K] (the video label without its background entry).
    """
    return F.multilabel_soft_margin_loss(video_prob, labels.to(video_prob.dtype), reduction="none")
