"""A loop-for-loop transcription of resampy's kernel: the slow reference avel.features.resample is tested against."""
from __future__ import annotations

import numpy as np

from avel.features.resample import KAISER_BEST, SincFilter, _half_window


def resample_reference(x: np.ndarray, sr_orig: float, sr_new: float, *, filt: SincFilter = KAISER_BEST) -> np.ndarray:
    """Loop-for-loop transcription of resampy's kernel for 1-D input (slow; for tests on short signals)."""
    x = np.asarray(x, dtype=np.float64)
    ratio = float(sr_new) / sr_orig
    n_out = int(x.shape[0] * sr_new / sr_orig)
    win = _half_window(filt) * (ratio if ratio < 1 else 1.0)
    delta = np.diff(win, append=win[-1])
    scale = min(1.0, ratio)
    step = int(scale * filt.num_table)
    nwin, n_orig = win.shape[0], x.shape[0]
    y = np.zeros(n_out)
    for t in range(n_out):
        t_reg = t * (1.0 / ratio)
        n = int(t_reg)
        frac = scale * (t_reg - n)
        index_frac = frac * filt.num_table
        offset = int(index_frac)
        eta = index_frac - offset
        for i in range(min(n + 1, (nwin - offset) // step)):
            y[t] += (win[offset + i * step] + eta * delta[offset + i * step]) * x[n - i]
        frac = scale - frac
        index_frac = frac * filt.num_table
        offset = int(index_frac)
        eta = index_frac - offset
        for k in range(min(n_orig - n - 1, (nwin - offset) // step)):
            y[t] += (win[offset + k * step] + eta * delta[offset + k * step]) * x[n + k + 1]
    return y
