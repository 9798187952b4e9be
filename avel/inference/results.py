"""What localization returns: per-second scores and labels, merged event spans, attention maps.

Pure values: turning them into JSON or CSV text is here (:meth:`Localization.to_dict`,
:meth:`Localization.segments_csv`); writing files is the caller's (the ``avel localize`` command).

Spans
-----
Consecutive seconds with the same non-background class merge into one span ``[start, end)`` (whole
seconds, end exclusive); its score is the mean score of that class over the span.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..metrics import spans as class_spans


@dataclass(frozen=True)
class Span:
    """One event: seconds ``[start, end)``, the class name, and the mean score of the class over it."""

    start: int
    end: int
    label: str
    score: float
    index: int = -1            # class index

    @property
    def duration(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "label": self.label, "score": round(float(self.score), 6),
                "index": self.index}


@dataclass
class Localization:
    """What :meth:`Localizer.localize` returns for one video (or one set of precomputed features)."""

    video: str                      # path, or a name for precomputed features
    seconds: int                    # T
    class_names: list[str]          # C names, background last
    probs: np.ndarray               # float32 [T, C], the model's segment_scores (softmax probabilities for classifiers)
    labels: list[str]               # T predicted class names
    spans: list[Span]               # merged non-background runs
    attention: np.ndarray | None    # float32 [T, H, W] (models with audio-guided attention), else None
    flags: dict = field(default_factory=dict)     # decode flags (padding, truncation, corrupt packets...)
    duration: float | None = None   # of the file in seconds (None for precomputed features)

    @property
    def classes(self) -> np.ndarray:
        """Predicted class index per second [T]."""
        return self.probs.argmax(-1)

    @property
    def background(self) -> int:
        return len(self.class_names) - 1

    @property
    def scores(self) -> np.ndarray:
        """Probability of the predicted class per second [T]."""
        return self.probs.max(-1)

    def to_dict(self, *, attention: bool = True, digits: int = 6) -> dict:
        d = {
            "video": self.video,
            "seconds": self.seconds,
            "duration": self.duration,
            "class_names": list(self.class_names),
            "labels": list(self.labels),
            "classes": [int(c) for c in self.classes],
            "probs": np.round(self.probs.astype(np.float64), digits).tolist(),
            "spans": [s.to_dict() for s in self.spans],
            "flags": dict(self.flags),
        }
        if attention:
            d["attention"] = None if self.attention is None else np.round(self.attention.astype(np.float64), digits).tolist()
        return d

    def segments_csv(self) -> str:
        """One row per second: second, start, end, label, score, then one probability column per class."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["second", "start", "end", "label", "score", *[f"p:{c}" for c in self.class_names]])
        for t in range(self.seconds):
            w.writerow([t, t, t + 1, self.labels[t], f"{self.probs[t].max():.6f}",
                        *[f"{p:.6f}" for p in self.probs[t]]])
        return buf.getvalue()

    def spans_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["start", "end", "label", "score"])
        for s in self.spans:
            w.writerow([s.start, s.end, s.label, f"{s.score:.6f}"])
        return buf.getvalue()


def merge_spans(probs: np.ndarray, class_names: Sequence[str], background: int | None = None) -> list[Span]:
    """Runs of the same non-background argmax class -> spans scored by the class's mean score."""
    probs = np.asarray(probs)
    if background is None:
        background = probs.shape[-1] - 1
    out = []
    for start, end, c in class_spans(probs.argmax(-1), background):
        out.append(Span(int(start), int(end), str(class_names[c]), float(probs[start:end, c].mean()), int(c)))
    return out
