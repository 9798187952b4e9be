"""Seeded (not pretrained) reference weights: the rule the fixtures' ``weights_spec.json`` files describe."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


def generate_reference_weights(spec: dict | str | os.PathLike) -> dict[str, torch.Tensor]:
    """Regenerate the seeded (not pretrained) weights described by a fixture ``weights_spec.json``.

    One ``numpy.random.default_rng(seed_base + seed)`` is consumed in key order; each tensor is
    ``standard_normal(shape) * scale`` in float64 cast to float32, with scale ``sqrt(2 / prod(shape[1:]))``
    for ``.weight`` keys and 0.01 for ``.bias`` keys. Accepts the VGGish (``keys``) and VGG19
    (``features_keys``) spec layouts.
    """
    if not isinstance(spec, dict):
        spec = json.loads(Path(spec).read_text())
    keys = spec.get("keys") or spec.get("features_keys")
    if not keys:
        raise ValueError("weights spec has neither 'keys' nor 'features_keys'")
    rng = np.random.default_rng(int(spec["seed_base"]) + int(spec["seed"]))
    out: dict[str, torch.Tensor] = {}
    for name, shape in keys:
        shape = tuple(int(s) for s in shape)
        if name.endswith(".weight"):
            scale = np.sqrt(2.0 / float(np.prod(shape[1:])))
        elif name.endswith(".bias"):
            scale = 0.01
        else:
            raise ValueError(f"unexpected key {name!r} in weights spec")
        out[name] = torch.from_numpy((rng.standard_normal(shape) * scale).astype(np.float32))
    return out
