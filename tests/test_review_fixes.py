"""Regressions found in review: output alignment, mixed precision, caching, Embedding, lambda losses."""

from __future__ import annotations

import keras
import numpy as np

import gradmagic as gm

RNG = np.random.default_rng(7)
X = RNG.normal(size=(6, 3)).astype("float32")


def test_nested_model_gradient_check_is_honest_about_precision():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="tanh", name="inner_dense")])
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inner(inputs)))
    model.compile(loss="mse")
    check = gm.check_gradients(model, X, np.zeros((6, 1), "float32"))
    # The nested model is copied too: the whole copy computes in float64, so the agreement is
    # far below what float32 differences could show (about 1e-3 relative).
    assert check.passed and check.dtype == "float64" and check.notes == [], repr(check)
    assert check.max_rel_error < 1e-7
