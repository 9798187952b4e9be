"""VGGish (AudioSet) in plain torch, with the torchvggish port's parameter names, and the ``vggish`` backbone.

Network: 4 conv stages on [N, 1, 96, 64] log-mel examples (64, 128, 2x256, 2x512 channels, 3x3 convs +
ReLU, 2x2 max-pools) -> [N, 512, 6, 4], flattened in (H, W, C) order as the TensorFlow original, then
fully connected 12288 -> 4096 -> 4096 -> 128, each followed by ReLU (the final ReLU is part of the
torchvggish network; no PCA, no quantisation). This matches the raw embeddings of the official AVE
``audio_feature.h5``.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import nn

from ...spec import StreamSpec
from ..registry import register_audio
from ..weights import load_state_file, resolve_weights, tag_for
from .logmel import SAMPLE_RATE, segment_examples
from .vgg import vgg_stack

log = logging.getLogger(__name__)


class VGGish(nn.Module):
    """[N, 1, 96, 64] examples -> [N, 128] embeddings (>= 0). Keys: features.{0,3,6,8,11,13}.*,
    embeddings.{0,2,4}.*"""

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg_stack((64, "M", 128, "M", 256, 256, "M", 512, 512, "M"), in_channels=1)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 4 * 6, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, 128), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)                       # [N, 512, 6, 4]
        x = x.permute(0, 2, 3, 1).flatten(1)       # [N, 6*4*512] in (H, W, C) order
        return self.embeddings(x)                  # [N, 128]


def load_vggish_weights(model: VGGish, path: str | os.PathLike) -> VGGish:
    """Load a torchvggish-style state dict (extra keys such as PCA parameters are ignored)."""
    sd = load_state_file(path)
    own = model.state_dict()
    extra = sorted(k for k in sd if k not in own)
    if extra:
        log.debug("ignoring %d keys of %s not in VGGish: %s", len(extra), path, extra[:5])
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)
    return model


class VGGishBackbone:
    """Audio backbone: 16 kHz waveform covering T seconds -> float32 [T, 128]; one 0.96 s example per second."""

    def __init__(self, model: VGGish, *, spec: StreamSpec, device: str = "cpu", batch_size: int = 64) -> None:
        self.model = model.to(device).eval()
        self.spec = spec
        self.device = torch.device(device)
        self.batch_size = batch_size

    def embed(self, examples: np.ndarray) -> np.ndarray:
        """float32 examples [N, 96, 64] -> [N, 128]."""
        out = []
        with torch.inference_mode():
            for a in range(0, len(examples), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(examples[a:a + self.batch_size], dtype=np.float32))
                out.append(self.model(x.unsqueeze(1).to(self.device)).float().cpu())  # [n, 128]
        if not out:
            return np.zeros((0, 128), np.float32)
        return torch.cat(out).numpy()

    def __call__(self, waveform: np.ndarray, seconds: int, *, sample_rate: float = SAMPLE_RATE) -> np.ndarray:
        return self.embed(segment_examples(waveform, seconds, sample_rate=sample_rate))  # [T, 128]


@register_audio("vggish")
def build_vggish(*, weights: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 64,
                 allow_download: bool = False, weights_tag: str | None = None) -> VGGishBackbone:
    """``weights``: a path, None (AVEL_VGGISH_WEIGHTS, torch hub cache, download if allowed), or 'random'.
    ``weights_tag`` overrides the tag recorded in the spec (default 'vggish-audioset' for a file)."""
    model = VGGish()
    if weights == "random":
        tag = "random"
        log.warning("vggish backbone with random (untrained) weights")
    else:
        path = resolve_weights("vggish", weights, allow_download=allow_download)
        load_vggish_weights(model, path)
        tag = weights_tag or tag_for(path) or "vggish-audioset"
        log.info("vggish weights: %s (%s)", path, tag)
    spec = StreamSpec("vggish", 128, (), 1.0, 1, SAMPLE_RATE, tag, "vggish-logmel")
    return VGGishBackbone(model, spec=spec, device=device, batch_size=batch_size)
