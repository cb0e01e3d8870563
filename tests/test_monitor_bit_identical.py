"""Training with the monitor is bit-identical to training without it (every variable, byte for byte)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import mlp
from monitor_helpers import conv_bn_dropout, fit_bytes, sample_data

from gradmagic.core.monitor.callback import GradientMonitor


def test_training_is_bit_identical_with_and_without_monitor():
    def train(callbacks):
        keras.utils.set_random_seed(7)
        model = mlp((3, 8, 8, 2))
        model.compile(optimizer="adam", loss="mse")
        x, y = sample_data(64)
        history = model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=callbacks)
        return [w.tobytes() for w in model.get_weights()], history.history["loss"]

    plain = train([])
    monitored = train([GradientMonitor(print_every=None, read_every=5)])
    assert monitored[0] == plain[0]
    assert monitored[1] == plain[1]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_conv_batchnorm_dropout_training_is_bit_identical(momentum):
    # With SGD, a BatchNorm gamma's gradient (a * rsqrt(var)) has one consumer, the update
    # lr * g, which TensorFlow's graph optimizer reassociates; reading g must not prevent it.
    def run(callbacks):
        return fit_bytes(conv_bn_dropout, keras.optimizers.SGD(0.1, momentum=momentum), callbacks, (8, 8, 3), 12, 2)

    plain, monitored = run([]), run([GradientMonitor(read_every=2)])
    assert len(monitored) == len(plain)
    assert [p[0] for p, m in zip(plain, monitored, strict=True) if p[1] != m[1]] == []


def _mobilenet():
    return keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=3)


def test_mobilenet_v2_training_is_bit_identical():
    def run(callbacks):
        return fit_bytes(_mobilenet, keras.optimizers.SGD(0.01), callbacks, (32, 32, 3), 12)  # 3 steps

    plain, monitored = run([]), run([GradientMonitor()])
    assert len(monitored) == len(plain)
    assert [p[0] for p, m in zip(plain, monitored, strict=True) if p[1] != m[1]] == []


def _attention():
    inputs = keras.Input((5, 6))
    attended = keras.layers.MultiHeadAttention(2, 3)(inputs, inputs)
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization()(attended + inputs))
    return keras.Model(inputs, keras.layers.Dense(3)(pooled))


@pytest.mark.parametrize("stats", ["norm", "full"])
def test_clipped_update_under_xla_is_bit_identical(stats):
    # clipnorm reduces each gradient inside the update; statistics read after that update
    # once changed how XLA compiled it (an ulp in the attention kernels after 8 steps).
    def run(callbacks):
        keras.utils.set_random_seed(0)
        model = _attention()
        model.compile(optimizer=keras.optimizers.SGD(0.1, clipnorm=0.1), loss="mse", jit_compile=True)
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(16, 5, 6)).astype("float32"), rng.normal(size=(16, 3)).astype("float32")
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
        return [(v.path, v.numpy().tobytes()) for v in [*model.variables, *model.optimizer.variables]]

    plain, monitored = run([]), run([GradientMonitor(stats=stats)])
    assert [p[0] for p, m in zip(plain, monitored, strict=True) if p[1] != m[1]] == []


@pytest.mark.parametrize("action", ["stop", "raise"])
def test_keeping_the_bad_step_leaves_training_bit_identical(action):
    def run(callbacks):
        return fit_bytes(conv_bn_dropout, keras.optimizers.SGD(0.1), callbacks, (8, 8, 3), 12, 2)

    plain, monitored = run([]), run([GradientMonitor(on_anomaly=action)])
    assert [p[0] for p, m in zip(plain, monitored, strict=True) if p[1] != m[1]] == []
