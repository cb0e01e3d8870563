"""Integrated gradients, saliency and SmoothGrad against analytic results and hand-written tapes."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_unchanged, fingerprint, mlp

import gradmagic as gm
from gradmagic.core.questions import compute
from gradmagic.errors import GradmagicWarning


def linear(w: np.ndarray, b: np.ndarray) -> keras.Model:
    """f(x) = x @ w + b, with the weights set by hand."""
    inp = keras.Input((w.shape[0],))
    dense = keras.layers.Dense(w.shape[1])
    model = keras.Model(inp, dense(inp))
    dense.set_weights([w.astype("float32"), b.astype("float32")])
    return model


def power_sum(power: int, features: int = 4) -> keras.Model:
    """f(x) = sum_j x_j ** power, one output unit."""
    inp = keras.Input((features,))
    out = keras.layers.Lambda(lambda t: keras.ops.sum(t**power, axis=-1, keepdims=True))(inp)
    return keras.Model(inp, out)


def test_linear_model_attributions_are_w_times_x_and_complete():
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(5, 3)), rng.normal(size=3)
    model = linear(w, b)
    x = rng.normal(size=(6, 5)).astype("float32")
    for k in range(3):
        a = gm.integrated_gradients(model, x, output=k, steps=8)
        # The gradient of a linear model is w everywhere on the path; float32 graph vs float64 NumPy.
        np.testing.assert_allclose(a.array, x * w[:, k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.completeness_gap, 0.0, atol=1e-5)
        np.testing.assert_allclose(a.value_at_x, x @ w[:, k] + b[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.value_at_baseline, b[k], rtol=1e-6)
        assert a.output.tolist() == [k] * 6


def test_sum_of_squares_gives_x_squared_and_saliency_2x():
    model = power_sum(2)
    x = np.array([[0.5, -1.0, 2.0, 0.0], [3.0, 0.25, -0.75, 1.5]], "float32")
    for method in ("trapezoid", "midpoint"):
        # The integrand 2 a x_j is linear in a: both rules are exact, whatever the step count.
        a = gm.integrated_gradients(model, x, steps=200, method=method)
        np.testing.assert_allclose(a.array, x**2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.relative_gap, 0.0, atol=1e-5)
    # Up to a: integral_0^a 2 t x dt * x = a**2 x**2, exact for the trapezoid rule too.
    a = gm.integrated_gradients(model, x, steps=11, keep_path_gradients=True)
    alphas = a.accumulated_alphas.reshape(1, -1, 1)
    np.testing.assert_allclose(a.accumulated(), alphas**2 * (x**2)[:, None], rtol=1e-5, atol=1e-6)
    with pytest.raises(gm.GradmagicError, match="keep_path_gradients=True"):
        gm.integrated_gradients(model, x, steps=11).accumulated()
    s = gm.saliency(model, x)
    np.testing.assert_allclose(s.array, 2 * x, rtol=1e-6)
    assert s.samples == 1 and np.all(s.noise_std == 0)


def test_left_riemann_sum_matches_a_hand_written_tape_on_the_same_path():
    model = mlp((3, 5, 2), activation="tanh")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 3)).astype("float32")
    baseline = rng.normal(size=(3,)).astype("float32")  # one baseline for every sample
    steps = 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradmagicWarning)  # 7 left-rule steps are coarse; the sum is the point
        a = gm.integrated_gradients(
            model, x, output=1, baseline=baseline, steps=steps, method="left", keep_path_gradients=True
        )
    alphas = np.arange(steps) / steps
    np.testing.assert_allclose(a.path_alphas, alphas)
    total = np.zeros_like(x)
    for k, alpha in enumerate(alphas):
        point = tf.constant(baseline + alpha * (x - baseline))
        with tf.GradientTape() as tape:
            tape.watch(point)
            value = model(point)[:, 1]
        grad = tape.gradient(value, point).numpy()
        # Compiled batched graph vs an eager tape per point: float32 rounding, not bit for bit.
        np.testing.assert_allclose(a.path_gradients[:, k], grad, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.path_outputs[:, k], value.numpy(), rtol=1e-5, atol=1e-6)
        total += grad / steps
    np.testing.assert_allclose(a.array, (x - baseline) * total, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.baseline, np.broadcast_to(baseline, x.shape))
    np.testing.assert_allclose(a.accumulated()[:, -1], a.array, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.accumulated_alphas, (np.arange(steps) + 1) / steps)


def test_trapezoid_path_runs_from_the_baseline_to_x():
    model = mlp((3, 4, 2))
    x = np.random.default_rng(3).normal(size=(2, 3)).astype("float32")
    a = gm.integrated_gradients(model, x, output=0, steps=5)
    np.testing.assert_allclose(a.path_alphas, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(a.path_weights, [0.125, 0.25, 0.25, 0.25, 0.125])
    expected_ends = model(np.concatenate([np.zeros_like(x), x])).numpy()[:, 0]
    # Two compiled graphs (the path and the end points) vs eager: tolerance.
    np.testing.assert_allclose(a.path_outputs[:, 0], expected_ends[:2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.path_outputs[:, -1], expected_ends[2:], rtol=1e-5, atol=1e-6)


def test_a_coarse_path_warns_with_a_step_count_that_closes_the_gap():
    model = power_sum(3)
    x = np.array([[1.0, -0.5, 0.8, 1.2]], "float32")
    # f(a x) = a**3 sum(x**3): the trapezoid rule with h = 1/(steps-1) over 3 a**2 is off by h**2 / 2.
    with pytest.warns(GradmagicWarning, match=r"try steps=(\d+)") as caught:
        a = gm.integrated_gradients(model, x, steps=2)
    np.testing.assert_allclose(a.relative_gap, 0.5, rtol=1e-5)
    assert not a.complete and "try steps=" in a.notes[0]
    suggested = int(str(caught[0].message).split("try steps=")[1].split(".")[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradmagicWarning)
        better = gm.integrated_gradients(model, x, steps=suggested)
    assert better.complete
    np.testing.assert_allclose(better.relative_gap, 0.5 / (suggested - 1) ** 2, rtol=1e-3)


def test_predicted_class_is_the_default_output():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)])
    x = np.random.default_rng(4).normal(size=(8, 4)).astype("float32")
    predicted = np.argmax(model(x).numpy(), axis=1)
    assert len(set(predicted)) > 1  # the test needs samples whose classes differ
    a = gm.integrated_gradients(model, x, steps=10)
    s = gm.saliency(model, x)
    assert a.output.tolist() == predicted.tolist() == s.output.tolist()
    for k in set(predicted.tolist()):
        rows = predicted == k
        # Each sample's map is the one asked for its class explicitly (same graph, same arithmetic).
        np.testing.assert_allclose(a.array[rows], gm.integrated_gradients(model, x, output=k, steps=10).array[rows])
        np.testing.assert_allclose(s.array[rows], gm.saliency(model, x, output=k).array[rows])


def test_smoothgrad_of_a_linear_model_is_its_gradient():
    rng = np.random.default_rng(5)
    w, b = rng.normal(size=(4, 2)), rng.normal(size=2)
    model = linear(w, b)
    x = rng.normal(size=(3, 4)).astype("float32")
    plain = gm.saliency(model, x, output=1)
    smooth = gm.saliency(model, x, output=1, smooth=0.3, samples=16)
    np.testing.assert_allclose(plain.array, np.broadcast_to(w[:, 1], x.shape), rtol=1e-6)
    np.testing.assert_allclose(smooth.array, plain.array, rtol=1e-5)
    assert smooth.samples == 16 and smooth.sample_outputs.shape == (3, 16)
    # Every copy has the same gradient: the mean is certain (up to float32 rounding of the squares).
    np.testing.assert_allclose(smooth.relative_error, 0.0, atol=1e-3)
    np.testing.assert_allclose(smooth.gradient_at_x, plain.array, rtol=1e-6)


def test_smoothgrad_noise_is_the_documented_gaussian():
    model = power_sum(2, features=5)
    x = np.random.default_rng(6).normal(size=(2, 5)).astype("float32")
    s = gm.saliency(model, x, smooth=0.2, samples=12, seed=7)
    spread = x.max(axis=1) - x.min(axis=1)
    np.testing.assert_allclose(s.noise_std, 0.2 * spread, rtol=1e-6)
    for i in range(2):
        noise = np.random.default_rng([7, i]).standard_normal((12, 5)) * s.noise_std[i]
        # d/dx sum(x**2) = 2 x, so the mean over noisy copies is 2 (x + mean noise).
        np.testing.assert_allclose(s.array[i], 2 * (x[i] + noise.mean(axis=0)), rtol=1e-4, atol=1e-5)
        # The gradients 2 (x + noise) vary as 2 * noise does: the standard error of their mean, by hand.
        variance = (2 * noise).var(axis=0, ddof=1)
        np.testing.assert_allclose(s.standard_error[i], np.sqrt(variance.sum() / 12), rtol=1e-3)
    np.testing.assert_allclose(s.gradient_at_x, 2 * x, rtol=1e-6)
    # Sample i's noise depends on (seed, i) only, not on the batch size.
    alone = gm.saliency(model, x[:1], smooth=0.2, samples=12, seed=7)
    np.testing.assert_allclose(alone.array[0], s.array[0], rtol=1e-6)


def test_small_batches_give_the_same_maps():
    model = mlp((3, 6, 2))
    x = np.random.default_rng(8).normal(size=(5, 3)).astype("float32")
    whole = gm.integrated_gradients(model, x, output=0, steps=20, keep_path_gradients=True)
    split = gm.integrated_gradients(model, x, output=0, steps=20, batch_size=7, keep_path_gradients=True)
    # Chunked sums add in another order: float32 rounding only.
    np.testing.assert_allclose(split.array, whole.array, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(split.path_gradients, whole.path_gradients, rtol=1e-5, atol=1e-7)
    s1 = gm.saliency(model, x, smooth=0.1, samples=9)
    s2 = gm.saliency(model, x, smooth=0.1, samples=9, batch_size=4)
    np.testing.assert_allclose(s2.array, s1.array, rtol=1e-5, atol=1e-7)


def test_blur_baseline_is_a_separable_gaussian_with_reflected_borders():
    from gradmagic.core.questions.attribution.baselines import gaussian_kernel

    x = np.random.default_rng(9).random((1, 10, 10, 2)).astype("float32")
    model = keras.Sequential([keras.Input((10, 10, 2)), keras.layers.Flatten(), keras.layers.Dense(1)])
    a = gm.integrated_gradients(model, x, baseline="blur", steps=4)
    kernel = gaussian_kernel(1.0)  # sigma = 0.1 * max(10, 10)
    radius = len(kernel) // 2
    expected = x.astype(np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(expected, pad, mode="symmetric")
        expected = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded)
    np.testing.assert_allclose(a.baseline, expected, rtol=1e-5, atol=1e-6)
    flat = np.full((1, 10, 10, 2), 0.3, "float32")
    np.testing.assert_allclose(gm.integrated_gradients(model, flat, baseline="blur", steps=2).baseline, flat, rtol=1e-6)
    # A linear model's attributions are w * (x - baseline), whatever the baseline.
    w = model.layers[-1].get_weights()[0][:, 0].reshape(x.shape)
    np.testing.assert_allclose(a.array, w * (x - a.baseline), rtol=1e-4, atol=1e-6)


def test_uniform_baseline_stays_in_each_samples_range_and_follows_the_seed():
    model = mlp((3, 4, 2))
    x = np.array([[0.0, 1.0, 0.5], [-2.0, -1.0, -1.5]], "float32")
    a = gm.integrated_gradients(model, x, output=0, baseline="uniform", seed=3, steps=4)
    assert np.all(a.baseline[0] >= 0) and np.all(a.baseline[0] <= 1)
    assert np.all(a.baseline[1] >= -2) and np.all(a.baseline[1] <= -1)
    again = gm.integrated_gradients(model, x, output=0, baseline="uniform", seed=3, steps=4)
    other = gm.integrated_gradients(model, x, output=0, baseline="uniform", seed=4, steps=4)
    np.testing.assert_array_equal(again.baseline, a.baseline)
    assert not np.array_equal(other.baseline, a.baseline)


def test_repeated_calls_reuse_one_trace():
    model = mlp((3, 4, 2))
    rng = np.random.default_rng(10)
    for batch, steps in [(1, 10), (4, 30), (2, 50), (3, 7)]:
        gm.integrated_gradients(model, rng.normal(size=(batch, 3)).astype("float32"), steps=steps)
        gm.saliency(model, rng.normal(size=(batch, 3)).astype("float32"), smooth=0.1, samples=steps)
        gm.saliency(model, rng.normal(size=(batch, 3)).astype("float32"))
    kinds = {k[0]: q for k, (q, _) in compute._cache[model].items()}
    for kind in ("integrated gradients", "saliency"):
        assert kinds[kind].fn.experimental_get_tracing_count() == 1, kind


def test_results_have_tables_and_columns():
    model = mlp((3, 4, 2))
    x = np.random.default_rng(11).normal(size=(3, 3)).astype("float32")
    a = gm.integrated_gradients(model, x, steps=10)
    s = gm.saliency(model, x, smooth=0.1, samples=4)
    for result in (a, s):
        columns = result.to_dict()
        assert {len(v) for v in columns.values()} == {3}
        assert result.title in repr(result) and "<table" in result._repr_html_()
    np.testing.assert_allclose(a.to_dict()["completeness_gap"], a.completeness_gap)
    assert a.steps == 10 and "10 steps" in repr(a)


def test_the_model_is_left_bit_identical():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(3),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 6)), np.ones((4, 3)), verbose=0)
    before = fingerprint(model)
    x = np.random.default_rng(12).normal(size=(4, 6)).astype("float32")
    gm.integrated_gradients(model, x, steps=5, baseline="uniform")
    gm.saliency(model, x, smooth=0.2, samples=5)
    assert_unchanged(model, before)


class Quadratic(keras.Model):
    """A subclassed model (no declared outputs): f(x) = [sum(x**2), sum(x)]."""

    def call(self, x):
        return keras.ops.stack([keras.ops.sum(x**2, axis=-1), keras.ops.sum(x, axis=-1)], axis=-1)


def test_a_subclassed_model_is_checked_against_its_real_outputs():
    model = Quadratic()
    x = np.array([[1.0, -2.0, 0.5]], "float32")
    a = gm.integrated_gradients(model, x, output=0, steps=3)
    np.testing.assert_allclose(a.array, x**2, rtol=1e-6)  # trapezoid is exact for a linear integrand
    np.testing.assert_allclose(gm.saliency(model, x, output=-1).array, np.ones_like(x))  # -1: the last unit
    with pytest.raises(gm.GradmagicError, match=r"Received: output=2.*2 output unit"):
        gm.saliency(model, x, output=2)


def test_x_from_a_dataset_is_its_first_batch():
    x = np.arange(12, dtype="float32").reshape(6, 2) / 10
    model = power_sum(2, features=2)
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(6, "float32"))).batch(4)
    a = gm.integrated_gradients(model, ds, steps=2)
    np.testing.assert_allclose(a.array, x[:4] ** 2, rtol=1e-6)
    assert any("first batch" in n for n in a.notes)


def test_an_unsettled_smoothgrad_map_says_how_many_copies_to_try():
    model = power_sum(2, features=3)
    x = np.array([[0.1, -0.1, 0.05]], "float32")
    s = gm.saliency(model, x, smooth=1.0, samples=4)  # noise far larger than x: the mean is rough
    rel = float(s.relative_error[0])
    assert rel > 0.1 and s.to_dict()["relative_error"] == [rel]
    expected = int(np.ceil(4 * (rel / 0.1) ** 2 / 10) * 10)  # the standard error falls as 1/sqrt(samples)
    assert f"samples={expected}" in s.notes[-1] and "gm-ok" not in s._repr_html_()


def test_a_bias_free_relu_net_from_zeros_loses_exactly_the_trapezoids_first_half_step():
    # f(a x) = a f(x) for a > 0, so the gradient along the path is constant on (0, 1]; at a = 0 exactly every
    # ReLU sits at 0, where TensorFlow's derivative is 0. The midpoint rule never evaluates there.
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu", use_bias=False),
            keras.layers.Dense(1, use_bias=False),
        ]
    )
    x = np.random.default_rng(13).normal(size=(3, 4)).astype("float32")
    change = model(x).numpy()[:, 0]
    midpoint = gm.integrated_gradients(model, x, steps=3, method="midpoint")
    np.testing.assert_allclose(midpoint.attribution_sum, change, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradmagicWarning)  # 1/18 is above 5%: the warning is the point elsewhere
        trapezoid = gm.integrated_gradients(model, x, steps=10)
    np.testing.assert_allclose(trapezoid.attribution_sum, change * (1 - 1 / 18), rtol=1e-5)
    np.testing.assert_allclose(trapezoid.relative_gap, 1 / 18, rtol=1e-4)
    # The gap falls as 1/steps here, not 1/steps**2: the suggested step count still closes it.
    with pytest.warns(GradmagicWarning, match=r"try steps=(\d+)") as caught:
        gm.integrated_gradients(model, x, steps=2)
    suggested = int(str(caught[0].message).split("try steps=")[1].split(".")[0])
    assert gm.integrated_gradients(model, x, steps=suggested).complete


def rounded_input_model() -> keras.Model:
    """f(x) = Dense(round(x)): the output moves with x, but TensorFlow has no gradient through round."""
    inp = keras.Input((3,))
    out = keras.layers.Dense(2)(keras.layers.Lambda(lambda t: keras.ops.round(t))(inp))
    return keras.Model(inp, out)


def test_an_output_with_no_gradient_path_to_x_says_so_instead_of_asking_for_more_steps():
    model = rounded_input_model()
    x = np.array([[1.4, 2.6, 3.1], [0.7, -1.2, 2.2]], "float32")
    # tape.gradient gives None: the output is disconnected from x, whatever the point.
    point = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(point)
        value = model(point)[:, 0]
    assert tape.gradient(value, point) is None
    with pytest.warns(GradmagicWarning, match=r"no gradient path from x") as caught:
        a = gm.integrated_gradients(model, x, output=0)
    assert not any("try steps" in str(w.message) for w in caught)  # more steps cannot close this gap
    np.testing.assert_array_equal(a.array, 0.0)
    assert any("no gradient path from x" in n for n in a.notes)
    with pytest.warns(GradmagicWarning, match=r"no gradient path from x"):
        s = gm.saliency(model, x, output=0, smooth=0.1, samples=3)
    np.testing.assert_array_equal(s.array, 0.0)
    assert any("no gradient path from x" in n for n in s.notes)
    with pytest.warns(GradmagicWarning, match=r"no gradient path from x"):
        gm.saliency(model, x, output=0)
