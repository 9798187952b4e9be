"""Where pretrained weights come from.

Resolution order for a known weights file (:func:`resolve_weights`):

1. an explicit path argument;
2. the model's environment variable (``AVEL_VGG19_WEIGHTS``, ``AVEL_VGGISH_WEIGHTS``);
3. the torch hub cache, ``$TORCH_HOME/hub/checkpoints/<file>`` (``torch.hub.get_dir()``: honours
   ``TORCH_HOME``, then ``XDG_CACHE_HOME``, default ``~/.cache/torch``);
4. the Keras cache, ``$KERAS_HOME/models/<file>`` (default ``~/.keras/models``);
5. a download into the torch hub cache, only when ``allow_download=True`` and the network answers.

Nothing found raises :class:`WeightsNotFoundError` naming the file, the variable, the cache folder and the
download URL. Untrained networks are only ever built when ``weights='random'`` is asked for by name
(see the backbone builders); nothing here falls back to random weights.
"""
from __future__ import annotations

import logging
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..io import atomic_output

log = logging.getLogger(__name__)


class WeightsNotFoundError(FileNotFoundError):
    """No weights file for a backbone could be found (or downloaded)."""


@dataclass(frozen=True)
class WeightsFile:
    filename: str
    cache: str          # 'torch' (hub checkpoints) or 'keras' (~/.keras/models)
    url: str
    tag: str            # recorded in the feature spec (StreamSpec.weights)


@dataclass(frozen=True)
class ModelWeights:
    name: str
    env_var: str
    files: tuple[WeightsFile, ...]   # looked for in this order; the first is the download candidate


VGG19_TORCHVISION = WeightsFile("vgg19-dcbb9e9d.pth", "torch",
                                "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth", "torchvision-imagenet")
VGG19_KERAS = WeightsFile("vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "keras",
                          "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
                          "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "keras-imagenet")
VGGISH_TORCH = WeightsFile("vggish-10086976.pth", "torch",
                           "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
                           "vggish-audioset")

KNOWN: dict[str, ModelWeights] = {
    "vgg19": ModelWeights("vgg19", "AVEL_VGG19_WEIGHTS", (VGG19_TORCHVISION, VGG19_KERAS)),
    "vggish": ModelWeights("vggish", "AVEL_VGGISH_WEIGHTS", (VGGISH_TORCH,)),
}


def torch_hub_checkpoints() -> Path:
    """``<torch hub dir>/checkpoints`` (TORCH_HOME, else XDG_CACHE_HOME/torch, else ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def keras_models_dir() -> Path:
    home = os.environ.get("KERAS_HOME")
    return (Path(home) if home else Path.home() / ".keras") / "models"


def cache_path(f: WeightsFile) -> Path:
    return (torch_hub_checkpoints() if f.cache == "torch" else keras_models_dir()) / f.filename


def _not_found(model: ModelWeights, reason: str) -> WeightsNotFoundError:
    lines = [f"{model.name} weights not found ({reason}). Provide one of:"]
    for f in model.files:
        lines.append(f"  - {f.filename}: put it at {cache_path(f)} (download: {f.url})")
    lines.append(f"or set {model.env_var}=/path/to/weights, pass the path explicitly, or pass allow_download=True "
                 f"to fetch {model.files[0].url} into {cache_path(model.files[0]).parent} "
                 "(weights='random' builds an untrained network).")
    return WeightsNotFoundError("\n".join(lines))


def download(url: str, dest: Path, *, timeout: float = 15.0) -> Path:
    """Download ``url`` to ``dest`` atomically (temporary file in the same folder, then rename)."""
    dest = Path(dest)
    with atomic_output(dest) as tmp, open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
        shutil.copyfileobj(resp, out, length=1 << 20)
    log.info("downloaded %s -> %s", url, dest)
    return dest


def resolve_weights(model: str, path: str | os.PathLike | None = None, *, allow_download: bool = False,
                    timeout: float = 15.0) -> Path:
    """Find the weights file for ``model`` ('vgg19' or 'vggish'); see the module docstring for the order."""
    if model not in KNOWN:
        raise KeyError(f"no known weights for {model!r}; known: {', '.join(sorted(KNOWN))}")
    mw = KNOWN[model]
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsNotFoundError(f"{model} weights file {p} does not exist")
        return p
    env = os.environ.get(mw.env_var)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise WeightsNotFoundError(f"{mw.env_var}={env} does not name an existing file")
        log.debug("%s weights from %s: %s", model, mw.env_var, p)
        return p
    for f in mw.files:
        p = cache_path(f)
        if p.is_file():
            log.debug("%s weights from cache: %s", model, p)
            return p
    if not allow_download:
        raise _not_found(mw, "no explicit path, no environment variable, nothing in the caches; download not allowed")
    f = mw.files[0]
    try:
        return download(f.url, cache_path(f), timeout=timeout)
    except OSError as e:  # URLError, timeouts and socket errors are OSErrors
        raise _not_found(mw, f"download of {f.url} failed: {e}") from e


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A tensor dict from a .pth/.pt (``torch.load(weights_only=True)``) or .safetensors file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return sd


def tag_for(path: str | os.PathLike) -> str | None:
    """The feature-spec weights tag of a known file name (None for an unknown name)."""
    name = Path(path).name
    for mw in KNOWN.values():
        for f in mw.files:
            if f.filename == name:
                return f.tag
    return None
