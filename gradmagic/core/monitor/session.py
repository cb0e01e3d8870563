"""What the monitor knows only while one ``fit`` runs: the model's weights and the read position.

``GradientMonitor.on_train_begin`` makes one :class:`FitSession` and
``on_train_end`` drops it; everything that outlives a ``fit`` (the history, the
traced train functions and their buffer, the TensorBoard writer, the anomalies)
stays on the monitor itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradmagic.core.questions.slots import WeightSlot


@dataclass
class FitSession:
    """The state of one ``fit`` with the monitor.

    Attributes:
        slots: The monitored weights (layer, path), in buffer column order.
        layer_names: ``[layer.name for layer in model.layers]``.
        layer_types: Class names of the layers, aligned with ``layer_names``.
        buffer: The device buffer the recording train function writes.
        base_step: The recorded step of the ``fit``'s first batch: ``optimizer.iterations``
            when the ``fit`` began, or the step after the last one recorded where that is
            larger (after a ``compile()`` with a new optimizer, whose count starts at 0).
        first_count: The buffer's step count when the ``fit`` began (the buffer
            lives as long as the traced function that writes it, across fits).
        read: The buffer's step count up to which the host has read.
        epoch: The current epoch (0-based).
        epoch_first: The buffer's step count at the current epoch's first batch.
        last_read_batch: The batch (1-based) after which the host last read, in this epoch.
    """

    slots: Sequence[WeightSlot]
    layer_names: list[str]
    layer_types: list[str]
    buffer: Any  # the recorder's buffer: a StatsBuffer on TensorFlow, a HostBuffer elsewhere
    base_step: int
    first_count: int
    read: int
    epoch: int = 0
    epoch_first: int = 0
    last_read_batch: int = 0

    def begin_epoch(self, epoch: int) -> None:
        """Start counting the batches of ``epoch`` from the next recorded step."""
        self.epoch = epoch
        self.epoch_first = self.read
        self.last_read_batch = 0

    def steps(self, index: np.ndarray) -> np.ndarray:
        """Global optimizer steps of the buffer's step counts ``index``."""
        return self.base_step + index - self.first_count

    def batches(self, index: np.ndarray) -> np.ndarray:
        """Batches (0-based, within the current epoch) of the buffer's step counts ``index``."""
        return index - self.epoch_first
