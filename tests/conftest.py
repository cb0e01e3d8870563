"""Shared fixtures: tiny models with known structure, and a state fingerprint."""

from __future__ import annotations

import importlib.util
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


@pytest.fixture
def require_framework():
    """``require(module)``: skip the test unless ``module`` (jax, torch, tensorflow) is installed.

    Under ``CI`` it fails instead: CI installs every framework (``python3 dev.py test``), so a missing
    one there is a broken install, not a reason to test less.
    """

    def require(module: str) -> None:
        if importlib.util.find_spec(module) is None:
            message = f"{module} is not installed (python3 dev.py test installs it)"
            if os.environ.get("CI"):
                pytest.fail(f"{message}; CI runs every Keras backend", pytrace=False)
            pytest.skip(message)

    return require


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


def mse_tape(model: keras.Model, x, y, sample_weight=None) -> tuple[float, list[np.ndarray]]:
    """The mean squared error and its weight gradients from a hand-written eager tape (the truth)."""
    import tensorflow as tf  # here, not at the top: this conftest also serves tests/every_backend on JAX and PyTorch

    with tf.GradientTape() as tape:
        per_sample = tf.reduce_mean(tf.square(model(x) - y), axis=-1)
        if sample_weight is not None:
            per_sample = per_sample * sample_weight
        loss = tf.reduce_mean(per_sample)
    return float(loss), [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]


def assert_matches_tape(result, expected: tuple[float, list[np.ndarray]]) -> None:
    """A weight-gradient result against :func:`mse_tape`'s truth."""
    # gradmagic's compiled graph against an eager tape: tolerances, not exact equality.
    np.testing.assert_allclose(result.loss, expected[0], rtol=1e-5)
    for got, want in zip(result.arrays(), expected[1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class Opaque(keras.layers.Layer):
    """A custom layer holding a Python function: nothing can rebuild it, so no float64 copy is possible."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def call(self, t):
        return self.fn(t)


#: Six samples of three features, for the two-output model below.
X6 = np.random.default_rng(7).normal(size=(6, 3)).astype("float32")


def two_outputs(dict_outputs: bool = False) -> keras.Model:
    """A functional model with two outputs whose creation order differs from their names' order."""
    inputs = keras.Input((3,), name="inp")
    second = keras.layers.Dense(2, name="second")(inputs)  # created first, named later in the alphabet
    first = keras.layers.Dense(1, name="first")(inputs)
    outputs = {"z": second, "a": first} if dict_outputs else [second, first]
    return keras.Model(inputs, outputs)


def numpy_mse(y_true, y_pred, weight=None) -> float:
    """Keras's mean squared error, optionally weighted per sample, in NumPy."""
    per_sample = np.mean((y_pred - y_true) ** 2, axis=-1)
    return float(np.mean(per_sample if weight is None else per_sample * weight))


def token_model() -> tuple[keras.Model, np.ndarray]:
    """A small model reading token ids (vocabulary 12) through an Embedding named "embed", and two rows of ids."""
    keras.utils.set_random_seed(7)
    ids = keras.Input((5,), dtype="int32")
    hidden = keras.layers.Dense(3, activation="tanh")(keras.layers.Embedding(12, 4, name="embed")(ids))
    model = keras.Model(ids, keras.layers.Dense(2)(keras.layers.Flatten()(hidden)), name="tokens")
    x = np.array([[1, 2, 3, 4, 5], [0, 11, 8, 7, 6]], "int32")
    return model, x
