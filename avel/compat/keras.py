"""Official Keras CML weights (``cmm_model_weights.h5``, Keras 2.1.4) -> avel ``cml`` model.

Visual branch = dense_1, dense_2; audio branch = dense_3, dense_4. A Keras kernel is [in, out]
(y = x @ kernel + bias), so it is transposed into ``nn.Linear.weight``. The layers may sit at the
top level (``save_weights``) or under ``model_weights`` (``model.save``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import torch

from ..card import Loaded, ModelCard
from ..data.errors import DataError
from ..models import build_model
from ..models.registry import complete_arguments, model_class
from ..spec import AVE_OFFICIAL

log = logging.getLogger(__name__)

# avel module path -> Keras layer name
LAYERS = {"visual.0": "dense_1", "visual.2": "dense_2", "audio.0": "dense_3", "audio.2": "dense_4"}


class KerasWeightsError(DataError):
    """A Keras weights file that does not hold the CML network; names the file and layer."""


def _decode(name) -> str:
    return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def _dense(root, layer: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(kernel [in, out], bias [out]) of one Dense layer."""
    if layer not in root:
        raise KerasWeightsError(f"{source}: layer {layer!r} is missing")
    group = root[layer]
    found: dict[str, np.ndarray] = {}
    names = [_decode(n) for n in group.attrs.get("weight_names", [])]
    if not names:   # no index: take every dataset below the layer group
        group.visit(lambda n: names.append(n) if isinstance(group[n], h5py.Dataset) else None)
    for name in names:
        if name not in group or not isinstance(group[name], h5py.Dataset):
            raise KerasWeightsError(f"{source}: layer {layer!r} lists weight {name!r} that is not stored")
        leaf = name.rsplit("/", 1)[-1]
        for part in ("kernel", "bias"):
            if leaf.startswith(part):
                found[part] = np.asarray(group[name], dtype=np.float32)
    if set(found) != {"kernel", "bias"}:
        raise KerasWeightsError(f"{source}: layer {layer!r} has no {'kernel' if 'kernel' not in found else 'bias'}")
    kernel, bias = found["kernel"], found["bias"]
    if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
        raise KerasWeightsError(
            f"{source}: layer {layer!r} has kernel {kernel.shape} and bias {bias.shape}; expected [in, out] and [out]")
    return kernel, bias


def load_keras_cml(path: str | Path) -> Loaded:
    """Official Keras CML weights file -> ``(model, card)``: the avel ``cml`` model in eval mode."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise KerasWeightsError(f"{source}: no such weights file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise KerasWeightsError(f"{source}: not an HDF5 file: {e}") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        weights = {mod: _dense(root, layer, source) for mod, layer in LAYERS.items()}
        version = _decode(f.attrs.get("keras_version", b"?"))

    def dims(mod: str) -> tuple[int, int]:
        return weights[mod][0].shape

    for first, second in (("visual.0", "visual.2"), ("audio.0", "audio.2")):
        if dims(first)[1] != dims(second)[0]:
            raise KerasWeightsError(
                f"{source}: layer {LAYERS[second]!r} takes {dims(second)[0]} inputs but "
                f"{LAYERS[first]!r} gives {dims(first)[1]}")
    if dims("visual.2")[1] != dims("audio.2")[1]:
        raise KerasWeightsError(
            f"{source}: layer {LAYERS['audio.2']!r} embeds to {dims('audio.2')[1]} dims but "
            f"{LAYERS['visual.2']!r} to {dims('visual.2')[1]}")

    kwargs = dict(visual_dim=dims("visual.0")[0], visual_hidden=dims("visual.0")[1],
                  audio_dim=dims("audio.0")[0], audio_hidden=dims("audio.0")[1], embed_dim=dims("visual.2")[1])
    model = build_model("cml", **kwargs)
    state = {}
    for mod, (kernel, bias) in weights.items():
        state[f"{mod}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.T))
        state[f"{mod}.bias"] = torch.from_numpy(bias)
    model.load_state_dict(state, strict=True)
    model.eval()
    log.info("%s: Keras %s CML weights loaded", source, version)
    card = ModelCard(model="cml", model_kwargs=complete_arguments("cml", kwargs), task="cml",
                     feature_spec=AVE_OFFICIAL, outputs=model_class("cml").outputs,
                     source={"path": source, "kind": "keras_cml", "keras_version": version})
    return Loaded(model, card)
