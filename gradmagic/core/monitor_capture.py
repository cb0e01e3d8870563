"""In-graph capture of the gradients the optimizer applies, into a ring buffer.

The monitor replaces ``optimizer.apply`` (an instance attribute, so the class and
other models are untouched) by a function that, while the train step is traced,
adds a few reductions per gradient and one write into a buffer variable, then
calls the original ``apply`` with the gradients *unchanged*. Training therefore
runs the same update ops on the same values; the extra ops only read the
gradients. Nothing here runs per step in Python: the statistics stay on the
device until the host reads the buffer, every ``read_every`` batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

#: Columns of one buffer row, per weight.
BUFFER_COLUMNS = ("norm", "max_abs", "mean", "nan", "inf", "skipped", "missing")
_WIDTH = len(BUFFER_COLUMNS)


class StatsBuffer:
    """Ring buffer of per-step, per-weight gradient statistics (monitor-owned variables).

    Row ``k % capacity`` holds the statistics of the ``k``-th recorded step; the
    host keeps track of how many rows it has read. The variables are plain
    ``tf.Variable`` objects created outside any Keras model, so they are not model
    variables, are never saved with the model and never touched by the optimizer.

    Args:
        paths: ``variable.path`` of each monitored weight, in buffer column order.
        capacity: Number of steps the buffer holds before wrapping.
    """

    def __init__(self, paths: Sequence[str], capacity: int, strategy: Any = None) -> None:
        self.paths = list(paths)
        self.capacity = int(capacity)
        self._column = {p: i for i, p in enumerate(self.paths)}
        strategy = strategy or tf.distribute.get_strategy()
        # Under a strategy each replica keeps its own copy (sync on read) and the
        # host reads the first: all replicas record the same all-reduced values,
        # and a shared plain variable would count every step once per replica.
        sync = {
            "synchronization": tf.VariableSynchronization.ON_READ,
            "aggregation": tf.VariableAggregation.ONLY_FIRST_REPLICA,
        }
        with tf.init_scope(), strategy.scope():
            self.rows = tf.Variable(
                tf.zeros((self.capacity, len(self.paths), _WIDTH), tf.float32),
                trainable=False,
                name="gradmagic_monitor_rows",
                **sync,
            )
            self.count = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="gradmagic_monitor_count", **sync)

    def record(self, grads: Sequence[Any], variables: Sequence[Any], skipped: Any = None) -> None:
        """Add the ops that write one step's statistics (called while tracing).

        Args:
            grads: Gradients as applied (already unscaled and summed over replicas).
            variables: The variables the gradients belong to (same order).
            skipped: Optional boolean tensor, True when the optimizer skips this step.
        """
        per_column: list[Any] = [None] * len(self.paths)
        for grad, var in zip(grads, variables, strict=False):
            column = self._column.get(_path(var))
            if column is not None and grad is not None:
                per_column[column] = _flat(grad)
        stats = _step_stats(per_column, skipped)
        slot = tf.math.floormod(self.count, self.capacity)
        # A whole-buffer assign (a few KB) works on every variable kind, including
        # the sync-on-read ones a strategy makes, where scatter ops are missing.
        self.rows.assign(tf.tensor_scatter_nd_update(self.rows, tf.reshape(slot, (1, 1)), stats[None]))
        self.count.assign_add(1)

    def read(self, start: int) -> tuple[int, np.ndarray]:
        """Rows recorded since step ``start``: ``(count, array[n, weights, columns])``.

        Raises nothing when the buffer wrapped; the caller compares ``count - start``
        with ``capacity`` and reports the lost rows.
        """
        count = int(self.count.numpy())
        if count <= start:
            return count, np.zeros((0, len(self.paths), _WIDTH), np.float32)
        rows = self.rows.numpy()
        first = max(start, count - self.capacity)
        slots = np.arange(first, count) % self.capacity
        return count, rows[slots]


def _path(variable: Any) -> str:
    return getattr(variable, "path", None) or variable.name


def _flat(grad: Any) -> tf.Tensor:
    if isinstance(grad, tf.IndexedSlices):
        # Densify: duplicate indices must be summed before a norm means anything.
        grad = tf.convert_to_tensor(grad)
    return tf.reshape(tf.cast(grad, tf.float32), [-1])


def _step_stats(grads: list[Any], skipped: Any) -> tf.Tensor:
    """Per-weight statistics as a ``[weights, columns]`` float32 tensor.

    The common case (every entry finite) costs three reductions per weight. Only
    when a sum of squares is not finite does a ``cond`` branch recount with the
    non-finite entries masked out, so the statistics describe the finite entries
    as :class:`~gradmagic.core.results.GradientStats` does.
    """
    present = [g for g in grads if g is not None]
    if not present:
        return tf.zeros((len(grads), _WIDTH), tf.float32)
    # Single-pass reductions with no temporary the size of the gradient:
    # l2_loss is sum(g**2) / 2 in one kernel; max |g| = max(max g, -min g).
    sumsq = 2.0 * tf.stack([tf.nn.l2_loss(g) for g in present])
    all_finite = tf.reduce_all(tf.math.is_finite(sumsq))

    def fast() -> tf.Tensor:
        highest = tf.stack([tf.reduce_max(g) for g in present])
        lowest = tf.stack([tf.reduce_min(g) for g in present])
        mean = tf.stack([tf.reduce_mean(g) for g in present])
        zeros = tf.zeros_like(sumsq)
        return tf.stack([tf.sqrt(sumsq), tf.maximum(highest, -lowest), mean, zeros, zeros], axis=1)

    def masked() -> tf.Tensor:
        return tf.stack([_masked_stats(g) for g in present])

    stats = tf.cond(all_finite, fast, masked)
    flag = tf.zeros_like(sumsq) if skipped is None else tf.fill(tf.shape(sumsq), tf.cast(skipped, tf.float32))
    stats = tf.concat([stats, flag[:, None], tf.zeros_like(flag)[:, None]], axis=1)
    return _scatter_present(grads, stats)


def _masked_stats(g: tf.Tensor) -> tf.Tensor:
    finite = tf.math.is_finite(g)
    values = tf.where(finite, g, tf.zeros_like(g))
    n_finite = tf.reduce_sum(tf.cast(finite, tf.float32))
    nan = tf.reduce_sum(tf.cast(tf.math.is_nan(g), tf.float32))
    inf = tf.cast(tf.size(g), tf.float32) - n_finite - nan
    # With no finite entry the statistics are undefined: NaN, as GradientStats has.
    none = tf.constant(np.nan, tf.float32)
    norm = tf.where(n_finite > 0, tf.norm(values), none)
    max_abs = tf.where(n_finite > 0, tf.reduce_max(tf.abs(values)), none)
    mean = tf.where(n_finite > 0, tf.reduce_sum(values) / tf.maximum(n_finite, 1.0), none)
    return tf.stack([norm, max_abs, mean, nan, inf])


def _scatter_present(grads: list[Any], stats: tf.Tensor) -> tf.Tensor:
    """Put the rows of present gradients in place; a missing one gets ``missing=1``."""
    if all(g is not None for g in grads):
        return stats
    missing_row = tf.constant([0, 0, 0, 0, 0, 0, 1], tf.float32)
    rows, k = [], 0
    for g in grads:
        if g is None:
            rows.append(missing_row)
        else:
            rows.append(stats[k])
            k += 1
    return tf.stack(rows)


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


def wrap_apply(optimizer: keras.optimizers.Optimizer, buffer: StatsBuffer) -> Callable[[], None]:
    """Replace ``optimizer.apply`` by a recording version; return the undo function.

    Args:
        optimizer: The model's optimizer (a ``LossScaleOptimizer`` is recorded after
            unscaling, with steps it skips flagged rather than treated as anomalies).
        buffer: Where the statistics go.

    Returns:
        A function that puts the original ``apply`` back (idempotent).
    """
    had_own = "apply" in vars(optimizer)
    original = optimizer.apply

    def recording_apply(grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> Any:
        grads = list(grads)
        variables = list(trainable_variables) if trainable_variables is not None else _known_variables(optimizer)
        summed = _replica_sum(grads)
        unscaled, skipped = _unscale(optimizer, summed, variables)
        buffer.record(unscaled, variables, skipped)
        # The optimizer gets the very tensors it would have got without the monitor.
        return original(grads, trainable_variables)

    optimizer.apply = recording_apply

    def restore() -> None:
        if optimizer.__dict__.get("apply") is not recording_apply:
            return
        if had_own:
            optimizer.apply = original
        else:
            del optimizer.apply

    return restore


def _known_variables(optimizer: Any) -> list[Any]:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return list(getattr(inner, "_trainable_variables", []))


def _unscale(optimizer: Any, grads: list[Any], variables: list[Any]) -> tuple[list[Any], Any]:
    """Gradients divided by the loss scale, and whether the optimizer skips the step."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        if not optimizer.built:
            # What LossScaleOptimizer.apply does first; the scale variable must exist.
            with keras.name_scope(optimizer.name, caller=optimizer):
                optimizer.build(variables)
            optimizer.built = True
        scale = tf.cast(optimizer.dynamic_scale, tf.float32)
        unscaled = [None if g is None else tf.cast(g, tf.float32) / scale for g in grads]
        finite = [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
        skipped = tf.logical_not(tf.reduce_all(tf.stack(finite))) if finite else None
        return unscaled, skipped
    factor = getattr(optimizer, "loss_scale_factor", None)
    if factor is not None:
        return [None if g is None else tf.cast(g, tf.float32) / factor for g in grads], None
    return grads, None
