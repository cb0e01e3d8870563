"""Take variables' values and put them back: the one snapshot/restore of the core.

The gradient questions guard an eager run with it, and a caller that sets
weights for a while (a perturbation, a replay of an earlier step) writes them
back with it, even when the work in between raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


@contextlib.contextmanager
def values_restored(variables: Sequence[Any]) -> Iterator[list[np.ndarray]]:
    """Yield the variables' current values (host copies); write them back when the block ends.

    The values are written back however the block ends (also when it raises),
    so the block may assign the variables freely.

    Args:
        variables: Keras or TensorFlow variables; one may appear more than once.

    Yields:
        The values as they were on entry, aligned with ``variables``.
    """
    saved = [np.array(var.numpy(), copy=True) for var in variables]
    try:
        yield saved
    finally:
        for var, value in zip(variables, saved, strict=True):
            var.assign(value)
