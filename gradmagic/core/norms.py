"""The one per-layer norm: a layer's gradient norm from the norms of its tensors.

A layer's gradient is all of its weights' gradients together, so its L2 norm is
the root of the sum of their squared norms. The explorer's bars, the monitor's
per-step layer curves and its summary all combine norms here.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def combined_norm(norms: Any, axis: int | None = None, skip_nan: bool = True) -> Any:
    """The L2 norm of several tensors together, from each tensor's own L2 norm.

    Args:
        norms: The tensors' norms (any array-like; NaN where a tensor has no
            finite entry).
        axis: The axis to combine over. Defaults to ``None``: all of them.
        skip_nan: Combine only the tensors with a norm (the layer's finite part;
            NaN only when no tensor has one). ``False`` lets one NaN make the
            whole layer NaN. Defaults to ``True``.

    Returns:
        A float (``axis=None``) or an array with ``axis`` removed.
    """
    norms = np.asarray(norms, dtype=np.float64)
    if not skip_nan:
        return np.sqrt(np.sum(norms**2, axis=axis))
    none = np.all(np.isnan(norms), axis=axis)
    combined = np.sqrt(np.nansum(norms**2, axis=axis))
    return float(np.nan if none else combined) if np.ndim(combined) == 0 else np.where(none, np.nan, combined)
