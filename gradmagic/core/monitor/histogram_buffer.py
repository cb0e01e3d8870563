"""The TensorFlow train step's histogram recorder: a device ring buffer, written in the graph.

See :mod:`gradmagic.core.monitor.histograms` for what a histogram record is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from gradmagic.core.monitor.variables import replica_variable, write_row


class HistogramBuffer:
    """Device ring buffer of per-weight gradient histograms, one row per ``every`` steps.

    Args:
        n_weights: Number of monitored weights (buffer columns).
        every: Record a histogram every this many steps (steps 0, every, 2*every...).
        bins: Number of bins.
        capacity: Histogram rows the buffer holds before wrapping.
        strategy: The model's distribution strategy (variables are created in its scope).
        xla: Whether the train step is compiled by XLA (which lacks the histogram kernel).
    """

    def __init__(self, n_weights: int, every: int, bins: int, capacity: int, strategy: Any, xla: bool) -> None:
        self.every, self.bins, self.capacity, self.xla = int(every), int(bins), int(capacity), xla
        shape = (self.capacity, n_weights)
        self.counts = replica_variable(tf.zeros((*shape, self.bins)), "gradmagic_monitor_histograms", strategy)
        self.ranges = replica_variable(tf.zeros(shape), "gradmagic_monitor_ranges", strategy)

    def record(self, count: tf.Tensor, grads: Sequence[tf.Tensor], columns: Sequence[int], scale: Any = None) -> None:
        """Add the ops that bin the gradients at every ``every``-th step (called while tracing).

        Args:
            count: The step counter before this step (the statistics buffer's).
            grads: Dense gradients as applied (loss-scaled under a ``LossScaleOptimizer``).
            columns: Buffer column of each gradient.
            scale: The loss scale ``grads`` carry, or None.
        """
        n = self.counts.shape[1]

        def write() -> tf.Tensor:
            inverse = 1.0 if scale is None else 1.0 / tf.cast(scale, tf.float32)
            rows, reaches = [], []
            for grad in grads:
                values = tf.reshape(tf.cast(grad, tf.float32), [-1]) * inverse
                # Non-finite entries are moved to 0, then taken out of 0's bin again.
                finite = tf.math.is_finite(values)
                nonfinite = tf.cast(tf.size(values, tf.int64) - tf.math.count_nonzero(finite), tf.float32)
                values = tf.where(finite, values, 0.0)
                # The range from the values themselves (one more pass, every `every` steps
                # only). Binning values / reach in [-1, 1] cannot overflow, however large |g|.
                reach = tf.maximum(tf.reduce_max(tf.abs(values)), np.finfo(np.float32).tiny)
                binned = tf.cast(self._histogram(values / reach), tf.float32)
                rows.append(binned - tf.one_hot(self.bins // 2, self.bins) * nonfinite)
                reaches.append(reach)
            reach = tf.stack(reaches)
            counts = tf.scatter_nd(tf.constant([[c] for c in columns]), tf.stack(rows), [n, self.bins])
            ranges = tf.scatter_nd(tf.constant([[c] for c in columns]), reach, [n])
            slot = tf.math.floormod(count // self.every, self.capacity)
            write_row(self.counts, slot, counts)
            write_row(self.ranges, slot, ranges)
            return tf.constant(True)

        tf.cond(tf.equal(tf.math.floormod(count, self.every), 0), write, lambda: tf.constant(False))

    def _histogram(self, unit: tf.Tensor) -> tf.Tensor:
        """Counts of ``unit`` (values in [-1, 1]) in ``bins`` equal bins."""
        if not self.xla:
            return tf.histogram_fixed_width(unit, tf.constant([-1.0, 1.0]), nbins=self.bins)
        # XLA has no HistogramFixedWidth kernel: the same binning as a segment sum.
        index = tf.cast(tf.floor((unit + 1.0) * (self.bins / 2)), tf.int32)
        return tf.math.unsorted_segment_sum(tf.ones_like(unit), tf.clip_by_value(index, 0, self.bins - 1), self.bins)

    def read(self, first: int, count: int) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Histograms of the steps in ``[first, count)`` still in the buffer.

        Returns:
            ``(step counts, counts [k, weights, bins], ranges [k, weights])``.
        """
        wanted = [k for k in range(-(-first // self.every) * self.every, count, self.every)]
        wanted = [k for k in wanted if (count - 1) // self.every - k // self.every < self.capacity]
        if not wanted:
            return [], np.zeros((0, *self.counts.shape[1:]), np.float32), np.zeros((0, self.ranges.shape[1]))
        slots = np.array([(k // self.every) % self.capacity for k in wanted])
        return wanted, self.counts.numpy()[slots], self.ranges.numpy()[slots]
