"""Weights the loss reaches only through round, floor or ceil are disconnected (``None``) on every backend.

TensorFlow registers no gradient for these ops, so its tape gives ``None``;
JAX and PyTorch pass back zeros, which would read as a genuinely zero gradient.
The weights after the cut get their analytic gradient.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import gradmagic as gm

W1 = np.array([[0.7, -1.3], [2.1, 0.4], [-0.6, 1.9]], dtype="float32")
W2 = np.array([[1.5], [-0.5]], dtype="float32")
X = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [2.0, 0.0, 1.0], [-1.0, 1.0, 1.0]], dtype="float32")
Y = np.array([[1.0], [0.0], [-2.0], [0.5]], dtype="float32")
CUTS = {"round": np.round, "floor": np.floor, "ceil": np.ceil}


def _model(cut: str) -> keras.Model:
    first = keras.layers.Dense(2, use_bias=False, name="first")
    second = keras.layers.Dense(1, use_bias=False, name="second")
    op = getattr(keras.ops, cut)
    model = keras.Sequential([keras.Input((3,)), first, keras.layers.Lambda(lambda t: op(t), name=cut), second])
    first.kernel.assign(W1)
    second.kernel.assign(W2)
    model.compile(optimizer="sgd", loss="mse")
    return model


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_weights_before_a_piecewise_constant_op_are_disconnected(cut):
    model = _model(cut)
    h = CUTS[cut](X.astype("float64") @ W1)
    expected = 2.0 / len(X) * h.T @ (h @ W2 - Y)  # dMSE/dW2 with the cut values as inputs
    for _ in range(3):  # the first call and repeats (traced where the backend traces)
        first, second = gm.weight_gradients(model, X, Y).arrays()
        assert first is None
        np.testing.assert_allclose(second, expected, rtol=1e-5, atol=1e-6)  # float32 against float64
