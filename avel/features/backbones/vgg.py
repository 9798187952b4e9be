"""VGG19 convolutional trunk (pool5) in plain torch, weight loaders, and the ``vgg19-pool5`` backbone.

The module's parameter names are torchvision's ``features.*`` (configuration 'E'); weights load from a
torchvision state dict (``vgg19-dcbb9e9d.pth``; ``classifier.*`` keys are ignored) or from a Keras HDF5
file (``vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5``; layers ``block1_conv1`` .. ``block5_conv4``,
kernels [3, 3, in, out] transposed to [out, in, 3, 3]).

Preprocessing follows the weights: Keras/Caffe weights expect BGR minus the ImageNet BGR mean
[103.939, 116.779, 123.68] on 0..255 values (the official AVE features), torchvision weights expect
RGB/255 normalised by mean [0.485, 0.456, 0.406] and std [0.229, 0.224, 0.225]. Frames of any size
are resized to 224x224 with antialiased bilinear interpolation first.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...spec import StreamSpec
from ..registry import register_visual
from ..weights import VGG19_KERAS, VGG19_TORCHVISION, load_state_file, resolve_weights
from .cnn import feature_maps

log = logging.getLogger(__name__)

def vgg_stack(config, *, in_channels: int) -> nn.Sequential:
    """A VGG convolution stack: ints are 3x3 conv (padding 1) + ReLU widths, "M" a 2x2 max-pool.
    Layer indices match torchvision's / torchvggish's ``features.N`` keys."""
    layers: list[nn.Module] = []
    c_in = in_channels
    for v in config:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c_in = v
    return nn.Sequential(*layers)


CFG_E = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
# Keras layer name of each conv, in order
KERAS_CONV_NAMES = tuple(f"block{b}_conv{i}" for b, n in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4)) for i in range(1, n + 1))

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
PREPROCESSING = {"keras": "caffe-bgr-mean", "torchvision": "torchvision-rgb-std"}


class VGG19(nn.Module):
    """[N, 3, 224, 224] -> pool5 [N, 512, 7, 7] (torchvision ``vgg19().features``)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg_stack(CFG_E, in_channels=3)

    def conv_keys(self) -> list[str]:
        """Prefixes of the 16 convolutions in order: 'features.0', 'features.2', ..."""
        return [f"features.{i}" for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # [N, 512, 7, 7] for 224x224 input


def _h5_find_layer(f, name: str):
    """The HDF5 group holding a Keras layer's weights (Keras 2: top level or under model_weights;
    Keras 3 .weights.h5: under layers/)."""
    for root in ("model_weights", "layers"):
        if root in f and name in f[root]:
            return f[root][name]
    if name in f:
        return f[name]
    hits = []
    f.visititems(lambda k, v: hits.append(v) if k.rsplit("/", 1)[-1] == name and hasattr(v, "keys") else None)
    if hits:
        return hits[0]
    raise KeyError(f"layer {name!r} not found in Keras weights file {f.filename}")


def _h5_kernel_bias(group) -> tuple[np.ndarray, np.ndarray]:
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
    if names:
        arrays = [np.asarray(group[n]) for n in names]
    else:  # Keras 3 layout (vars/0, vars/1) or an unnamed group: collect datasets in order
        datasets: list[tuple[str, np.ndarray]] = []
        group.visititems(lambda k, v: datasets.append((k, np.asarray(v))) if isinstance(v, h5py.Dataset) else None)
        arrays = [a for _, a in sorted(datasets, key=lambda kv: kv[0])]
    kernels = [a for a in arrays if a.ndim == 4]
    biases = [a for a in arrays if a.ndim == 1]
    if len(kernels) != 1 or len(biases) != 1:
        raise ValueError(f"expected one kernel and one bias in {group.name}, got shapes {[a.shape for a in arrays]}")
    return kernels[0], biases[0]


def read_keras_vgg19(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Keras VGG19 HDF5 weights -> torchvision-named ``features.*`` state dict."""
    out: dict[str, torch.Tensor] = {}
    with h5py.File(path, "r") as f:
        for prefix, name in zip(VGG19().conv_keys(), KERAS_CONV_NAMES):
            kernel, bias = _h5_kernel_bias(_h5_find_layer(f, name))
            if kernel.shape[:2] != (3, 3):
                raise ValueError(f"{name}: expected a TF-ordered kernel [3, 3, in, out], got {kernel.shape}")
            out[f"{prefix}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))
            out[f"{prefix}.bias"] = torch.from_numpy(np.asarray(bias, dtype=np.float32))
    return out


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


def load_vgg19_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read VGG19 weights -> (``features.*`` state dict, format) with format 'keras' or 'torchvision'.
    HDF5 files are read as Keras weights, anything else with ``torch.load(weights_only=True)``
    (or safetensors); ``classifier.*`` and other non-``features.`` keys are dropped."""
    path = Path(path)
    if _is_hdf5(path):
        return read_keras_vgg19(path), "keras"
    sd = load_state_file(path)
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}
    dropped = len(sd) - len(feats)
    if dropped:
        log.debug("ignoring %d non-features keys in %s", dropped, path)
    return feats, "torchvision"


def preprocess(frames: np.ndarray | torch.Tensor, *, mode: str, size: int = 224) -> torch.Tensor:
    """uint8 RGB [N, H, W, 3] -> float32 [N, 3, size, size] as the weights of ``mode`` expect
    ('keras': BGR minus the Caffe mean, 0..255 scale; 'torchvision': RGB/255 standardised)."""
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3] RGB, got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float()  # [N, 3, H, W], 0..255
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if mode == "keras":
        x = x.flip(1) - torch.tensor(CAFFE_MEAN_BGR, dtype=x.dtype).view(1, 3, 1, 1)
    elif mode == "torchvision":
        mean = torch.tensor(TORCHVISION_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(TORCHVISION_STD, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x / 255.0 - mean) / std
    else:
        raise ValueError(f"unknown preprocessing mode {mode!r}; expected 'keras' or 'torchvision'")
    return x.contiguous()


class VGG19Pool5Backbone:
    """Visual backbone: uint8 RGB frames [N, H, W, 3] -> pool5 maps [N, 7, 7, 512] float32 (channels last)."""

    def __init__(self, model: VGG19, *, mode: str, spec: StreamSpec, device: str = "cpu", batch_size: int = 32) -> None:
        if mode not in PREPROCESSING:
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.model = model.to(device).eval().to(memory_format=torch.channels_last)  # faster convolutions on CPU
        self.mode = mode
        self.spec = spec
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.input_size = (224, 224)  # (height, width) the network sees; other sizes are resized

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        return preprocess(frames, mode=self.mode)

    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        return feature_maps(self.model, frames, preprocess=self.preprocess, batch_size=self.batch_size,
                            device=self.device, empty=(7, 7, 512))              # [n, 7, 7, 512]


@register_visual("vgg19-pool5")
def build_vgg19_pool5(*, weights: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 32,
                      allow_download: bool = False, preprocessing: str | None = None,
                      weights_tag: str | None = None) -> VGG19Pool5Backbone:
    """``weights``: a path (torchvision .pth or Keras .h5), None (AVEL_VGG19_WEIGHTS, torch hub cache, Keras
    cache, download if allowed), or 'random' (untrained; needs ``preprocessing`` 'keras' or 'torchvision',
    default 'keras'). The file's format decides the preprocessing and the spec's weights tag
    ('keras-imagenet' / 'torchvision-imagenet'); ``weights_tag`` overrides the tag (e.g. for custom weights)."""
    model = VGG19()
    if weights == "random":
        mode = preprocessing or "keras"
        tag = "random"
        log.warning("vgg19-pool5 backbone with random (untrained) weights")
    else:
        path = resolve_weights("vgg19", weights, allow_download=allow_download)
        sd, mode = load_vgg19_weights(path)
        model.load_state_dict(sd, strict=True)
        if preprocessing is not None and preprocessing != mode:
            raise ValueError(f"{path} holds {mode} weights, which need {mode!r} preprocessing, not {preprocessing!r}")
        tag = weights_tag or (VGG19_KERAS.tag if mode == "keras" else VGG19_TORCHVISION.tag)
        log.info("vgg19 weights: %s (%s, %s preprocessing)", path, tag, PREPROCESSING[mode])
    spec = StreamSpec("vgg19-pool5", 512, (7, 7), 1.0, 16, 0, tag, PREPROCESSING[mode], (224, 224))
    return VGG19Pool5Backbone(model, mode=mode, spec=spec, device=device, batch_size=batch_size)
