"""Gradient histograms recorded every N steps, against NumPy and a tape."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp
from monitor_helpers import WeightsBefore, sample_data, tape_gradients

from gradmagic.core.monitor.callback import GradientMonitor


@pytest.mark.parametrize("jit", [False, True])
def test_histograms_every_n_steps_match_numpy(jit):
    model = mlp((3, 5, 2))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit)
    x, y = sample_data()
    before, monitor = WeightsBefore(), GradientMonitor(read_every=3, histogram_every=3, histogram_bins=8)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[before, monitor])
    n_w = len(model.trainable_variables)
    assert [h.step for h in monitor.histograms] == [s for s in (0, 3, 6) for _ in range(n_w)]
    for h in monitor.histograms:
        batch = h.step % 4
        truth = tape_gradients(
            model, before.weights[h.step], x[8 * batch : 8 * batch + 8], y[8 * batch : 8 * batch + 8]
        )
        i = [v.path for v in model.trainable_variables].index(h.weight)
        g = truth[i].ravel()
        reach = np.abs(g).max()
        np.testing.assert_allclose(h.edges, np.linspace(-reach, reach, 9), rtol=1e-5)
        want, _ = np.histogram(g, np.linspace(-reach, reach, 9))
        assert h.counts.sum() == g.size and np.abs(h.counts - want).sum() <= 2  # float32 vs float64 bin edges
        assert (h.epoch, h.batch) == (h.step // 4, batch)


@pytest.mark.parametrize("xla", [False, True])
def test_histogram_leaves_out_nonfinite_entries(xla):
    from gradmagic.core.monitor.histogram_buffer import HistogramBuffer

    buffer = HistogramBuffer(1, every=1, bins=4, capacity=2, strategy=tf.distribute.get_strategy(), xla=xla)
    grad = tf.constant([np.nan, 1.0, -1.0, 0.5, np.inf, -0.2])

    @tf.function(jit_compile=xla)
    def record():
        buffer.record(tf.constant(0, tf.int64), [grad], [0])

    record()
    steps, counts, ranges = buffer.read(0, 1)
    # Finite entries -1, -0.2, 0.5, 1 over [-1, 1] in 4 bins; NaN and Inf are not binned.
    assert steps == [0] and ranges[0, 0] == 1.0
    np.testing.assert_array_equal(counts[0, 0], [1, 1, 0, 2])


def test_histograms_of_huge_gradients_under_loss_scaling():
    model = mlp()
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.0), initial_scale=2.0**15)
    model.compile(optimizer=optimizer, loss=lambda y, p: 1e16 * keras.ops.mean((y - p) ** 2))
    monitor = GradientMonitor(histogram_every=1, histogram_bins=6)
    model.fit(*sample_data(), batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    cols = monitor.to_dict()
    assert not any(cols["skipped"]) and 1e14 < max(cols["max_abs"]) < 1e20  # scaled, these squares overflow
    sizes = {v.path: v.numpy().size for v in model.trainable_variables}
    for h, max_abs in zip(monitor.histograms, cols["max_abs"], strict=True):
        assert h.counts.sum() == sizes[h.weight]
        np.testing.assert_allclose(h.edges[-1], max_abs, rtol=1e-5)  # unscaled, like the statistics
