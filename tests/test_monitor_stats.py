"""On-device gradient statistics (stats.py) against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from gradmagic.core.monitor.stats import finish_stats, stats_function, step_stats


def _numpy_stats(g):
    g = np.asarray(g, np.float64).ravel()
    finite = g[np.isfinite(g)]
    counts = [np.isnan(g).sum(), np.isinf(g).sum()]
    if not len(finite):
        return [np.nan] * 3 + counts
    return [np.linalg.norm(finite), np.abs(finite).max(), finite.mean(), *counts]


@pytest.mark.parametrize("jit", [False, True])
def test_step_stats_of_large_odd_and_nonfinite_gradients(jit):
    # Sizes: row-reduced (large, composite), flat slices (prime > 65536), small, empty, scalar.
    rng = np.random.default_rng(0)
    shapes = [(784, 256), (131071,), (3, 7), (0,), ()]
    grads = [(rng.normal(size=s) * 3 + 0.5).astype("float32") for s in shapes]
    spoiled = [g.copy() for g in grads]
    spoiled[0].flat[[5, 70_000]] = [np.nan, -np.inf]
    spoiled[2].flat[:] = np.inf
    sizes = [g.size for g in grads]
    run = tf.function(lambda *g: step_stats(g, xla=jit), jit_compile=jit)
    for case in (grads, spoiled):
        want = np.array([_numpy_stats(g) for g in case])
        got = finish_stats(run(*case).numpy(), sizes)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6, equal_nan=True)
    # The optimizer's g**2, when given, replaces the passes for the norm and max |g|.
    specs = [tf.TensorSpec(g.shape, tf.float32) for g in grads]
    with_squares = stats_function(specs, [True, False, True, False, True], xla=jit)
    squares = [np.square(g) for g in grads[::2]]
    got = finish_stats(tf.function(lambda *t: with_squares(*t), jit_compile=jit)(*grads, *squares).numpy(), sizes)
    np.testing.assert_allclose(got, np.array([_numpy_stats(g) for g in grads]), rtol=2e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("magnitude", [1e20, 1e-20])
def test_step_stats_exact_where_squares_leave_float32(magnitude, jit):
    # |g| = 1e20 squares to Inf in float32 and 1e-20 to 0: the statistics must not (float64 path).
    rng = np.random.default_rng(2)
    grads = [(rng.normal(size=s) * magnitude).astype("float32") for s in [(70_000,), (5, 3)]]
    want = np.array([_numpy_stats(g) for g in grads])
    run = tf.function(lambda *g: step_stats(g, xla=jit), jit_compile=jit)
    np.testing.assert_allclose(finish_stats(run(*grads).numpy(), [g.size for g in grads]), want, rtol=2e-6)
    specs = [tf.TensorSpec(g.shape, tf.float32) for g in grads]
    with_squares = tf.function(stats_function(specs, [True, True], xla=jit), jit_compile=jit)
    with np.errstate(over="ignore", under="ignore"):
        squares = [np.square(g) for g in grads]  # what the optimizer computes: Inf or 0
    got = with_squares(*grads, *squares).numpy()
    np.testing.assert_allclose(finish_stats(got, [g.size for g in grads]), want, rtol=2e-6)


def test_norm_stats_measure_the_norm_only_unless_asked_or_not_finite():
    from gradmagic.core.monitor.stats import norm_stats

    rng = np.random.default_rng(3)
    grads = [rng.normal(size=(70, 1000)).astype("float32"), rng.normal(size=(3, 4)).astype("float32")]
    sizes = [g.size for g in grads]
    run = tf.function(lambda full, *g: norm_stats(g, None, full))
    quick = finish_stats(run(tf.constant(False), *grads).numpy(), sizes)
    # Norm only: the norm against NumPy; max |g| and mean are 0 (not measured), the counts exactly 0.
    np.testing.assert_allclose(quick[:, 0], [np.linalg.norm(g.astype("float64")) for g in grads], rtol=2e-6)
    np.testing.assert_array_equal(quick[:, 1:], 0.0)
    full = finish_stats(run(tf.constant(True), *grads).numpy(), sizes)
    np.testing.assert_allclose(full, [_numpy_stats(g) for g in grads], rtol=2e-6, atol=1e-6)
    spoiled = [grads[0], grads[1].copy()]
    spoiled[1][0, 0] = np.nan  # a NaN makes every statistic of the step measured, counts included
    got = finish_stats(run(tf.constant(False), *spoiled).numpy(), sizes)
    np.testing.assert_allclose(got, [_numpy_stats(g) for g in spoiled], rtol=2e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("jit", [False, True])
def test_norm_stats_keep_the_scale_of_tiny_gradients(jit):
    # float32 squares of |g| < 1.1e-19 flush to 0: norms of 1e-20 would read as 0, and a
    # gradient of mixed tiny and small entries would lose the tiny ones' share. The
    # default mode must give the norm NumPy gives in float64, however small.
    from gradmagic.core.monitor.stats import norm_stats

    rng = np.random.default_rng(4)
    mixed = (rng.normal(size=(300, 300)) * 1e-20).astype("float32")
    mixed[0, :10] = 1e-16  # these squares are normal floats, the others are not
    grads = [
        (rng.normal(size=(70_000,)) * 1e-20).astype("float32"),
        (rng.normal(size=(5, 3)) * 1e-30).astype("float32"),
        mixed,
        rng.normal(size=(4,)).astype("float32"),  # ordinary
    ]
    sizes = [g.size for g in grads]
    run = tf.function(lambda full, *g: norm_stats(g, None, full, xla=jit), jit_compile=jit)
    got = finish_stats(run(tf.constant(False), *grads).numpy(), sizes)
    want = [np.linalg.norm(g.astype("float64")) for g in grads]
    np.testing.assert_allclose(got[:, 0], want, rtol=2e-6)
    # The float32 sums of squares really do underflow here (else this test could not fail).
    with np.errstate(under="ignore"):
        assert float(tf.reduce_sum(tf.square(grads[1]))) == 0.0
