"""The monitor's recorder on JAX and PyTorch: per-step statistics kept as device arrays.

On these backends the train step hands each step's raw statistics
(``[5, weights]``, :data:`~gradmagic.core.monitor.columns.RAW_ROWS`) out as a
device array (JAX: an extra output of the jitted step; PyTorch: a tensor made
in the wrapped ``optimizer.apply``; see the training-monitor sections of
``gradmagic.core.backends.jax`` and ``torch``). :class:`HostBuffer` keeps those arrays, unread, in a
ring of ``capacity`` steps; the host copies them only when it reads (every
``read_every`` batches), and finishes them with the same code as on TensorFlow
(:func:`~gradmagic.core.monitor.finish.finish_stats`), so history, anomalies,
printing and the panel see the same rows on every backend.
"""

from __future__ import annotations

import importlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from gradmagic.core.monitor.columns import BUFFER_COLUMNS, column, column_index, raw_row
from gradmagic.core.monitor.finish import finish_stats, square_floors
from gradmagic.core.monitor.guard import GuardedFunctions

_WIDTH = len(BUFFER_COLUMNS)


def recorder(backend: str | None = None) -> Any:
    """The backend door whose training-monitor section records the gradients: ``backends.jax`` or ``backends.torch``."""
    backend = backend or keras.backend.backend()
    return importlib.import_module(f"gradmagic.core.backends.{backend}")


class HostBuffer:
    """The last ``capacity`` steps' raw statistics, as the backend's arrays until read.

    The same reading interface as the TensorFlow ``StatsBuffer``
    (:meth:`recorded`, :meth:`read`, :meth:`schedule`, ``missing``, ``paths``,
    ``capacity``, ``histograms``).

    Args:
        paths: ``variable.path`` of each monitored weight, in column order.
        sizes: Number of entries of each weight.
        capacity: Steps kept before the oldest is dropped.
        mode: ``"full"`` or ``"norm"`` (see ``GradientMonitor``'s ``stats``).
        to_host: Turns one kept array into a NumPy array.
    """

    histograms = None  # gradient histograms are recorded on TensorFlow only

    def __init__(self, paths: Sequence[str], sizes: Sequence[int], capacity: int, mode: str, to_host: Any) -> None:
        self.paths = list(paths)
        self.columns = {p: i for i, p in enumerate(self.paths)}
        self.sizes = np.asarray(sizes, np.int64)
        self.floors = square_floors(self.sizes)
        self.capacity = int(capacity)
        self.mode = mode
        self._to_host = to_host
        self._rows: deque[Any] = deque(maxlen=self.capacity)
        self._count = 0
        self._schedule = (0, 1)
        self._missing = np.zeros(len(self.paths), bool)
        # Whether the optimizer skips steps with non-finite gradients (a LossScaleOptimizer):
        # such steps are flagged "skipped", not anomalies (set by the recorder).
        self.skips = False

    def schedule(self, epoch_start: int, every: int) -> None:
        """In ``"norm"`` mode, measure everything at batches ``every - 1``, ``2 * every - 1``... of the
        epoch that starts at recorded step ``epoch_start``."""
        self._schedule = (int(epoch_start), int(every))

    def full_next(self) -> np.bool_:
        """Whether the next recorded step measures every statistic (always, in ``"full"`` mode)."""
        start, every = self._schedule
        return np.bool_(self.mode == "full" or (self._count - start + 1) % every == 0)

    def append(self, raw: Any, missing: np.ndarray | None) -> None:
        """Keep one step's raw statistics (``[5, weights]``) and which weights had no gradient."""
        self._rows.append(raw)
        self._count += 1
        if missing is not None:
            self._missing = missing

    def recorded(self) -> int:
        """Steps recorded so far."""
        return self._count

    @property
    def missing(self) -> np.ndarray:
        """Per weight, whether the last recorded step had no gradient for it."""
        return self._missing

    def read(self, start: int) -> tuple[int, np.ndarray]:
        """Rows recorded since step ``start``: ``(count, array[n, weights, columns])`` (see ``StatsBuffer.read``)."""
        count = self._count
        kept = min(count - start, len(self._rows))
        if kept <= 0:
            return count, np.zeros((0, len(self.paths), _WIDTH), np.float32)
        raw = np.stack([self._to_host(r) for r in list(self._rows)[len(self._rows) - kept :]])
        stats = finish_stats(raw, self.sizes)
        stats[:, self._missing, :] = 0.0
        rows = np.zeros((*stats.shape[:2], _WIDTH), np.float32)
        rows[..., : stats.shape[-1]] = stats
        if self.skips:
            bad = column(rows, "nan") + column(rows, "inf") > 0
            rows[..., column_index("skipped")] = bad.any(axis=1, keepdims=True)
        rows[..., column_index("missing")] = self._missing
        measured = raw_row(raw, "max_abs") >= 0
        rows[..., column_index("full")] = measured.all(axis=1, keepdims=True)
        return count, rows


class StatelessFunctions(GuardedFunctions):
    """The plain and the recording train function of a model on JAX or PyTorch, for one monitor.

    Args:
        model: The model being fit.
        plain: Its train function as Keras made it.
        buffer: Where the recording function's statistics go.
    """

    capture = None  # the bad step's batch is kept on TensorFlow only

    def __init__(self, model: keras.Model, plain: Any, buffer: HostBuffer) -> None:
        self.buffer = buffer
        buffer.skips = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        recording, hook = recorder().recording_train_function(model, plain, buffer)
        super().__init__(model, plain, recording, hook)
