"""The one loop every image backbone runs: frames in batches, channels-last, maps out as [n, H, W, C]."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def feature_maps(net: Callable[[torch.Tensor], torch.Tensor], frames: np.ndarray | torch.Tensor, *,
                 preprocess: Callable, batch_size: int, device, empty: tuple[int, int, int]) -> torch.Tensor:
    """``net`` over ``frames`` [n, h, w, 3] in batches -> float32 CPU maps [n, H, W, C] (``empty`` when n = 0)."""
    out = []
    with torch.inference_mode():
        for a in range(0, len(frames), batch_size):
            x = preprocess(frames[a:a + batch_size]).to(device)                 # [b, 3, size, size]
            x = x.contiguous(memory_format=torch.channels_last)
            out.append(net(x).permute(0, 2, 3, 1).float().cpu())                # [b, H, W, C]
    if not out:
        return torch.zeros((0, *empty))
    return torch.cat(out).contiguous()
