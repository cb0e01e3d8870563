"""The float64 copy of a model and of its loss: the same function as a NumPy float64 forward pass."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradmagic.core.backends.tensorflow import lambda_output_shape
from gradmagic.core.diagnose.float64 import (
    WeightedLoss,
    as_float64,
    float64_default,
    float64_loss,
    float64_twin,
    loss_weights,
)
from gradmagic.core.questions.inputs import model_spec

X = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")


def _twin(model: keras.Model, x=X) -> keras.Model:
    with float64_default():
        return float64_twin(model, model_spec(model).input_structure, as_float64(x))


def _residual() -> keras.Model:
    inputs = keras.Input((3,), name="inp")
    h = keras.layers.Dense(3, activation="tanh", name="hidden")(inputs)
    h = keras.layers.Dense(3, activation="tanh", name="hidden_2")(inputs + h)  # raw ops between layers
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(h * 0.5 + inputs))


def test_a_model_with_raw_residual_ops_is_copied_into_the_same_float64_function():
    model = _residual()
    twin = _twin(model)
    w1, b1, w2, b2, w3, b3 = (w.astype("float64") for w in model.get_weights())
    x = X.astype("float64")
    h = np.tanh(x @ w1 + b1)
    h = np.tanh((x + h) @ w2 + b2)
    expected = (h * 0.5 + x) @ w3 + b3  # the model's forward pass in NumPy, in float64
    got = twin(x)
    assert got.dtype == tf.float64 and all(v.dtype == "float64" for v in twin.weights)
    # Same float64 arithmetic, possibly summed in another order: agreement to round-off, not bits.
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-14)
    # The float32 model is the same function, to float32 precision.
    np.testing.assert_allclose(model(X).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert keras.config.floatx() == "float32" and keras.config.dtype_policy().name == "float32"


def test_nested_models_masking_and_a_lambda_with_a_shape_function_are_copied():
    def same_shape(input_shape):
        return input_shape

    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, name="inner")], name="inner_model")
    model = keras.Sequential(
        [
            keras.Input((3,)),
            inner,
            keras.layers.Lambda(lambda t: tf.sin(t) * 2.0, output_shape=same_shape, name="lam"),
            keras.layers.Masking(mask_value=0.0),  # last: no downstream layer to warn that it drops the mask
        ]
    )
    twin = _twin(model)
    w, b = (v.astype("float64") for v in model.get_weights())
    x = X.astype("float64")
    np.testing.assert_allclose(twin(x).numpy(), np.sin(x @ w + b) * 2.0, rtol=1e-12, atol=1e-14)
    assert twin.get_layer("inner_model").get_layer("inner").compute_dtype == "float64"
    assert lambda_output_shape(twin.get_layer("lam")) is same_shape  # the function itself, not its serialization


class _Pinned(keras.layers.Layer):
    """A custom layer that hard-codes float32 and takes no **kwargs: no float64 copy of it exists."""

    def __init__(self, scale):
        super().__init__(dtype="float32")
        self.scale = scale

    def call(self, t):
        return t * self.scale


def test_a_layer_pinned_to_float32_is_refused_with_its_name():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3), _Pinned(2.0)])
    with pytest.raises(ValueError, match="still compute in lower precision") as info:
        _twin(model)
    assert model.layers[-1].name in str(info.value)
    assert keras.config.floatx() == "float32"  # the global policy is restored after a failure too


def test_the_float64_loss_applies_the_compiled_loss_weights():
    inputs = keras.Input((3,))
    model = keras.Model(
        inputs, {"a": keras.layers.Dense(2, name="a")(inputs), "b": keras.layers.Dense(1, name="b")(inputs)}
    )
    model.compile(loss={"a": "mse", "b": "mae"}, loss_weights={"a": 2.0, "b": 0.5})
    weights = loss_weights(model)
    assert weights == {"a": 2.0, "b": 0.5}
    losses = float64_loss({"a": "mse", "b": "mae"}, weights)
    assert isinstance(losses["a"], WeightedLoss) and isinstance(losses["b"], WeightedLoss)
    rng = np.random.default_rng(1)
    y_true, y_pred = rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    # By hand: 2 * mean squared error and 0.5 * mean absolute error, in float64.
    mse = float(losses["a"](y_true, y_pred))
    mae = float(losses["b"](y_true[:, :1], y_pred[:, :1]))
    assert mse == pytest.approx(2.0 * np.mean((y_true - y_pred) ** 2), rel=1e-12)
    assert mae == pytest.approx(0.5 * np.mean(np.abs(y_true[:, :1] - y_pred[:, :1])), rel=1e-12)
    assert losses["a"].loss.dtype == "float64"
    assert float64_loss("mse", 1.0).dtype == "float64" and not isinstance(float64_loss("mse", 1.0), WeightedLoss)


def test_a_model_never_compiled_has_no_loss_weights_and_inputs_become_float64_where_float():
    assert loss_weights(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])) is None
    ids, floats = np.array([[1, 2]]), np.ones((1, 2), "float32")
    converted = as_float64({"ids": ids, "x": floats, "none": None})
    assert converted["ids"].dtype == ids.dtype and converted["none"] is None
    assert converted["x"].dtype == np.float64 and np.array_equal(converted["x"], floats)
