"""In-graph capture of the gradients the optimizer applies, into ring buffers.

The monitor replaces ``optimizer.apply`` (an instance attribute, so the class and
other models are untouched) by a function that, while the train step is traced,
calls the original ``apply`` with the gradients *unchanged* and adds the ops that
measure them (:mod:`gradmagic.core.monitor.stats`) and write the measurements into
monitor-owned variables. Training therefore runs the same update ops on the same
values; the extra ops only read the gradients (or replayed copies of them, see
:mod:`gradmagic.core.monitor.replay`). Nothing here runs per step in Python: the
statistics stay on the device until the host reads the buffer.

Two recordings, one per ``stats`` mode:

* ``"norm"`` (the default), built before the update: per step, one half sum of
  squares per weight, written as one row; no branch output feeds that write. A
  step that needs every statistic (a scheduled one, where the host reads, or one
  whose sums are not finite or too small for float32) takes one state-writing
  branch, a single not-inlined call that writes the full row, stamps it with the
  step, moves the schedule on and (with ``on_anomaly="stop"/"raise"``) keeps the
  bad step's batch. The step's own test is one comparison of the count with the
  next scheduled step, and one of the sums with their bounds.
* ``"full"``: every statistic at every step, after the update (to reuse the
  ``g**2`` the optimizer may compute), or before it when the bad step is kept
  (it needs the verdict before the weights change) and under XLA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradmagic.core.backends import tensorflow as backend
from gradmagic.core.monitor.bad_step import BadStepCapture
from gradmagic.core.monitor.columns import BUFFER_COLUMNS, RAW_ROWS, raw_index, raw_row
from gradmagic.core.monitor.finish import buffer_rows
from gradmagic.core.monitor.histogram_buffer import HistogramBuffer
from gradmagic.core.monitor.replay import readable
from gradmagic.core.monitor.stats import exact_halves, half_squares, stats_function
from gradmagic.core.monitor.variables import replica_variable, write_row
from gradmagic.core.questions.compute import dense_gradients

_WIDTH = len(BUFFER_COLUMNS)


class StatsBuffer:
    """Ring buffers of per-step, per-weight gradient statistics (monitor-owned variables).

    Slot ``k % capacity`` belongs to the ``k``-th recorded step. ``rows`` holds raw
    statistics (``[5, weights]``, see :func:`~gradmagic.core.monitor.stats.step_stats`):
    of every step with ``stats="full"``; with ``stats="norm"`` only of the steps that
    measured everything, which ``stamps`` names (the step count written with the row),
    while ``halves`` holds every step's half sums of squares (and ``scales`` the loss
    scale they carry, under a ``LossScaleOptimizer``). The host keeps track of how many
    steps it has read (see :mod:`gradmagic.core.monitor.variables` for the variables).

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
            every step whose sums of squares are not finite or too small.
            Defaults to "full".
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
        # A not-inlined branch cannot write a strategy's per-replica variables: there the
        # branch is inlined.
        self._replicas = strategy.num_replicas_in_sync
        n = len(self.paths)
        # Only the statistics live on the device; the "skipped" and "missing"
        # columns follow from them and from what the trace saw (see read()).
        self.rows = replica_variable(tf.zeros((self.capacity, len(RAW_ROWS), n)), "gradmagic_monitor_rows", strategy)
        self.count = replica_variable(tf.constant(0, tf.int64), "gradmagic_monitor_count", strategy)
        if mode == "norm":
            self.halves = replica_variable(tf.zeros((self.capacity, n)), "gradmagic_monitor_halves", strategy)
            never = tf.fill([self.capacity], tf.constant(-1, tf.int64))
            self.stamps = replica_variable(never, "gradmagic_monitor_stamps", strategy)
            self.scales = replica_variable(tf.ones([self.capacity]), "gradmagic_monitor_scales", strategy)
            # The next step count that measures everything, and the distance between two such
            # steps; set by the host, moved on by the branch: changing the cadence needs no trace.
            self.next_full = replica_variable(tf.constant(0, tf.int64), "gradmagic_monitor_next_full", strategy)
            self.full_every = replica_variable(tf.constant(1, tf.int64), "gradmagic_monitor_full_every", strategy)
            self._scheduled = (0, 1)  # what the host last wrote
        self.histograms = None
        if histograms is not None:
            every, bins = histograms
            rows = self.capacity // every + 2
            self.histograms = HistogramBuffer(n, every, bins, rows, strategy, xla)
        # Set while tracing: weights with no gradient, gradient sizes, whether the
        # optimizer skips non-finite steps, and whether the half sums carry a loss scale.
        self._missing = np.zeros(n, bool)
        self._sizes = np.zeros(n, np.int64)
        self._skips = False
        self._scaled = False

    def schedule(self, epoch_start: int, every: int) -> None:
        """In ``"norm"`` mode, measure everything at batches ``every - 1``, ``2 * every - 1``... of the epoch
        that starts at recorded step ``epoch_start`` (the batches at which the host reads)."""
        schedule = (int(epoch_start) + int(every) - 1, int(every))
        # Device writes are a fixed cost of every short fit: only what changed.
        if schedule[0] != self._scheduled[0]:
            self.next_full.assign(schedule[0], read_value=False)
        if schedule[1] != self._scheduled[1]:
            self.full_every.assign(schedule[1], read_value=False)
        self._scheduled = schedule

    def recorded(self) -> int:
        """Steps recorded so far (reads the device counter)."""
        return int(self.count.numpy())

    def record(
        self,
        grads: Sequence[Any],
        variables: Sequence[Any],
        scale: Any = None,
        skips: bool = False,
        squares: Sequence[Any] | None = None,
    ) -> None:
        """``"full"`` mode: add the ops that measure and write one step's statistics (called while tracing).

        See :meth:`measure` for the arguments.
        """
        self.write(self.measure(grads, variables, scale, skips, squares))

    def write(self, stats: tf.Tensor) -> None:
        """``"full"`` mode: add the ops that write one step's statistics (from :meth:`measure`) and count the step."""
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
        """``"full"`` mode: add the ops that compute one step's statistics, ``[5, weights]`` (called while tracing).

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
        placed = self._place(grads, variables, skips, squares)
        present = [i for i, g in enumerate(placed) if g is not None]
        stats = self._all_stats([placed[i][0] for i in present], present, scale, [placed[i][1] for i in present])
        if self.histograms is not None:
            self.histograms.record(self.count, [placed[i][0] for i in present], present, scale)
        return stats

    def record_norms(
        self,
        grads: Sequence[Any],
        variables: Sequence[Any],
        scale: Any = None,
        skips: bool = False,
        capture: BadStepCapture | None = None,
    ) -> list[tf.Tensor] | None:
        """``"norm"`` mode: add the ops that record one step (called while tracing, before the update).

        Args:
            grads: Gradients as applied, summed over replicas (possibly loss-scaled).
            variables: The variables the gradients belong to (same order).
            scale: Loss scale the gradients are multiplied by, or None.
            skips: Whether the optimizer skips a step with a non-finite gradient.
            capture: Where the first non-finite step's batch and weights are kept, or None.

        Returns:
            Per buffer column, the half sum of squares, for the update of that weight to wait
            for (None when it should not: eagerly, or under a distribution strategy).
        """
        placed = self._place(grads, variables, skips)
        present = [i for i, g in enumerate(placed) if g is not None]
        grads = [placed[i][0] for i in present]
        self._scaled = scale is not None
        count = self.count.read_value()
        parts = half_squares([None if g is None else g[0] for g in placed], self._sizes, self.xla, parts=True)
        halves = tf.stack(parts)
        slot = tf.math.floormod(count, self.capacity)
        write_row(self.halves, slot, halves)
        scales = [] if scale is None else [tf.cast(scale, tf.float32)]
        if scales:
            write_row(self.scales, slot, scales[0])
        quick = tf.logical_and(exact_halves(halves, self._sizes), count < self.next_full)

        def measure_all(*tensors: tf.Tensor) -> tf.Tensor:
            # The state-writing branch: every statistic, its stamp, the next scheduled step.
            step, given = tensors[len(grads)], tensors[len(grads) + 1 :]
            stats = self._all_stats(list(tensors[: len(grads)]), present, given[0] if given else None)
            row = tf.math.floormod(step, self.capacity)
            write_row(self.rows, row, stats)
            write_row(self.stamps, row, step)
            due = self.next_full.read_value()
            self.next_full.assign(tf.where(step >= due, due + self.full_every, due), read_value=False)
            if capture is not None:
                capture.record(tf.reduce_all(tf.equal(raw_row(stats, "nan") + raw_row(stats, "inf"), 0.0)), step)
            return tf.constant(True)

        inputs = [*grads, count, *scales]
        if tf.executing_eagerly():  # run_eagerly=True: plain Python, nothing to trace per step
            if not bool(quick):
                measure_all(*inputs)
        else:
            branch = measure_all
            if self._replicas == 1:
                # One not-inlined call: a step that does not take the branch skips one node,
                # not the dozens of step_stats' ops (which it would visit, as dead, every step).
                branch = backend.not_inlined_function(measure_all, [tf.TensorSpec(t.shape, t.dtype) for t in inputs])
            tf.cond(quick, lambda: tf.constant(False), lambda: branch(*inputs))
        if self.histograms is not None:
            self.histograms.record(count, grads, present, scale)
        self.count.assign_add(1, read_value=False)
        # Under a strategy the update all-reduces the gradients itself: it is not made to wait.
        return None if tf.executing_eagerly() or self._replicas > 1 else parts

    def _place(
        self, grads: Sequence[Any], variables: Sequence[Any], skips: bool, squares: Sequence[Any] | None = None
    ) -> list[tuple[Any, Any] | None]:
        """Per buffer column, ``(dense gradient, g**2 or None)`` or None; notes what the trace saw."""
        squares = list(squares) if squares is not None else [None] * len(grads)
        per_column: list[Any] = [None] * len(self.paths)
        sizes = np.zeros(len(self.paths), np.int64)
        for grad, square, var in zip(grads, squares, variables, strict=False):
            column = self._column.get(_path(var))
            if column is not None and grad is not None:
                per_column[column] = (dense_gradients(grad), square if isinstance(grad, tf.Tensor) else None)
                # The variable's shape is always known, a traced gradient's may not be.
                sizes[column] = int(np.prod(var.shape))
        self._missing = np.array([g is None for g in per_column])
        self._sizes = sizes
        self._skips = bool(skips)
        return per_column

    def _all_stats(
        self,
        grads: list[tf.Tensor],
        present: list[int],
        scale: Any = None,
        squares: list[tf.Tensor | None] | None = None,
    ) -> tf.Tensor:
        """Every statistic of ``grads`` (buffer columns ``present``), unscaled, as ``[5, weights]``."""
        n, width = len(self.paths), len(RAW_ROWS)
        if not grads:
            return tf.zeros([width, n])
        squares = squares or [None] * len(grads)
        squared = [s is not None for s in squares]
        specs = [tf.TensorSpec(g.shape, g.dtype) for g in grads]
        stats = stats_function(specs, squared, self.xla)(*grads, *[s for s in squares if s is not None])
        if scale is not None:
            # Sum, norm and max |g| scale with the loss scale, counts do not.
            inverse = 1.0 / tf.cast(scale, tf.float32)
            factors = [1.0 if name in ("nan", "inf") else inverse for name in RAW_ROWS]
            stats = stats * tf.stack(factors)[:, None]
        if len(present) < n:  # weights without a gradient (None) get zero columns
            placed = tf.scatter_nd(tf.constant([[i] for i in present]), tf.transpose(stats), [n, width])
            stats = tf.transpose(placed)
        return stats

    def column_of(self, variable: Any) -> int | None:
        """The buffer column of ``variable``, or None when it is not monitored."""
        return self._column.get(_path(variable))

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
        index = np.arange(max(start, count - self.capacity), count)
        slots = index % self.capacity
        raw = self.rows.numpy()[slots] if self.mode == "full" else self._norm_rows(index, slots)
        return count, buffer_rows(raw, self._sizes, self._missing, self._skips)

    def _norm_rows(self, index: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """``"norm"`` mode: raw rows of steps ``index``: the full row where one was written, else the norm.

        A step without a full row took no branch, so its sums of squares were finite and
        exact: its NaN and Inf counts are exactly 0. Its sum is 0 and its max |g| is -1,
        the mark that :func:`finish_stats` turns into 0 (not measured).
        """
        halves = self.halves.numpy()[slots].astype(np.float64)
        norms = np.sqrt(2.0 * halves)
        if self._scaled:  # a loss scale is a power of two: dividing here is exact
            norms /= self.scales.numpy()[slots, None]
        raw = np.zeros((len(index), len(RAW_ROWS), len(self.paths)), np.float32)
        raw[:, raw_index("norm")] = norms
        raw[:, raw_index("max_abs")] = -1.0
        full = self.stamps.numpy()[slots] == index
        raw[full] = self.rows.numpy()[slots[full]]
        return raw


def _path(variable: Any) -> str:
    return getattr(variable, "path", None) or variable.name


def _after(tensor: tf.Tensor, first: tf.Tensor) -> tf.Tensor:
    """``tensor``'s value, available only once ``first`` is computed (an identity with a control dependency)."""
    with tf.control_dependencies([first]):
        return tf.identity(tensor)


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
            bad_step = capture if not skips else None  # a skipped step is no anomaly
            if buffer.mode == "norm":
                # Before the update: the bad-step copy needs the pre-step weights.
                reads = readable(summed, before_update=True)
                halves = buffer.record_norms(reads, variables, scale, skips, bad_step)
                if halves is not None:
                    columns = [buffer.column_of(v) for v in variables]
                    # Each weight's update starts once its sum of squares is taken. Left to run
                    # beside the update, the sums may wait behind its passes over the same
                    # gradient and hold the step open (paired, same process: 1.064x a plain step
                    # without, 1.054x with; waiting for all sums at once measured 1.10x). The
                    # optimizer gets the same values, through identities; not for a gradient read
                    # from a replayed copy, whose update the graph optimizer may rewrite (and
                    # would not, behind a control dependency).
                    grads = [
                        _after(g, halves[c]) if isinstance(g, tf.Tensor) and r is g and c is not None else g
                        for g, r, c in zip(grads, reads, columns, strict=False)
                    ]
                return original(grads, trainable_variables)
            if capture is not None or buffer.xla:
                # Measured before the update: the bad-step copy needs the verdict before the
                # weights change. Under XLA too: statistics built after a clipped update
                # (clipnorm) changed how XLA compiled that update, by an ulp in some weights.
                stats = buffer.measure(readable(summed, before_update=True), variables, scale, skips)
                if bad_step is not None:
                    finite = tf.reduce_all(tf.equal(raw_row(stats, "nan") + raw_row(stats, "inf"), 0.0))
                    bad_step.record(finite, buffer.count)
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
