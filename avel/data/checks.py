"""Integrity report of an AVE-layout folder: what is there, what disagrees, what is odd.

Never loads a whole feature file: NaN/Inf scans go through the rows in chunks.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .annotations import parse_annotations
from .datasets import AVEData
from .errors import DataError
from .store import H5Rows

FEATURE_FILES = ("audio_feature.h5", "visual_feature.h5", "visual_feature_vec.h5", "labels.h5",
                 "mil_labels.h5", "labels_closs.h5", "audio_feature_noisy.h5", "visual_feature_noisy.h5",
                 "labels_noisy.h5")


@dataclass
class Report:
    root: str
    facts: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)     # things that break training/evaluation
    notes: list[str] = field(default_factory=list)        # quirks worth knowing

    def to_dict(self) -> dict:
        return {"root": self.root, "facts": self.facts, "files": self.files, "problems": self.problems,
                "notes": self.notes, "ok": not self.problems}

    def text(self) -> str:
        lines = [f"AVE folder: {self.root}"]
        lines += [f"  {k}: {v}" for k, v in self.facts.items()]
        lines.append("files:")
        for name, info in self.files.items():
            lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
        lines.append(f"problems ({len(self.problems)}):")
        lines += [f"  - {p}" for p in self.problems] or ["  none"]
        lines.append(f"notes ({len(self.notes)}):")
        lines += [f"  - {n}" for n in self.notes] or ["  none"]
        return "\n".join(lines)


def check_folder(root: str | Path, *, scan_values: bool = True, chunk: int = 64) -> Report:
    root = Path(root)
    rep = Report(str(root))
    try:
        ann = parse_annotations(root / "Annotations.txt")
    except DataError as e:
        rep.problems.append(str(e))
        return rep
    n = len(ann)
    ids = [a.video_id for a in ann.rows]
    counts = Counter(ids)
    rep.facts.update({"rows": n, "unique_video_ids": len(counts), "categories": len(ann.categories),
                      "classes_with_background": ann.num_classes})
    dup = {k: v for k, v in counts.items() if v > 1}
    if dup:
        rep.notes.append(f"{len(dup)} video ids occur in more than one row ({sum(dup.values())} rows), "
                         f"e.g. {', '.join(list(dup)[:3])}; a video with two events has two rows")
    empty = [a for a in ann.rows if a.start == a.end]
    for a in empty:
        rep.notes.append(f"Annotations.txt line {a.line}: Start = End = {a.start} ({a.video_id}, {a.category}): "
                         "no event second; its segment labels are all background")
    beyond = [a for a in ann.rows if a.end > 10]
    if beyond:
        rep.notes.append(f"{len(beyond)} rows end after 10 s (first: line {beyond[0].line})")
    quality = Counter(a.quality for a in ann.rows)
    rep.facts["quality"] = dict(quality)

    split_ids: dict[str, set] = {}
    for split in ("train", "val", "test"):
        order_path = root / f"{split}_order.h5"
        set_path = root / f"{split}Set.txt"
        if order_path.is_file():
            order = _small(order_path, "order", rep)
            if order is not None:
                order = order.astype(np.int64).reshape(-1)
                bad = order[(order < 0) | (order >= n)]
                info = {"rows": len(order), "unique": len(np.unique(order))}
                rep.files[order_path.name] = info
                if bad.size:
                    rep.problems.append(f"{order_path.name}: {bad.size} indices out of range [0, {n})")
                else:
                    split_ids[split] = {ids[i] for i in order}
                    if len(np.unique(order)) != len(order):
                        rep.notes.append(f"{order_path.name}: repeated row indices")
        if set_path.is_file():
            try:
                s = parse_annotations(set_path, list(ann.categories))
                rep.files[set_path.name] = {"rows": len(s)}
                if split in split_ids and len(s) != rep.files[f"{split}_order.h5"]["rows"]:
                    rep.problems.append(f"{set_path.name} has {len(s)} rows but {split}_order.h5 has "
                                        f"{rep.files[f'{split}_order.h5']['rows']}")
                split_ids.setdefault(split, {a.video_id for a in s.rows})
            except DataError as e:
                rep.problems.append(str(e))
    names = list(split_ids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = split_ids[a] & split_ids[b]
            if shared:
                rep.notes.append(f"{len(shared)} video ids are in both {a} and {b} "
                                 f"(e.g. {', '.join(sorted(shared)[:3])}): different events of the same video")
    covered = sum(rep.files.get(f"{s}_order.h5", {}).get("rows", 0) for s in ("train", "val", "test"))
    if covered:
        rep.facts["rows_in_splits"] = covered

    shapes = {}
    for name in FEATURE_FILES:
        path = root / name
        if not path.is_file():
            continue
        try:
            rows = H5Rows(path)                  # the reader's own rules: dataset, numbers, sane sizes
        except DataError as e:
            rep.problems.append(str(e))
            continue
        info = {"shape": list(rows.shape), "dtype": str(rows.dtype)}
        shapes[name] = rows.shape
        if scan_values:
            nonfinite = sum(int(b.size - np.isfinite(b).sum()) for b in rows.blocks(chunk))
            rows.close()
            info["nonfinite"] = nonfinite
            if nonfinite:
                rep.problems.append(f"{name}: {nonfinite} NaN/Inf values")
        rep.files[name] = info
    for name, shape in shapes.items():
        if "noisy" in name:
            continue
        if shape[0] != n:
            rep.problems.append(f"{name}: {shape[0]} rows but Annotations.txt has {n}")
    seg = {k: s[1] for k, s in shapes.items() if len(s) >= 2 and "mil" not in k and "noisy" not in k}
    if len(set(seg.values())) > 1:
        rep.problems.append("segment counts disagree between files: "
                            + ", ".join(f"{k} has {v}" for k, v in sorted(seg.items())))
    if "labels.h5" in shapes and shapes["labels.h5"][-1] != ann.num_classes:
        rep.problems.append(f"labels.h5 has {shapes['labels.h5'][-1]} classes, annotations give {ann.num_classes}")
    noisy = [shapes.get(k, (None,))[0] for k in ("audio_feature_noisy.h5", "visual_feature_noisy.h5", "labels_noisy.h5")]
    noisy = [x for x in noisy if x is not None]
    if len(set(noisy)) > 1:
        rep.problems.append(f"background (*_noisy.h5) files disagree on row count: {noisy}")
    missing = [f for f in ("audio_feature.h5", "visual_feature.h5") if f not in shapes]
    if missing:
        rep.notes.append(f"not here: {', '.join(missing)} (the large release files; training needs them)")
    elif not rep.problems:
        # The folder as training opens it (features.json, shapes, spec, label widths): check passes
        # only what trains.
        try:
            data = AVEData.open(root)
            data.targets, data.video_labels   # noqa: B018 - read (and shape-check) the label files
        except DataError as e:
            rep.problems.append(str(e))
    return rep


def _small(path: Path, key: str, rep: Report):
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                rep.problems.append(f"{path.name}: no dataset {key!r}")
                return None
            return f[key][()]
    except OSError as e:
        rep.problems.append(f"{path.name}: not a readable HDF5 file ({e})")
        return None
