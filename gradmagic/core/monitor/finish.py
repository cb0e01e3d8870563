"""The host's side of the statistics: raw rows from any backend's train step into columns.

NumPy only, so every backend's recorder shares it: the train step records the
raw rows (``RAW_ROWS``, see :mod:`gradmagic.core.monitor.columns`) and the host
finishes them here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradmagic.core.monitor.columns import BUFFER_COLUMNS, STAT_COLUMNS, column, column_index, raw_row


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


def buffer_rows(raw: np.ndarray, sizes: Sequence[int], missing: np.ndarray, skips: bool) -> np.ndarray:
    """Rows as the monitor's history keeps them, ``[steps, n, BUFFER_COLUMNS]``, from raw rows of every backend.

    Args:
        raw: Raw statistics of the steps read, ``[steps, RAW_ROWS, n]``.
        sizes: Number of entries of each gradient.
        missing: Per weight, True where the train step had no gradient for it.
        skips: Whether the optimizer skips a step with a non-finite gradient.
    """
    stats = finish_stats(raw, sizes)
    stats[:, missing, :] = 0.0  # no gradient, no statistics (flagged "missing")
    rows = np.zeros((*stats.shape[:2], len(BUFFER_COLUMNS)), np.float32)
    rows[..., : stats.shape[-1]] = stats  # finish_stats gives the first columns, STAT_COLUMNS
    if skips:
        # What LossScaleOptimizer does: a step with a non-finite gradient is not applied.
        bad = column(rows, "nan") + column(rows, "inf") > 0
        rows[..., column_index("skipped")] = bad.any(axis=1, keepdims=True)
    rows[..., column_index("missing")] = missing
    # Where only the norm was measured, max |g| is marked -1.
    measured = raw_row(raw, "max_abs") >= 0
    rows[..., column_index("full")] = measured.all(axis=1, keepdims=True)
    return rows
