"""Attribution on every backend: integrated gradients, saliency, Grad-CAM and token gradients against their truths.

The truths are written out here: the analytic input derivative of a small tanh
network in NumPy (saliency, SmoothGrad and integrated gradients by the same
quadrature), a convolution and its known gradient through global average
pooling (Grad-CAM), and the framework's own autodiff of the layers after an
Embedding (token gradients).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import gradmagic as gm
from gradmagic.core.questions.attribution.integrated import path_rule

from .backend_truths import fingerprint, hand_unit_gradient, no_grad_left, torch_trace_from_call


def _mlp(seed: int = 0) -> tuple[keras.Model, list[np.ndarray]]:
    """Dense(5, tanh) -> Dense(2) on 3 features, fixed weights; and the weights in float64."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)])
    rng = np.random.default_rng(seed)
    weights = [rng.normal(scale=0.8, size=w.shape).astype("float32") for w in model.get_weights()]
    model.set_weights(weights)
    return model, [w.astype(np.float64) for w in weights]


def _f(x: np.ndarray, w: list[np.ndarray]) -> np.ndarray:
    return np.tanh(np.asarray(x, np.float64) @ w[0] + w[1]) @ w[2] + w[3]


def _grad(x: np.ndarray, w: list[np.ndarray], unit: int) -> np.ndarray:
    """d f_unit / dx per row: W1 diag(1 - h^2) W2[:, unit]."""
    h = np.tanh(np.asarray(x, np.float64) @ w[0] + w[1])
    return ((1 - h**2) * w[2][:, unit]) @ w[0].T


X = np.random.default_rng(1).normal(size=(4, 3)).astype("float32")


