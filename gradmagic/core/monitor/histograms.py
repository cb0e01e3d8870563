"""Full gradient histograms every N steps, recorded in the train step like the statistics.

Every ``every``-th recorded step, each weight's applied gradient is binned over
``[-max|g|, +max|g|]`` of its finite entries. The train step records them (on
TensorFlow: :mod:`gradmagic.core.monitor.histogram_buffer`); this module holds
the host's records, with no framework import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradmagic.core.questions.slots import WeightSlot


@dataclass(frozen=True)
class GradientHistogram:
    """The distribution of one weight's applied gradient at one step.

    Attributes:
        step: Global optimizer step.
        epoch: Epoch (0-based).
        batch: Batch within the epoch (0-based).
        layer: Name of the owning layer.
        weight: The weight's unique ``variable.path``.
        edges: ``bins + 1`` bin edges, symmetric around 0 (``[-max|g|, +max|g|]``).
        counts: Number of finite entries in each bin (NaN/Inf entries are not
            binned; the statistics count them).
    """

    step: int
    epoch: int
    batch: int
    layer: str
    weight: str
    edges: np.ndarray
    counts: np.ndarray


def histograms_of(
    steps: Sequence[int],
    epochs: Sequence[int],
    batches: Sequence[int],
    counts: np.ndarray,
    ranges: np.ndarray,
    slots: Sequence[WeightSlot],
    missing: np.ndarray,
) -> list[GradientHistogram]:
    """Host-side histogram records, one per step and present weight.

    Args:
        steps, epochs, batches: Where each buffer row belongs.
        counts: ``[k, weights, bins]`` counts.
        ranges: ``[k, weights]`` max |g|.
        slots: The monitored weights.
        missing: Per weight, whether it had no gradient (skipped).
    """
    records = []
    for row, (step, epoch, batch) in enumerate(zip(steps, epochs, batches, strict=True)):
        for column, slot in enumerate(slots):
            if missing[column]:
                continue
            reach = float(ranges[row, column])
            edges = np.linspace(-reach, reach, counts.shape[2] + 1)
            records.append(
                GradientHistogram(
                    int(step), int(epoch), int(batch), slot.layer_name, slot.path, edges, counts[row, column].copy()
                )
            )
    return records
