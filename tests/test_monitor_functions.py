"""The plain and recording train functions: swapped per fit, traced once, never left wrapped."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp
from monitor_helpers import sample_data

from gradmagic.core.monitor.callback import GradientMonitor, MonitorArgumentError


def test_apply_restored_after_fit_and_when_fit_raises():
    model, (x, y) = mlp(), sample_data()
    optimizer = model.optimizer
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[GradientMonitor()])
    assert "apply" not in vars(optimizer)

    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise RuntimeError("boom")

    monitor = GradientMonitor()
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor, Boom()])
    assert "apply" not in vars(optimizer)
    # The next fit without the monitor must not keep recording into its buffer.
    recorded = int(monitor._functions.buffer.count.numpy())
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(monitor._functions.buffer.count.numpy()) == recorded


def test_two_monitors_in_one_fit_fail_before_training():
    model, (x, y) = mlp(), sample_data()
    before = model.get_weights()
    first, second = GradientMonitor(), GradientMonitor()
    with pytest.raises(MonitorArgumentError, match="two GradientMonitor"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[first, second])
    for got, want in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert getattr(model.train_function, "gradmagic_functions", None) is None
    assert "apply" not in vars(model.optimizer)
    # Each monitor alone still records every step of its own fit (32 rows / 8 = 4 batches).
    for monitor in (first, second):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
        assert len(monitor.to_dict()["step"]) == 4 * len(model.trainable_variables)


def test_fit_after_a_keyboard_interrupt_records_with_another_monitor():
    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise KeyboardInterrupt

    model, (x, y) = mlp(), sample_data()
    interrupted = GradientMonitor()
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[interrupted, Interrupt()])
    recorded = int(interrupted._functions.buffer.count.numpy())
    assert recorded == 2 and "apply" not in vars(model.optimizer)
    monitor = GradientMonitor()  # not taken for a second monitor of the interrupted fit
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    # 2 steps before the interrupt, then 4: the new monitor records steps 2..5, the old one nothing more.
    assert sorted(set(monitor.to_dict()["step"])) == [2, 3, 4, 5]
    assert int(interrupted._functions.buffer.count.numpy()) == recorded


class CountingMLP(keras.Sequential):
    """An MLP that counts how often its train step is traced (Python runs once per trace)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.traces = 0

    def train_step(self, data):
        self.traces += 1
        return super().train_step(data)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_repeated_fits_reuse_the_traced_train_functions():
    model = CountingMLP([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    x, y = sample_data(32)
    monitor = GradientMonitor()
    records = _Records()
    tf.get_logger().addHandler(records)
    try:
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
        traced = model.traces
        assert traced >= 1
        for _ in range(6):  # more fits than TensorFlow's retracing-warning threshold (5)
            model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
        assert model.traces == traced
        assert len(monitor.to_dict()["step"]) == 7 * 4 * len(model.trainable_variables)
        assert monitor.to_dict()["step"][-1] == 7 * 4 - 1
        # Without the monitor: the plain function, traced once (it never ran before), then reused.
        recorded = int(monitor._functions.buffer.count.numpy())
        for _ in range(3):
            model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        assert model.traces == traced + 1 and int(monitor._functions.buffer.count.numpy()) == recorded
        # And back with the monitor: still no new trace.
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
        assert model.traces == traced + 1 and int(monitor._functions.buffer.count.numpy()) == recorded + 4
    finally:
        tf.get_logger().removeHandler(records)
    assert not [m for m in records.messages if "retracing" in m]


def test_recompile_gets_a_new_recording_function():
    model, (x, y) = mlp(), sample_data()
    monitor = GradientMonitor()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    # The new optimizer (learning rate 0) is the one applied, and the monitor still records.
    for got, want in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert len(monitor.to_dict()["step"]) == 4 * len(model.trainable_variables)
    # The new optimizer counts from 0 again (2 steps); the recorded steps go on from the first fit's.
    assert int(model.optimizer.iterations.numpy()) == 2
    np.testing.assert_array_equal(monitor.recorded.steps, [0, 1, 2, 3])


def test_plain_function_is_the_train_function_keras_made():
    from gradmagic.core.monitor.functions import plain_function

    model, (x, y) = mlp(), sample_data(16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    made_by_keras = model.train_function
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append((model.train_function, plain_function(model)))

    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[GradientMonitor(), Probe()])
    running, plain = seen[0]
    assert running is not made_by_keras and getattr(running, "gradmagic_functions", None) is not None
    assert plain is made_by_keras
    assert model.train_function is made_by_keras and plain_function(model) is made_by_keras