def test_integrated_gradients_is_the_quadrature_of_the_analytic_gradient_and_adds_up():
    model, w = _mlp()
    before = fingerprint(model)
    steps = 16
    a = gm.integrated_gradients(model, X, output=1, steps=steps)
    alphas, weights = path_rule("trapezoid", steps)
    expected = np.stack([X[i] * sum(wj * _grad(aj * X[i : i + 1], w, 1)[0] for aj, wj in zip(alphas, weights))
                         for i in range(len(X))])  # fmt: skip
    # float32 on the backend against float64 here.
    np.testing.assert_allclose(a.array, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a.value_at_x, _f(X, w)[:, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.value_at_baseline, _f(np.zeros_like(X), w)[:, 1], rtol=1e-5, atol=1e-6)
    # Completeness: the attributions add up to f(x) - f(0), up to the trapezoid rule's error, which falls
    # as 1/steps^2 on this smooth path: the gap at 16 steps is the float64 quadrature's own gap.
    change = _f(X, w)[:, 1] - _f(np.zeros_like(X), w)[:, 1]
    np.testing.assert_allclose(a.completeness_gap, expected.sum(axis=1) - change, rtol=1e-2, atol=2e-6)
    fine = gm.integrated_gradients(model, X, output=1, steps=128)
    assert np.all(np.abs(fine.array.sum(axis=1) - change) <= 1e-3 * np.abs(change) + 1e-5)
    assert np.max(np.abs(fine.completeness_gap)) < np.max(np.abs(a.completeness_gap))
    assert fingerprint(model) == before and no_grad_left(model)


def test_integrated_gradients_other_rules_batches_and_kept_path_gradients():
    model, w = _mlp(2)
    base = np.full(3, 0.5, "float32")
    a = gm.integrated_gradients(model, X, output=0, baseline=base, steps=6, method="midpoint", batch_size=5,
                                keep_path_gradients=True)  # fmt: skip
    alphas, _ = path_rule("midpoint", 6)
    for i in range(len(X)):
        points = base + alphas[:, None] * (X[i] - base)
        np.testing.assert_allclose(a.path_gradients[i], _grad(points, w, 0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a.path_outputs[i], _f(points, w)[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.array, (X - base) * a.path_gradients.mean(axis=1), rtol=1e-4, atol=1e-6)


def test_saliency_is_the_analytic_gradient_of_the_chosen_unit():
    model, w = _mlp(3)
    before = fingerprint(model)
    s = gm.saliency(model, X, output=1)
    np.testing.assert_allclose(s.array, _grad(X, w, 1), rtol=1e-4, atol=1e-6)
    # output=None: each sample's predicted class at x.
    predicted = np.argmax(_f(X, w), axis=1)
    s = gm.saliency(model, X)
    np.testing.assert_array_equal(s.output, predicted)
    expected = np.stack([_grad(X[i : i + 1], w, k)[0] for i, k in enumerate(predicted)])
    np.testing.assert_allclose(s.array, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s.value_at_x, _f(X, w)[np.arange(len(X)), predicted], rtol=1e-5, atol=1e-6)
    assert fingerprint(model) == before and no_grad_left(model)


def test_smoothgrad_is_the_mean_analytic_gradient_over_the_same_noisy_copies():
    model, w = _mlp(4)
    smooth, samples, seed = 0.2, 7, 3
    s = gm.saliency(model, X, output=0, smooth=smooth, samples=samples, seed=seed, batch_size=5)
    for i in range(len(X)):
        std = smooth * (X[i].max() - X[i].min())
        # The documented noise: sample i's copies come from default_rng([seed, i]).
        noise = (np.random.default_rng([seed, i]).standard_normal((samples, 3)) * std).astype("float32")
        np.testing.assert_allclose(s.array[i], _grad(X[i] + noise, w, 0).mean(axis=0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(s.sample_outputs[i], _f(X[i] + noise, w)[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.gradient_at_x, _grad(X, w, 0), rtol=1e-4, atol=1e-6)


def _conv_model() -> tuple[keras.Model, list[np.ndarray]]:
    """Conv2D(3, 2x2) -> GlobalAveragePooling2D -> Dense(2), fixed weights."""
    model = keras.Sequential(
        [
            keras.Input((5, 5, 2)),
            keras.layers.Conv2D(3, 2, name="conv"),
            keras.layers.GlobalAveragePooling2D(name="pool"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    rng = np.random.default_rng(5)
    weights = [rng.normal(scale=0.6, size=v.shape).astype("float32") for v in model.get_weights()]
    model.set_weights(weights)
    return model, [v.astype(np.float64) for v in weights]


def test_gradcam_is_the_weighted_sum_of_a_convolution_with_known_gradients():
    model, (kernel, bias, dense, dense_bias) = _conv_model()
    before = fingerprint(model)
    x = np.random.default_rng(6).normal(size=(2, 5, 5, 2)).astype("float32")
    g = gm.gradcam(model, x, "conv", output=1)
    # The convolution by hand (valid, stride 1): A[b, i, j, c] = sum x[b, i+di, j+dj, :] . K[di, dj, :, c] + bias.
    a = np.zeros((2, 4, 4, 3))
    for di in range(2):
        for dj in range(2):
            a += np.einsum("bijk,kc->bijc", x[:, di : di + 4, dj : dj + 4].astype(np.float64), kernel[di, dj])
    a += bias
    # Through the average over 4x4 places, d out_1 / d A[b, i, j, c] = dense[c, 1] / 16 at every place.
    weights = np.tile(dense[:, 1] / 16, (2, 1))
    np.testing.assert_allclose(g.activations, a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.gradients, np.broadcast_to(weights[:, None, None], a.shape), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g.weights, weights, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g.array, np.maximum(np.einsum("bijc,bc->bij", a, weights), 0), rtol=1e-4, atol=1e-6)
    assert g.array.shape == (2, 4, 4) and g.layer_name == "conv"
    np.testing.assert_allclose(g.value_at_x, a.mean(axis=(1, 2)) @ dense[:, 1] + dense_bias[1], rtol=1e-5, atol=1e-5)
    assert fingerprint(model) == before and no_grad_left(model)


def _token_model() -> keras.Model:
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(10, 4, name="embed"),
            keras.layers.LSTM(3, name="lstm"),
            keras.layers.Dense(2, name="head"),
        ]
    )


def test_token_gradients_match_the_frameworks_own_autodiff_after_the_embedding():
    model = _token_model()
    before = fingerprint(model)
    ids = np.array([[1, 2, 3, 4, 5], [0, 9, 8, 7, 6], [3, 3, 3, 3, 3]])
    t = gm.token_gradients(model, ids, output=1)
    vectors = keras.ops.convert_to_numpy(model.get_layer("embed")(ids))

    def rest(v):
        return model.get_layer("head")(model.get_layer("lstm")(v))

    expected = hand_unit_gradient(rest, vectors, 1)
    np.testing.assert_allclose(t.embeddings, vectors, rtol=1e-6)
    # Two differentiations of the same float32 LSTM, run in different programs: rounding only.
    np.testing.assert_allclose(t.array, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(t.values, keras.ops.convert_to_numpy(model(ids))[:, 1], rtol=1e-5, atol=1e-6)
    assert t.layer_name == "embed" and t.output == 1
    assert fingerprint(model) == before and no_grad_left(model)


def test_token_integrated_gradients_add_up_to_the_change_from_zero_embeddings():
    model = _token_model()
    ids = np.array([[1, 2, 3, 4, 5], [0, 9, 8, 7, 6]])
    a = gm.token_integrated_gradients(model, ids, output=0, steps=64)
    vectors = keras.ops.convert_to_numpy(model.get_layer("embed")(ids))
    head, lstm = model.get_layer("head"), model.get_layer("lstm")
    at_x = keras.ops.convert_to_numpy(head(lstm(vectors)))[:, 0]
    at_zero = keras.ops.convert_to_numpy(head(lstm(np.zeros_like(vectors))))[:, 0]
    np.testing.assert_allclose(a.value_at_x, at_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.value_at_baseline, at_zero, rtol=1e-5, atol=1e-6)
    # The trapezoid rule with 64 steps on a smooth path: within a small fraction of the change.
    change = at_x - at_zero
    assert np.all(np.abs(a.array.sum(axis=(1, 2)) - change) <= 1e-2 * np.abs(change) + 1e-5)
    assert a.array.shape == vectors.shape


def test_attribution_leaves_batchnorm_statistics_and_parameters_untouched():
    keras.utils.set_random_seed(8)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, name="conv"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    x = np.random.default_rng(9).normal(size=(3, 6, 6, 2)).astype("float32")
    # Statistics away from their initial values, so that a moved one would show.
    rng = np.random.default_rng(10)
    model.set_weights([np.abs(rng.normal(size=v.shape)).astype("float32") + 0.1 for v in model.get_weights()])
    before = fingerprint(model)
    gm.integrated_gradients(model, x, steps=5, baseline="blur")
    gm.saliency(model, x, smooth=0.1, samples=3)
    gm.gradcam(model, x, "conv")
    assert fingerprint(model) == before and no_grad_left(model)


def test_repeated_calls_reuse_the_compiled_function(backend):
    if backend == "tensorflow":
        pytest.skip("the TensorFlow engine's trace reuse is checked in tests/test_attribution.py")
    from gradmagic.core.questions import stateless_functions
    from gradmagic.core.questions.model_keys import question_key

    model, _ = _mlp(5)
    for _ in range(3):
        gm.integrated_gradients(model, X, output=0, steps=10)
    question = stateless_functions.cached(model, question_key(model, "integrated gradients", False), pytest.fail)
    # jax.jit traces once per input signature; PyTorch runs the body eagerly at the first call, then traces
    # it once at the second (unless every call traces, see conftest.py), and later calls run the graph.
    assert question.traces[0] == (2 if backend == "torch" and torch_trace_from_call() == 2 else 1)
    gm.clear_cache(model)
    fresh = stateless_functions.cached(model, question_key(model, "integrated gradients", False), lambda: None)
    assert fresh is None  # clear_cache dropped it


def test_gradcam_map_is_resized_bilinearly_with_half_pixel_centres():
    model, _ = _conv_model()
    g = gm.gradcam(model, np.random.default_rng(11).normal(size=(1, 5, 5, 2)).astype("float32"), "conv")
    g.array = np.array([[[0.0, 1.0], [2.0, 4.0]]], "float32")  # a known 2x2 map
    # Output place i reads the map at (i + 0.5) / 2 - 0.5, clamped: 0, 0.25, 0.75, 1 along each axis.
    rows = np.array([[0.0, 1.0], [0.5, 1.75], [1.5, 3.25], [2.0, 4.0]])
    expected = np.stack([rows[:, 0] * (1 - t) + rows[:, 1] * t for t in (0.0, 0.25, 0.75, 1.0)], axis=1)
    np.testing.assert_allclose(g.upsampled((4, 4))[0], expected, rtol=1e-6)
    np.testing.assert_allclose(g.upsampled((1, 1))[0], [[1.75]], rtol=1e-6)  # the centre of the 2x2 map
