"""A call that fails while building an unbuilt model leaves it unbuilt, so the next correct call works."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_matches_tape, mse_tape

import gradmagic as gm
from gradmagic.errors import GradmagicError, ModelBuildError


def test_unbuilt_sequential_given_1d_x_stays_unbuilt_and_the_fix_works():
    model = keras.Sequential([keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    model.compile(loss="mse")
    with pytest.raises(
        ModelBuildError, match=r"Received: x of shape \(3,\).*not built.*Fix: give x in that shape"
    ) as info:
        gm.weight_gradients(model, np.ones(3, "float32"), np.zeros(2, "float32"))
    assert "Received" in str(info.value) or "x of shape (3,)" in str(info.value)
    assert not model.built and len(model.layers) == 2 and model.weights == []
    # What the message says to do works: x in the shape the model takes.
    x, y = np.ones((1, 3), "float32"), np.zeros((1, 2), "float32")
    result = gm.weight_gradients(model, x, y)
    assert_matches_tape(result, mse_tape(model, x, y))


class TwoStage(keras.Model):
    """The first Dense builds from x before the reshape fails on a bad feature count."""

    def __init__(self):
        super().__init__()
        self.first = keras.layers.Dense(4)
        self.second = keras.layers.Dense(1)

    def call(self, x):
        hidden = self.first(x)
        pairs = keras.ops.reshape(x, (-1, 3, 2))  # needs 6 features per sample
        return self.second(hidden) + keras.ops.sum(pairs, axis=(1, 2))[:, None]


def test_a_layer_built_before_the_failure_is_unbuilt_again():
    model = TwoStage()
    with pytest.raises(GradmagicError):
        gm.input_gradients(model, np.ones((2, 5), "float32"))
    assert not model.first.built and model.first.weights == [] and model.weights == []
    x = np.linspace(-1, 1, 12, dtype="float32").reshape(2, 6)
    j = gm.input_gradients(model, x, output=0)
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        out = model(xt)[:, 0]
    np.testing.assert_allclose(j.array, tape.gradient(out, xt).numpy(), rtol=1e-5, atol=1e-6)
