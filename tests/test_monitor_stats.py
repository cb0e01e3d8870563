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


@pytest.mark.parametrize("jit", [False, True])
def test_half_squares_equal_numpy_and_are_exact_only_when_finite_and_in_range(jit):
    from gradmagic.core.monitor.stats import exact_halves, half_squares

    rng = np.random.default_rng(3)
    # Row-reduced (large, composite), flat slices (prime > 65536), small, and a weight without a gradient.
    grads = [rng.normal(size=s).astype("float32") for s in [(70, 1000), (131071,), (3, 4)]]
    sizes = [g.size for g in grads] + [0]

    def run(*g):
        halves = half_squares([*g, None], sizes, xla=jit)
        return halves, exact_halves(halves, sizes)

    run = tf.function(run, jit_compile=jit)
    halves, exact = run(*grads)
    want = [np.sum(np.square(g.astype("float64"))) / 2 for g in grads] + [0.0]
    np.testing.assert_allclose(halves.numpy(), want, rtol=2e-6)  # float32 sums against float64
    assert bool(exact)
    # Each case below must send the step to the exact (float64) statistics.
    nan, inf, huge = (g.copy() for g in [grads[2]] * 3)
    nan[0, 0], inf[1, 1], huge[2, 2] = np.nan, -np.inf, 1e20  # 1e20**2 leaves float32's range
    tiny = (grads[0] * 1e-20).astype("float32")  # squares below float32's normal range flush to 0
    for case in ([grads[0], grads[1], nan], [grads[0], grads[1], inf], [grads[0], grads[1], huge]):
        assert not bool(run(*case)[1])
    assert not bool(run(tiny, grads[1], grads[2])[1])
    assert not bool(run(grads[0], np.zeros_like(grads[1]), grads[2])[1])  # zero cannot be told from underflow
