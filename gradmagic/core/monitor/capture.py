"""In-graph capture of the gradients the optimizer applies, into a ring buffer.

The monitor replaces ``optimizer.apply`` (an instance attribute, so the class and
other models are untouched) by a function that, while the train step is traced,
calls the original ``apply`` with the gradients *unchanged* and adds the
statistics of :mod:`gradmagic.core.monitor.stats` and one row write into a
buffer variable: with ``stats="norm"`` (and when the bad step is kept, and under
XLA) built before the update, with ``stats="full"`` after it (to reuse the
``g**2`` the optimizer may compute). Training therefore runs the same update ops on the same
values; the extra ops only read the gradients (or replayed copies of them, see
:mod:`gradmagic.core.monitor.replay`). Nothing here runs per step in Python: the
statistics stay on the device until the host reads the buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradmagic.core.backends import tensorflow as backend
from gradmagic.core.monitor.bad_step import BadStepCapture
from gradmagic.core.monitor.columns import BUFFER_COLUMNS, RAW_ROWS, column, column_index, raw_row
from gradmagic.core.monitor.finish import finish_stats
from gradmagic.core.monitor.histogram_buffer import HistogramBuffer
from gradmagic.core.monitor.replay import readable
from gradmagic.core.monitor.stats import stats_function
from gradmagic.core.monitor.variables import replica_variable, write_row
from gradmagic.core.questions.compute import dense_gradients

_WIDTH = len(BUFFER_COLUMNS)


class StatsBuffer:
    """Ring buffer of per-step, per-weight gradient statistics (monitor-owned variables).

    Row ``k % capacity`` holds the raw statistics (``[5, weights]``, see
    :func:`~gradmagic.core.monitor.stats.step_stats`) of the ``k``-th recorded step; the
    host keeps track of how many rows it has read (see
    :mod:`gradmagic.core.monitor.variables` for the variables).

    Args:
        paths: ``variable.path`` of each monitored weight, in buffer column order.
        capacity: Number of steps the buffer holds before wrapping.
        strategy: The model's distribution strategy. Defaults to the current one.
        xla: Whether the train step is compiled by XLA (``model.jit_compile``).
            Defaults to False.
        histograms: ``(every, bins)`` to also record full histograms every
            ``every`` steps. Defaults to None (no histograms).
        mode: ``"full"``: every statistic at every step; ``"norm"``: the norm at
            every step, everything at the steps :meth:`schedule` picks and at
            every step with a non-finite gradient. Defaults to "full".
    """

    def __init__(
        self,
        paths: Sequence[str],
        capacity: int,
        strategy: Any = None,
        xla: bool = False,
        histograms: tuple[int, int] | None = None,
        mode: str = "full",
    ) -> None:
        self.paths = list(paths)
        self.mode = mode
        self.xla = xla
        self.capacity = int(capacity)
        self._column = {p: i for i, p in enumerate(self.paths)}
        strategy = strategy or tf.distribute.get_strategy()
        # Only the statistics live on the device; the "skipped" and "missing"
        # columns follow from them and from what the trace saw (see read()).
        self.rows = replica_variable(
            tf.zeros((self.capacity, len(RAW_ROWS), len(self.paths)), tf.float32), "gradmagic_monitor_rows", strategy
        )
        self.count = replica_variable(tf.constant(0, tf.int64), "gradmagic_monitor_count", strategy)
        # (count at the epoch's first batch, full_every), set by the host: a variable,
        # so changing the cadence needs no new trace.
        with tf.init_scope(), strategy.scope():
            self._schedule = tf.Variable([0, 1], dtype=tf.int64, trainable=False, name="gradmagic_monitor_schedule")
        self.histograms = None
        if histograms is not None:
            every, bins = histograms
            rows = self.capacity // every + 2
            self.histograms = HistogramBuffer(len(self.paths), every, bins, rows, strategy, xla)
        # Set while tracing: weights with no gradient, gradient sizes, and whether
        # the optimizer skips non-finite steps.
        self._missing = np.zeros(len(self.paths), bool)
        self._sizes = np.zeros(len(self.paths), np.int64)
        self._skips = False

    def schedule(self, epoch_start: int, every: int) -> None:
        """In ``"norm"`` mode, measure everything at batches ``every - 1``, ``2 * every - 1``... of the epoch
        that starts at recorded step ``epoch_start`` (the batches at which the host reads)."""
        self._schedule.assign([int(epoch_start), int(every)])

    def record(
        self,
        grads: Sequence[Any],
        variables: Sequence[Any],
        scale: Any = None,
        skips: bool = False,
        squares: Sequence[Any] | None = None,
    ) -> None:
        """Add the ops that measure and write one step's statistics (called while tracing).

        See :meth:`measure` for the arguments.
        """
        self.write(self.measure(grads, variables, scale, skips, squares))

    def recorded(self) -> int:
        """Steps recorded so far (reads the device counter)."""
        return int(self.count.numpy())

    def write(self, stats: tf.Tensor) -> None:
        """Add the ops that write one step's statistics (from :meth:`measure`) and count the step."""
        write_row(self.rows, tf.math.floormod(self.count, self.capacity), stats)
        self.count.assign_add(1, read_value=False)

    def measure(
        self,
        grads: Sequence[Any],
        variables: Sequence[Any],
        scale: Any = None,
        skips: bool = False,
        squares: Sequence[Any] | None = None,
    ) -> tf.Tensor:
        """Add the ops that compute one step's statistics, ``[5, weights]`` (called while tracing).

        Args:
            grads: Gradients as applied, summed over replicas (possibly loss-scaled).
            variables: The variables the gradients belong to (same order).
            scale: Loss scale the gradients are multiplied by, or None. Statistics
                are divided by it (exact for the powers of two loss scaling uses).
            skips: Whether the optimizer skips a step with a non-finite gradient
                (``LossScaleOptimizer``); such steps are flagged ``skipped``.
            squares: Optional ``g**2`` tensors the optimizer computed (None where it
                did not), reused to save a pass over the gradient.
        """
        squares = list(squares) if squares is not None else [None] * len(grads)
        per_column: list[Any] = [None] * len(self.paths)
        sizes = np.zeros(len(self.paths), np.int64)
        for grad, square, var in zip(grads, squares, variables, strict=False):
            column = self._column.get(_path(var))
            if column is not None and grad is not None:
                per_column[column] = (dense_gradients(grad), square if isinstance(grad, tf.Tensor) else None)
                # The variable's shape is always known, a traced gradient's may not be.
                sizes[column] = int(np.prod(var.shape))
        present = [i for i, g in enumerate(per_column) if g is not None]
        n = len(self.paths)
        self._missing = np.array([g is None for g in per_column])
        self._sizes = sizes
        self._skips = bool(skips)
        width = len(RAW_ROWS)
        if present:
            grads = [per_column[i][0] for i in present]
            squared = [per_column[i][1] is not None for i in present]
            given = [per_column[i][1] for i in present if per_column[i][1] is not None]
            specs = [tf.TensorSpec(g.shape, g.dtype) for g in grads]
            function = stats_function(specs, squared, self.xla, self.mode)
            if self.mode == "norm":
                start, every = self._schedule[0], self._schedule[1]
                full = tf.equal(tf.math.floormod(self.count - start + 1, every), 0)
                stats = function(*grads, *given, full)
            else:
                stats = function(*grads, *given)
            if self.histograms is not None:
                self.histograms.record(self.count, grads, present, stats, scale)
            if scale is not None:
                # Sum, norm and max |g| scale with the loss scale, counts do not.
                inverse = 1.0 / tf.cast(scale, tf.float32)
                factors = [1.0 if name in ("nan", "inf") else inverse for name in RAW_ROWS]
                stats = stats * tf.stack(factors)[:, None]
            if len(present) < n:  # weights without a gradient (None) get zero columns
                placed = tf.scatter_nd(tf.constant([[i] for i in present]), tf.transpose(stats), [n, width])
                stats = tf.transpose(placed)
        else:
            stats = tf.zeros([width, n])
        return stats

    @property
    def missing(self) -> np.ndarray:
        """Per weight, whether the traced step had no gradient for it."""
        return self._missing

    def read(self, start: int) -> tuple[int, np.ndarray]:
        """Rows recorded since step ``start``: ``(count, array[n, weights, columns])``.

        Raises nothing when the buffer wrapped; the caller compares ``count - start``
        with ``capacity`` and reports the lost rows.
        """
        count = int(self.count.numpy())
        if count <= start:
            return count, np.zeros((0, len(self.paths), _WIDTH), np.float32)
        raw = self.rows.numpy()[np.arange(max(start, count - self.capacity), count) % self.capacity]
        stats = finish_stats(raw, self._sizes)
        stats[:, self._missing, :] = 0.0  # no gradient, no statistics (flagged "missing")
        rows = np.zeros((*stats.shape[:2], _WIDTH), np.float32)
        rows[..., : stats.shape[-1]] = stats  # finish_stats gives the first columns, STAT_COLUMNS
        if self._skips:
            # What LossScaleOptimizer does: a step with a non-finite gradient is not applied.
            bad = column(rows, "nan") + column(rows, "inf") > 0
            rows[..., column_index("skipped")] = bad.any(axis=1, keepdims=True)
        rows[..., column_index("missing")] = self._missing
        # Where only the norm was measured, norm_stats marks max |g| with -1.
        measured = raw_row(raw, "max_abs") >= 0
        rows[..., column_index("full")] = measured.all(axis=1, keepdims=True)
        return count, rows


