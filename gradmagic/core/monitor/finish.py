"""The host's side of the statistics: raw rows from any backend's train step into columns.

NumPy only, so every backend's recorder shares it: the train step records the
raw rows (``RAW_ROWS``, see :mod:`gradmagic.core.monitor.columns`) and the host
finishes them here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradmagic.core.monitor.columns import STAT_COLUMNS, raw_row


def square_floors(sizes: Sequence[int]) -> np.ndarray:
    """Per gradient, the smallest float32 sum of squares known to be exact to float32's precision.

    TensorFlow's CPU kernels flush results below float32's smallest normal number
    (2**-126, about 1.2e-38) to zero, so every square below that (|g| < 1.1e-19) is
    lost from a float32 sum of squares. A sum of ``size`` such squares loses less than
    ``size * 2**-126``: a sum of at least ``size * 2**-102`` is within a relative
    2**-24 (float32's rounding) of the exact one. Below it, the statistics are
    recomputed in float64.

    Args:
        sizes: Number of entries of each gradient.
    """
    return np.asarray(sizes, np.float64) * 2.0**-102


def finish_stats(raw: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Statistics from raw rows: ``[..., RAW_ROWS, n]`` -> ``[..., n, STAT_COLUMNS]`` (see ``columns``).

    Norm, max |g| and mean describe the finite entries; they are NaN for a
    gradient with none (all NaN/Inf, or empty). Where only the norm was measured
    (the default mode's mark on such a row, max |g| < 0), max |g| and mean are 0.

    Args:
        raw: Raw statistics of one or more steps, as :func:`step_stats` gives.
        sizes: Number of entries of each gradient.
    """
    raw = np.asarray(raw, np.float64)
    total, max_abs = raw_row(raw, "sum"), raw_row(raw, "max_abs")
    nan, inf = raw_row(raw, "nan"), raw_row(raw, "inf")
    finite = np.asarray(sizes, np.float64) - nan - inf
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = total / finite
    measured = max_abs >= 0
    columns = {
        "norm": np.where(finite > 0, raw_row(raw, "norm"), np.nan),
        "max_abs": np.where(measured, np.where(finite > 0, max_abs, np.nan), 0.0),
        "mean": np.where(measured, np.where(finite > 0, mean, np.nan), 0.0),
        "nan": nan,
        "inf": inf,
    }
    return np.stack([columns[name] for name in STAT_COLUMNS], axis=-1).astype(np.float32)
