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

With ``on_anomaly="stop"`` or ``"raise"`` a :class:`KeptSteps` holds the batch
and the pre-step weights of the steps the host has not checked yet (references,
no copies), so that the first non-finite step can be explained; gradient
histograms are kept in a :class:`HostHistograms`.
"""

from __future__ import annotations

import importlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from gradmagic.core.monitor.columns import BUFFER_COLUMNS, raw_row
from gradmagic.core.monitor.finish import buffer_rows, square_floors
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

    def __init__(
        self,
        paths: Sequence[str],
        sizes: Sequence[int],
        capacity: int,
        mode: str,
        to_host: Any,
        histograms: tuple[int, int] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.columns = {p: i for i, p in enumerate(self.paths)}
        self.sizes = np.asarray(sizes, np.int64)
        self.floors = square_floors(self.sizes)
        self.capacity = int(capacity)
        self.mode = mode
        self.to_host = to_host  # read by the bad-step keeper too
        self._rows: deque[Any] = deque(maxlen=self.capacity)
        self._count = 0
        self._schedule = (0, 1)
        self._missing = np.zeros(len(self.paths), bool)
        # Whether the optimizer skips steps with non-finite gradients (a LossScaleOptimizer):
        # such steps are flagged "skipped", not anomalies (set by the recorder).
        self.skips = False
        # ``(every, bins)``: also bin every weight's gradient every ``every`` steps.
        self.histograms = None if histograms is None else HostHistograms(*histograms, self.capacity, to_host)
        self.kept: KeptSteps | None = None  # set by StatelessFunctions with on_anomaly="stop"/"raise"

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

    def histogram_next(self) -> bool:
        """Whether the next recorded step also bins the gradients into histograms."""
        return self.histograms is not None and self._count % self.histograms.every == 0

    def nonfinite(self, count: int) -> bool | None:
        """Whether recorded step ``count`` had a NaN or Inf gradient entry (None: no longer held)."""
        kept = self._count - count
        if not 0 < kept <= len(self._rows):
            return None
        raw = self.to_host(self._rows[len(self._rows) - kept])
        return bool(np.any(raw_row(raw, "nan") + raw_row(raw, "inf") > 0))

    def recorded(self) -> int:
        """Steps recorded so far."""
        return self._count

    @property
    def missing(self) -> np.ndarray:
        """Per weight, whether the last recorded step had no gradient for it."""
        return self._missing

    def read(self, start: int) -> tuple[int, np.ndarray]:
        """Rows recorded since step ``start``: ``(count, array[n, weights, columns])`` (see ``StatsBuffer.read``)."""
        if self.kept is not None:
            self.kept.forget_before(start)  # the steps before were checked at the last read
        count = self._count
        kept = min(count - start, len(self._rows))
        if kept <= 0:
            return count, np.zeros((0, len(self.paths), _WIDTH), np.float32)
        raw = np.stack([self.to_host(r) for r in list(self._rows)[len(self._rows) - kept :]])
        return count, buffer_rows(raw, self.sizes, self._missing, self.skips)


class HostHistograms:
    """Gradient histograms of every ``every``-th recorded step, as the backend's arrays until read.

    The same reading interface as the TensorFlow ``HistogramBuffer`` (``every``,
    ``bins``, :meth:`read`).

    Args:
        every: Bin the gradients every this many recorded steps (steps 0, every, ...).
        bins: Bins per histogram.
        capacity: Histograms kept before the oldest is dropped.
        to_host: Turns one kept array into a NumPy array.
    """

    def __init__(self, every: int, bins: int, capacity: int, to_host: Any) -> None:
        self.every, self.bins = int(every), int(bins)
        self._to_host = to_host
        self._kept: deque[tuple[int, Any, Any]] = deque(maxlen=int(capacity))

    def append(self, count: int, counts: Any, ranges: Any) -> None:
        """Keep recorded step ``count``'s histograms: ``counts [weights, bins]``, ``ranges [weights]`` (max |g|)."""
        self._kept.append((int(count), counts, ranges))

    def read(self, first: int, count: int) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Histograms of the recorded steps in ``[first, count)`` still kept.

        Returns:
            ``(step counts, counts [k, weights, bins], ranges [k, weights])``.
        """
        wanted = [entry for entry in self._kept if first <= entry[0] < count]
        if not wanted:
            return [], np.zeros((0, 0, self.bins), np.float32), np.zeros((0, 0), np.float32)
        counts = np.stack([self._to_host(c) for _, c, _ in wanted])
        ranges = np.stack([self._to_host(r) for _, _, r in wanted])
        return [k for k, _, _ in wanted], counts, ranges


class KeptSteps:
    """The batch and the pre-step weights of recorded steps, until the host has checked them.

    The recorder keeps references (no copies): on JAX every step's (the step's
    arrays are immutable, and the train step does not donate the trainable
    weights then), on PyTorch only the first step whose gradient is not finite
    (it knows at once, and copies the weights before the optimizer updates them
    in place). :meth:`read` finds the first non-finite one among them.

    The same interface as the TensorFlow ``BadStepCapture`` (:meth:`read`, :meth:`reset`).

    Args:
        buffer: The statistics buffer of the same steps (it tells which step was non-finite).
        to_host: Turns one kept array into a NumPy array.
    """

    def __init__(self, buffer: HostBuffer, to_host: Any) -> None:
        self._buffer = buffer
        self._to_host = to_host
        self._steps: dict[int, tuple[Any, list[Any]]] = {}

    def wants(self) -> bool:
        """Whether no step is kept yet (a recorder that keeps only the first bad step asks this)."""
        return not self._steps

    def keep(self, count: int, data: Any, weights: Sequence[Any]) -> None:
        """Keep recorded step ``count``'s batch ``data`` (as ``train_step`` gets it) and pre-step ``weights``."""
        self._steps[int(count)] = (data, list(weights))

    def forget_before(self, count: int) -> None:
        """Drop the steps before recorded step ``count`` (checked already)."""
        for old in [k for k in self._steps if k < count]:
            del self._steps[old]

    def reset(self) -> None:
        """Forget every kept step (a new fit looks for its own first bad step)."""
        self._steps.clear()

    def read(self) -> tuple[int, tuple[Any, Any, Any], list[np.ndarray]] | None:
        """``(count, (x, y, sample_weight), pre-step weights)`` of the first kept non-finite step, or None."""
        for count in sorted(self._steps):
            if self._buffer.nonfinite(count):
                data, weights = self._steps[count]
                host = keras.tree.map_structure(lambda t: None if t is None else self._to_host(t), data)
                x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(host)
                return count, (x, y, sample_weight), [self._to_host(w) for w in weights]
        return None


class StatelessFunctions(GuardedFunctions):
    """The plain and the recording train function of a model on JAX or PyTorch, for one monitor.

    Args:
        model: The model being fit.
        plain: Its train function as Keras made it.
        buffer: Where the recording function's statistics go.
        keep_bad_step: Keep the batch and pre-step weights of the first non-finite step
            (``capture``). Defaults to False.
    """

    def __init__(self, model: keras.Model, plain: Any, buffer: HostBuffer, keep_bad_step: bool = False) -> None:
        self.buffer = buffer
        self.capture = KeptSteps(buffer, buffer.to_host) if keep_bad_step else None
        buffer.kept = self.capture
        buffer.skips = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        recording, hook = recorder().recording_train_function(model, plain, buffer)
        super().__init__(model, plain, recording, hook)