def _path(variable: Any) -> str:
    return getattr(variable, "path", None) or variable.name


def _replica_sum(grads: Sequence[Any]) -> list[Any]:
    """Sum gradients over replicas (MirroredStrategy gives per-replica values).

    Keras scales each replica's loss by ``1 / replicas`` and all-reduces (sums)
    inside ``apply``; the monitor sums its own copy so that it records the
    gradient actually applied. Outside a strategy this is the identity.
    """
    context = tf.distribute.get_replica_context()
    strategy = tf.distribute.get_strategy()
    if context is None or strategy.num_replicas_in_sync == 1:
        return list(grads)
    present = [g for g in grads if g is not None]
    summed = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present)) if present else iter(())
    return [None if g is None else next(summed) for g in grads]


class ApplyHook:
    """A recording ``optimizer.apply``, put in place and removed around each call.

    The recording function is built once; :meth:`install` and :meth:`remove` only
    set and delete an instance attribute, so hooking every train-function call
    costs well under a microsecond.

    Args:
        optimizer: The model's optimizer (a ``LossScaleOptimizer`` is recorded after
            unscaling, with steps it skips flagged rather than treated as anomalies).
        buffer: Where the statistics go.
    """

    def __init__(
        self, optimizer: keras.optimizers.Optimizer, buffer: StatsBuffer, capture: BadStepCapture | None = None
    ) -> None:
        self.optimizer = optimizer
        self._had_own = "apply" in vars(optimizer)
        original = optimizer.apply

        def recording_apply(grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> Any:
            grads = list(grads)
            variables = (
                list(trainable_variables) if trainable_variables is not None else backend.optimizer_variables(optimizer)
            )
            scale, skips = _loss_scale(optimizer, variables)
            if scale is not None and not isinstance(scale, (int, float)):
                scale = tf.convert_to_tensor(scale)  # read before apply updates it
            summed = _replica_sum(grads)
            if buffer.mode == "norm" or capture is not None or buffer.xla:
                # Measured before the update: the bad-step copy needs the verdict before
                # the weights change (and stats="norm" has no use for the optimizer's g**2).
                # Under XLA too: statistics built after a clipped update (clipnorm) changed
                # how XLA compiled that update, by an ulp in some weights.
                stats = buffer.measure(readable(summed, before_update=True), variables, scale, skips)
                if capture is not None and not skips:
                    finite = tf.reduce_all(tf.equal(raw_row(stats, "nan") + raw_row(stats, "inf"), 0.0))
                    capture.record(finite, buffer.count)
                # The optimizer gets the very tensors it would have got without the monitor.
                result = original(grads, trainable_variables)
                buffer.write(stats)
                return result
            result = original(grads, trainable_variables)
            # Measured after apply is traced, so that the g**2 it computes can be reused,
            # and read so that the update is compiled as without the monitor (readable()).
            squares = _optimizer_squares(summed)
            buffer.record(readable(summed), variables, scale, skips, squares)
            return result

        self._original = original
        self._recording = recording_apply

    def install(self) -> None:
        """Make ``optimizer.apply`` the recording version."""
        # Plain instance attributes: Keras's tracking __setattr__ costs ~5 us a call
        # and has nothing to track in a function.
        object.__setattr__(self.optimizer, "apply", self._recording)

    def remove(self) -> None:
        """Put the original ``apply`` back (idempotent; leaves a foreign wrapper alone)."""
        optimizer = self.optimizer
        if optimizer.__dict__.get("apply") is not self._recording:
            return
        if self._had_own:
            object.__setattr__(optimizer, "apply", self._original)
        else:
            object.__delattr__(optimizer, "apply")


def _optimizer_squares(grads: Sequence[Any]) -> list[Any]:
    """For each gradient, a float32 ``g**2`` the traced graph computes already (else None).

    Adam, RMSprop, Adagrad and friends square the gradient for their second
    moment; reducing that tensor gives the sum of squares and max |g| without
    another pass over the gradient. Keras hands the gradients on through
    ``Identity``/``IdentityN`` ops first, which pass values through unchanged.
    """
    return [
        _square_of(g) if isinstance(g, tf.Tensor) and not tf.executing_eagerly() and g.dtype == tf.float32 else None
        for g in grads
    ]


def _square_of(tensor: tf.Tensor, depth: int = 3) -> tf.Tensor | None:
    """A ``Square`` of ``tensor`` among its consumers, looking through up to ``depth`` identities."""
    for op in tensor.consumers():
        if op.type == "Square":
            return op.outputs[0]
        if depth and op.type in ("Identity", "IdentityN"):
            index = next((i for i, t in enumerate(op.inputs) if t is tensor), None)
            found = None if index is None else _square_of(op.outputs[index], depth - 1)
            if found is not None:
                return found
    return None


def _loss_scale(optimizer: Any, variables: list[Any]) -> tuple[Any, bool]:
    """The factor the applied gradients are scaled by, and whether non-finite steps are skipped."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        if not optimizer.built:
            # The scale variable must exist before apply runs: build as apply would.
            backend.build_optimizer_as_apply_does(optimizer, variables)
        return optimizer.dynamic_scale, True
    return getattr(optimizer, "loss_scale_factor", None), False
