"""The diagnosis on real architectures, built small: no false alarm on right gradients, wrong ones caught.

Each model is a ``keras.applications`` network (weights=None, 32 px, batch 2) or
a few blocks built the way those networks and the keras.io examples build them
(a residual ResNetV2 stack, a squeeze-excite MBConv, a ConvNeXt block with
layer scale and a grouped convolution, a Transformer block, masked RNNs). The
truth each test checks against is independent of gradmagic: a hand-written
``tf.GradientTape``, or a deliberately wrong ``tf.custom_gradient`` whose error
is known.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_unchanged, fingerprint

import gradmagic as gm

RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(0.0, 1.0, (2, 32, 32, 3)).astype("float32")
MORE_IMAGES = RNG.uniform(0.0, 1.0, (32, 32, 32, 3)).astype("float32")  # to set BatchNormalization statistics
LABELS = np.array([1, 3])

# --- a layer with a hand-written gradient, right or wrong -----------------------------------------------------------


def _swish_grad(t: tf.Tensor, kind: str) -> tf.Tensor:
    """d(t * sigmoid(t))/dt, or one of the classic slips in writing it."""
    s = tf.sigmoid(t)
    true = s + t * s * (1.0 - s)
    return {"right": true, "factor": 3.0 * true, "sign": -true, "missing": s}[kind]


@keras.saving.register_keras_serializable(package="gradmagic_tests")
class HandSwish(keras.layers.Layer):
    """``t * sigmoid(t)`` with a hand-written gradient: ``kind="right"``, or a wrong one.

    ``"stop"`` computes the same function with ``tf.stop_gradient`` on the
    sigmoid, which hides its part of the derivative from autodiff.
    """

    def __init__(self, kind: str = "right", **kwargs):
        super().__init__(**kwargs)
        self.kind = kind

    def call(self, t):
        if self.kind == "stop":
            return t * tf.stop_gradient(tf.sigmoid(t))

        @tf.custom_gradient
        def swish(u):
            return u * tf.sigmoid(u), lambda upstream: upstream * _swish_grad(u, self.kind)

        return swish(t)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind}


def _with_layer_after(model: keras.Model, name: str, kind: str) -> keras.Model:
    """The same architecture with a :class:`HandSwish` inserted right after layer ``name``."""

    def call(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        return HandSwish(kind, name="hand_swish")(out) if layer.name == name else out

    return keras.models.clone_model(model, call_function=call)


def _calibrated(model: keras.Model, x) -> keras.Model:
    """Set every BatchNormalization's moving statistics to those of x, as training leaves them.

    At random init the moving statistics (mean 0, variance 1) do not match the
    activations: MobileNetV2's shrink until every ReLU6 sits at exactly 0, where
    no derivative exists and a wrong gradient has nowhere to show.
    """
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0  # one training-mode pass writes the batch statistics
    model(x, training=True)
    for layer, momentum in zip(norms, momenta, strict=True):
        layer.momentum = momentum
    return model


def _tape_gradients(model, x, y, loss):
    with tf.GradientTape() as tape:
        value = loss(y, model(x, training=False))
    return [np.asarray(g) for g in tape.gradient(value, model.trainable_weights)]


def _assert_no_false_alarm(model, x, y, **kwargs):
    before = fingerprint(model)
    check = gm.check_gradients(model, x, y, verbose=False, **kwargs)
    assert check.passed, check
    assert check.dtype == "float64", check.notes
    assert_unchanged(model, before)
    return check


def _assert_caught(model, x, y, **kwargs):
    check = gm.check_gradients(model, x, y, verbose=False, **kwargs)
    index = [layer.name for layer in model.layers].index("hand_swish")
    assert not check.passed, check
    assert f"{index} 'hand_swish'" in check.suspects, check
    # Rows downstream of the wrong layer do not see it.
    assert all(row.passed for row in check.rows if row.index is not None and row.index > index), check
    return check


# --- keras.applications, small -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobilenet():
    keras.utils.set_random_seed(1)
    model = keras.applications.MobileNetV2((32, 32, 3), alpha=0.35, weights=None, classes=5)
    model.compile(loss="sparse_categorical_crossentropy")
    return model


def test_mobilenet_v2_weight_gradients_match_a_tape_and_the_check_passes(mobilenet):
    got = gm.weight_gradients(mobilenet, IMAGES, LABELS).arrays()
    want = _tape_gradients(mobilenet, IMAGES, LABELS, keras.losses.SparseCategoricalCrossentropy())
    for g, w in zip(got, want, strict=True):
        # Two different compiled graphs of the same float32 math: equal to round-off only.
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * np.abs(w).max())
    check = _assert_no_false_alarm(mobilenet, IMAGES, LABELS, max_directions=1)
    # Random-init MobileNetV2 is full of ReLU6 units at exactly 0: those rows are not failures.
    assert all(row.status in ("ok", "not smooth here") for row in check.rows)


def test_mobilenet_v2_with_a_wrong_gradient_inside_is_caught(mobilenet):
    keras.utils.set_random_seed(2)
    wrong = _calibrated(_with_layer_after(mobilenet, "block_6_project_BN", "factor"), MORE_IMAGES)
    wrong.compile(loss="sparse_categorical_crossentropy")
    _assert_caught(wrong, IMAGES, LABELS, max_directions=1)
