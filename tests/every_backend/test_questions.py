"""The three gradient questions give the same, correct answers on TensorFlow, JAX and PyTorch.

Truth: the framework's own autodiff written out in the test, NumPy forward
passes differentiated by central differences in float64, and analytic
derivatives. gradmagic computes in float32, so comparisons allow float32
round-off (relative 1e-4 against another float32 autodiff, which may order
its sums differently; 1e-3 against float64 finite differences, whose own
error is ~1e-10 but which see the float32 weights' rounding in the model).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import gradmagic as gm

from .backend_truths import central_differences, hand_mse_gradients, weights64

RNG = np.random.default_rng(0)
X = RNG.normal(size=(6, 3)).astype("float32")
Y = RNG.normal(size=(6, 2)).astype("float32")


def _mlp(regularized: bool = False) -> keras.Model:
    keras.utils.set_random_seed(1)
    regularizer = keras.regularizers.L2(0.1) if regularized else None
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh", kernel_regularizer=regularizer),
            keras.layers.Dense(3, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def _numpy_forward(weights: list[np.ndarray], x: np.ndarray, start: int = 0) -> np.ndarray:
    """The MLP above in NumPy, from the output of layer ``start - 1`` (``x`` is then that output)."""
    h = x
    for i in range(start, 3):
        h = h @ weights[2 * i] + weights[2 * i + 1]
        if i < 2:
            h = np.tanh(h)
    return h


def _numpy_mse(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, start: int = 0) -> float:
    return float(np.mean((_numpy_forward(weights, x, start) - y) ** 2))


def test_weight_gradients_match_the_frameworks_own_autodiff():
    model = _mlp()
    result = gm.weight_gradients(model, X, Y)
    expected = hand_mse_gradients(model, X, Y)
    assert len(result.arrays()) == len(expected) == 6
    for got, want in zip(result.arrays(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_weight_gradients_and_loss_match_numpy_finite_differences():
    model = _mlp()
    weights = weights64(model)
    result = gm.weight_gradients(model, X, Y)
    assert result.loss == pytest.approx(_numpy_mse(weights, X, Y), rel=1e-5)
    for i, got in enumerate(result.arrays()):

        def loss_at(w: np.ndarray, i: int = i) -> float:
            return _numpy_mse([w if j == i else v for j, v in enumerate(weights)], X, Y)

        np.testing.assert_allclose(got, central_differences(loss_at, weights[i]), rtol=1e-3, atol=1e-5)


def test_regularization_counts_with_the_values_passed_in():
    # The L2 term (0.1 * sum W^2) must be differentiated at the weights, as fit does.
    model = _mlp(regularized=True)
    weights = weights64(model)
    result = gm.weight_gradients(model, X, Y, layer=0)

    def loss_at(kernel: np.ndarray) -> float:
        return _numpy_mse([kernel, *weights[1:]], X, Y) + 0.1 * float(np.sum(kernel**2))

    assert result.loss == pytest.approx(loss_at(weights[0]), rel=1e-5)
    np.testing.assert_allclose(result.arrays()[0], central_differences(loss_at, weights[0]), rtol=1e-3, atol=1e-5)


def test_one_layer_by_index_or_name_gives_that_layers_part():
    model = _mlp()
    full = gm.weight_gradients(model, X, Y).arrays()
    by_index = gm.weight_gradients(model, X, Y, layer=1)
    by_name = gm.weight_gradients(model, X, Y, layer=model.layers[1].name)
    for part in (by_index, by_name):
        assert [row.labels["weight"] for row in part.rows] == ["kernel", "bias"]
        # The same computation restricted to fewer weights: float32 round-off only.
        np.testing.assert_allclose(part.arrays()[0], full[2], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(part.arrays()[1], full[3], rtol=1e-5, atol=1e-7)


def test_sample_weight_and_explicit_losses_match_hand_written_autodiff():
    model = _mlp()
    weight = np.array([1.0, 0.0, 2.0, 0.5, 1.0, 3.0], "float32")
    result = gm.weight_gradients(model, X, Y, loss="mse", sample_weight=weight)
    for got, want in zip(result.arrays(), hand_mse_gradients(model, X, Y, weight)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    weights = weights64(model)
    mae = gm.weight_gradients(model, X, Y, loss=lambda t, p: keras.ops.mean(keras.ops.abs(p - t), axis=-1))
    assert mae.loss == pytest.approx(float(np.mean(np.abs(_numpy_forward(weights, X) - Y))), rel=1e-5)
    by_name = gm.weight_gradients(model, X, Y, loss="mean_absolute_error")
    for got, want in zip(by_name.arrays(), mae.arrays()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_output_gradients_match_finite_differences_at_the_layers_output():
    model = _mlp()
    weights = weights64(model)
    for k in (0, 1):
        result = gm.output_gradients(model, X, Y, layer=k)
        hidden = X.astype(np.float64)
        for i in range(k + 1):
            hidden = np.tanh(hidden @ weights[2 * i] + weights[2 * i + 1])
        assert result.array.shape == hidden.shape
        np.testing.assert_allclose(result.output, hidden, rtol=1e-5, atol=1e-6)

        def loss_from(h: np.ndarray, k: int = k) -> float:
            return _numpy_mse(weights, h, Y, start=k + 1)

        np.testing.assert_allclose(result.array, central_differences(loss_from, hidden), rtol=1e-3, atol=1e-6)
        assert result.layer_index == k and result.calls == 1


def test_input_jacobian_of_an_analytic_function():
    # y = (x - 5)^2 / 25 elementwise: dy_i/dx_j = 2 (x_i - 5) / 25 on the diagonal, 0 elsewhere.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda t: keras.ops.square(t - 5.0) / 25.0)])
    x = np.array([[0.0, 5.0, 7.5], [10.0, -1.0, 2.0]], "float32")
    jac = gm.input_gradients(model, x)
    expected = np.stack([np.diag(2 * (row - 5) / 25) for row in x.astype(np.float64)])
    assert jac.array.shape == (2, 3, 3)
    np.testing.assert_allclose(jac.array, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jac.values, (x - 5) ** 2 / 25, rtol=1e-6)
    unit = gm.input_gradients(model, x, output=2)
    assert unit.array.shape == (2, 3)
    np.testing.assert_allclose(unit.array, expected[:, 2, :], rtol=1e-6, atol=1e-7)


def test_functional_two_input_model():
    keras.utils.set_random_seed(2)
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    out = keras.layers.Dense(2, name="head")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], out)
    xa, xb = X[:, :2], RNG.normal(size=(6, 3)).astype("float32")
    kernel, bias = weights64(model)
    result = gm.weight_gradients(model, [xa, xb], Y, loss="mse")
    joined = np.concatenate([xa, xb], axis=1).astype(np.float64)
    residual = 2 * (joined @ kernel + bias - Y) / Y.size  # d mean((xW + b - y)^2) / d(xW + b)
    np.testing.assert_allclose(result.arrays()[0], joined.T @ residual, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.arrays()[1], residual.sum(axis=0), rtol=1e-4, atol=1e-6)
    # x as a dict by input name; the model was built on a list, so the result is a list in that order.
    jac = gm.input_gradients(model, {"a": xa, "b": xb})
    assert isinstance(jac.array, list) and len(jac.array) == 2
    # A linear layer: every sample's Jacobian is the kernel's part for that input, transposed.
    np.testing.assert_allclose(jac.array[0], np.broadcast_to(kernel[:2].T, (6, 2, 2)), rtol=1e-6)
    np.testing.assert_allclose(jac.array[1], np.broadcast_to(kernel[2:].T, (6, 2, 3)), rtol=1e-6)
    head = model.layers.index(model.get_layer("head"))
    grad_b = gm.output_gradients(model, [xa, xb], Y, layer="b", loss="mse")
    np.testing.assert_allclose(grad_b.array, residual @ kernel[2:].T, rtol=1e-4, atol=1e-6)
    assert gm.output_gradients(model, [xa, xb], Y, layer=head, loss="mse").array.shape == (6, 2)


class _HalfUsed(keras.layers.Layer):
    """A layer with a weight its call never reads."""

    def build(self, input_shape):
        self.used = self.add_weight(shape=(input_shape[-1], 2), initializer="glorot_uniform", name="used")
        self.spare = self.add_weight(shape=(2,), initializer="ones", name="spare")

    def call(self, x):
        return keras.ops.matmul(x, self.used)


def test_weights_the_loss_does_not_reach_give_none_on_every_backend():
    # TensorFlow's tape says None for a weight with no path to the loss; JAX (whose autodiff gives zeros)
    # and PyTorch must say the same: here a Dense behind stop_gradient and a weight never read.
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Lambda(keras.ops.stop_gradient), _HalfUsed()]
    )
    model.compile(optimizer="sgd", loss="mse")
    for _ in range(2):  # the first call and the repeated one
        result = gm.weight_gradients(model, X, Y)
        kernel, bias, used, spare = result.arrays()
        assert kernel is None and bias is None and spare is None
        assert len(result.disconnected) == 3
        k, b, w = (np.asarray(v, "float64") for v in model.get_weights()[:3])
        h = X @ k + b  # constant for the loss: the gradient stops before it
        expected = 2.0 * h.T @ (h @ w - Y) / Y.size  # d mean((h w - y)^2) / dw
        np.testing.assert_allclose(used, expected, rtol=1e-4, atol=1e-6)  # float32 model vs float64 NumPy


def test_a_recurrent_layers_weights_are_all_reached_and_right():
    # On JAX the LSTM runs as a loop (lax.scan): whether a weight is reached is read from the loop as a
    # whole, never from one pass of its body. Truth: the framework's own autodiff written out by hand.
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((5, 2)), keras.layers.LSTM(3), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    x = RNG.normal(size=(4, 5, 2)).astype("float32")
    y = RNG.normal(size=(4, 2)).astype("float32")
    result = gm.weight_gradients(model, x, y)
    expected = hand_mse_gradients(model, x, y)
    assert len(result.arrays()) == len(expected) == 5 and not result.disconnected
    for got, want in zip(result.arrays(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)  # two float32 autodiffs
