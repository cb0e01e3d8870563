"""A custom layer's or model's code reading a module global: rebinding the global gives a fresh answer.

A traced question (``tf.function``, ``jax.jit``, PyTorch's traced graph) bakes
the value a layer's ``call`` reads from a module global; the question's key
must see it change, as it sees a user loss's globals. Each question is asked
three times before the change (so the repeat is traced, and on PyTorch runs
its graph) and three times after it. The truth is the analytic gradient of
y = FACTOR * x @ W under mean squared error.
"""

from __future__ import annotations

import sys

import keras
import numpy as np
import pytest

import gradmagic as gm

FACTOR = 2.0
OFFSET = {"value": 0.0}
W = np.array([[0.5], [-1.0], [2.0]], dtype="float32")
X = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [2.0, 0.0, 1.0], [-1.0, 1.0, 1.0]], dtype="float32")
Y = np.array([[1.0], [0.0], [-2.0], [0.5]], dtype="float32")
THIS = sys.modules[__name__]


def _scale(t):
    return t * FACTOR


class Scale(keras.layers.Layer):
    """Multiplies by the module's FACTOR (through a module function) and adds its OFFSET['value']."""

    def call(self, inputs):
        return _scale(inputs) + OFFSET["value"]

    def compute_output_shape(self, input_shape):
        return input_shape


class ScaledModel(keras.Model):
    """x @ W, then times the module's FACTOR, in the model's own ``call``."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1, use_bias=False)

    def call(self, inputs):
        return self.dense(inputs) * FACTOR


def _layered() -> keras.Model:
    dense = keras.layers.Dense(1, use_bias=False)
    model = keras.Sequential([keras.Input((3,)), Scale(), dense])
    dense.kernel.assign(W)
    model.compile(optimizer="sgd", loss="mse")
    return model


def _subclassed() -> keras.Model:
    model = ScaledModel()
    model(X)
    model.dense.kernel.assign(W)
    model.compile(optimizer="sgd", loss="mse")
    return model


def _dloss_dw(factor: float, offset: float = 0.0, scaled_input: bool = True) -> np.ndarray:
    """dMSE/dW of y = (factor * x + offset) @ W (``scaled_input``), or of y = factor * (x @ W)."""
    x = X.astype("float64")
    if scaled_input:
        z = factor * x + offset
        return 2.0 / len(x) * z.T @ (z @ W - Y)
    return 2.0 / len(x) * factor * x.T @ (factor * x @ W - Y)


def _weights(model: keras.Model) -> np.ndarray:
    return gm.weight_gradients(model, X, Y).arrays()[0]


@pytest.mark.parametrize("build, scaled_input", [(_layered, True), (_subclassed, False)], ids=["layer", "model"])
def test_rebinding_a_global_the_class_code_reads_gives_a_fresh_weight_gradient(build, scaled_input, monkeypatch):
    model = build()
    for _ in range(3):
        # float32 against the float64 analytic gradient.
        np.testing.assert_allclose(_weights(model), _dloss_dw(2.0, scaled_input=scaled_input), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(THIS, "FACTOR", 5.0)
    for _ in range(3):
        np.testing.assert_allclose(_weights(model), _dloss_dw(5.0, scaled_input=scaled_input), rtol=1e-5, atol=1e-6)


def test_changing_a_global_dict_in_place_gives_a_fresh_gradient(monkeypatch):
    model = _layered()
    for _ in range(3):
        np.testing.assert_allclose(_weights(model), _dloss_dw(2.0), rtol=1e-5, atol=1e-6)
    monkeypatch.setitem(OFFSET, "value", 1.5)
    for _ in range(3):
        np.testing.assert_allclose(_weights(model), _dloss_dw(2.0, 1.5), rtol=1e-5, atol=1e-6)


def test_rebinding_a_global_gives_fresh_input_and_output_gradients(monkeypatch):
    model = _layered()
    for factor in (2.0, 5.0):
        monkeypatch.setattr(THIS, "FACTOR", factor)
        for _ in range(3):
            jac = gm.input_gradients(model, X).array.reshape(len(X), 3)
            np.testing.assert_allclose(jac, np.tile(factor * W.T, (len(X), 1)), rtol=1e-6)
            # dMSE/d(output of the Scale layer) = 2/n (z @ W - y) W^T, z = factor * x.
            out = gm.output_gradients(model, X, Y, layer=0).array
            z = factor * X.astype("float64")
            np.testing.assert_allclose(out, 2.0 / len(X) * (z @ W - Y) @ W.T, rtol=1e-5, atol=1e-6)
