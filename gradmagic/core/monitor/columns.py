"""The layout of the monitor's statistics: raw rows on the device, columns on the host.

The one owner of which statistic sits where. Every reader (the callback, the
history, the anomaly checks, the histograms) selects a statistic by its name
through :func:`column` or :func:`raw_row`, never by a bare index. Host-side
only (no TensorFlow import), so the history and the anomaly checks stay light.
"""

from __future__ import annotations

from typing import Any

#: Rows of the raw statistics the train step computes (``[rows, weights]``): over the
#: finite entries, the sum, the L2 norm and the largest |g|; then the NaN and Inf counts.
RAW_ROWS = ("sum", "norm", "max_abs", "nan", "inf")

#: Columns of the finished statistics per weight (the host divides the sum into a mean).
STAT_COLUMNS = ("norm", "max_abs", "mean", "nan", "inf")

#: Columns of one buffer row as the host reads it, per weight: the statistics, then
#: whether the optimizer skipped the step, whether the weight had no gradient, and
#: whether every statistic was measured at that step (``stats="norm"`` measures the norm only).
BUFFER_COLUMNS = (*STAT_COLUMNS, "skipped", "missing", "full")

_RAW_INDEX = {name: i for i, name in enumerate(RAW_ROWS)}
_BUFFER_INDEX = {name: i for i, name in enumerate(BUFFER_COLUMNS)}


def column_index(name: str) -> int:
    """Position of ``name`` in :data:`BUFFER_COLUMNS` (the last axis of the host's rows)."""
    return _BUFFER_INDEX[name]


def column(stats: Any, name: str) -> Any:
    """The statistic ``name`` of host rows ``stats`` (``[..., weights, BUFFER_COLUMNS]``): ``stats[..., k]``."""
    return stats[..., _BUFFER_INDEX[name]]


def raw_index(name: str) -> int:
    """Position of ``name`` in :data:`RAW_ROWS`."""
    return _RAW_INDEX[name]


def raw_row(raw: Any, name: str) -> Any:
    """The row ``name`` of raw statistics ``raw`` (``[..., RAW_ROWS, weights]``): ``raw[..., k, :]``."""
    return raw[..., _RAW_INDEX[name], :]
