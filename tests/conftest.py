"""Shared fixtures: tiny models with known structure, and a state fingerprint."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture
def float64():
    """Run the test with Keras's default float type set to float64."""
    previous, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(previous)
    keras.config.set_dtype_policy(policy)


def fingerprint(model: keras.Model) -> dict[str, bytes]:
    """Every model, metric and optimizer variable as raw bytes, keyed by path."""
    variables = list(model.variables) + list(model.metrics_variables)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    return {v.path: np.asarray(v.numpy()).tobytes() for v in variables}


def assert_unchanged(model: keras.Model, before: dict[str, bytes]) -> None:
    after = fingerprint(model)
    assert list(after) == list(before), "variables were created or removed"
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"variables changed: {changed}"


def mlp(widths=(3, 4, 2), activation="tanh", name="mlp") -> keras.Sequential:
    """A small Sequential MLP with an Input, compiled with SGD + MSE."""
    layers = [keras.Input((widths[0],))]
    layers += [keras.layers.Dense(w, activation=activation) for w in widths[1:-1]]
    layers += [keras.layers.Dense(widths[-1])]
    model = keras.Sequential(layers, name=name)
    model.compile(optimizer="sgd", loss="mse")
    return model
