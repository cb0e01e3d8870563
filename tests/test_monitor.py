"""GradientMonitor: recorded values against independent truths, side effects, anomalies."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp

from gradmagic.core.monitor.anomaly import GradientAnomalyError, NormTracker
from gradmagic.core.monitor.callback import GradientMonitor, MonitorArgumentError
from gradmagic.core.monitor.stats import finish_stats, stats_function, step_stats
from gradmagic.errors import GradmagicError


def _data(n=32, d_in=3, d_out=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d_in)).astype("float32"), rng.normal(size=(n, d_out)).astype("float32")


class _WeightsBefore(keras.callbacks.Callback):
    """Keep the trainable weights before every batch (the truth's starting point)."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_begin(self, batch, logs=None):
        self.weights.append([v.numpy().copy() for v in self.model.trainable_variables])


def _tape_gradients(model, weights, x, y):
    """Gradients of the batch MSE at `weights`, on a clone: no fit, no optimizer."""
    clone = keras.models.clone_model(model)
    clone.set_weights(weights)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, clone(x, training=True))
    return [g.numpy() for g in tape.gradient(loss, clone.trainable_variables)]


@pytest.mark.parametrize("stats", ["norm", "full"])
@pytest.mark.parametrize(("jit", "optimizer"), [(False, "sgd"), (True, "sgd"), (False, "adam")])
def test_recorded_stats_equal_independent_gradients(jit, optimizer, stats):
    # Adam squares the gradient itself; the monitor then reduces that g**2 instead.
    model = mlp((3, 5, 2))
    optimizer = keras.optimizers.SGD(0.1) if optimizer == "sgd" else keras.optimizers.Adam(0.01)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit)
    x, y = _data()
    before, monitor = _WeightsBefore(), GradientMonitor(read_every=3, stats=stats)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[before, monitor])
    cols = monitor.to_dict()
    n_w = len(model.trainable_variables)
    assert len(cols["step"]) == 8 * n_w and len(set(map(len, cols.values()))) == 1
    for k, weights in enumerate(before.weights):
        batch = k % 4
        truth = _tape_gradients(model, weights, x[8 * batch : 8 * batch + 8], y[8 * batch : 8 * batch + 8])
        # stats="norm" measures everything at the batches where it reads (every 3rd of an epoch).
        full = stats == "full" or batch == 2
        for i, g in enumerate(truth):
            row = k * n_w + i
            assert (cols["step"][row], cols["epoch"][row], cols["batch"][row]) == (k, k // 4, batch)
            assert cols["weight"][row] == model.trainable_variables[i].path
            # Tolerances: the tape's graph and the train step's are different graphs.
            np.testing.assert_allclose(cols["norm"][row], np.linalg.norm(g), rtol=1e-5)
            assert cols["full"][row] is full
            if full:
                np.testing.assert_allclose(cols["max_abs"][row], np.abs(g).max(), rtol=1e-5)
                np.testing.assert_allclose(cols["mean"][row], g.mean(), rtol=1e-4, atol=1e-7)
            else:
                assert cols["max_abs"][row] == 0.0 and cols["mean"][row] == 0.0
            assert cols["nan"][row] == 0 and cols["inf"][row] == 0


def test_default_norms_equal_a_tape_on_a_batchnorm_model():
    # SGD on BatchNorm: gamma gradients are read from a replayed copy (monitor_replay).
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 6, 6, 2)).astype("float32"), rng.integers(0, 3, 12)
    before, monitor = _WeightsBefore(), GradientMonitor()
    assert monitor.stats == "norm"
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[before, monitor])
    cols = monitor.to_dict()
    n_w = len(model.trainable_variables)
    assert len(cols["norm"]) == 3 * n_w and not any(cols["full"][: 2 * n_w])
    for k, weights in enumerate(before.weights):
        clone = keras.models.clone_model(model)
        for variable, value in zip(clone.trainable_variables, weights, strict=True):
            variable.assign(value)
        with tf.GradientTape() as tape:
            loss = keras.losses.SparseCategoricalCrossentropy()(
                y[4 * k : 4 * k + 4], clone(x[4 * k : 4 * k + 4], training=True)
            )
        for i, g in enumerate(tape.gradient(loss, clone.trainable_variables)):
            # A different graph than the train step's: a tolerance, not equality. The conv bias
            # feeding BatchNorm has a zero gradient in exact arithmetic (round-off ~1e-7): atol.
            np.testing.assert_allclose(cols["norm"][k * n_w + i], np.linalg.norm(g.numpy()), rtol=1e-5, atol=1e-6)


def test_training_is_bit_identical_with_and_without_monitor():
    def train(callbacks):
        keras.utils.set_random_seed(7)
        model = mlp((3, 8, 8, 2))
        model.compile(optimizer="adam", loss="mse")
        x, y = _data(64)
        history = model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=callbacks)
        return [w.tobytes() for w in model.get_weights()], history.history["loss"]

    plain = train([])
    monitored = train([GradientMonitor(print_every=None, read_every=5)])
    assert monitored[0] == plain[0]
    assert monitored[1] == plain[1]


def _conv_bn_dropout():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


def _mobilenet():
    return keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=3)


def _fit_bytes(build, optimizer, callbacks, shape, n, epochs=1):
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, *shape)).astype("float32"), rng.integers(0, 3, n)
    model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    # Every variable: weights, BatchNorm statistics, optimizer slots, seed generator states.
    return [(v.name, v.numpy().tobytes()) for v in [*model.variables, *model.optimizer.variables]]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_conv_batchnorm_dropout_training_is_bit_identical(momentum):
    # With SGD, a BatchNorm gamma's gradient (a * rsqrt(var)) has one consumer, the update
    # lr * g, which TensorFlow's graph optimizer reassociates; reading g must not prevent it.
    def run(callbacks):
        return _fit_bytes(_conv_bn_dropout, keras.optimizers.SGD(0.1, momentum=momentum), callbacks, (8, 8, 3), 12, 2)

    plain, monitored = run([]), run([GradientMonitor(read_every=2)])
    assert len(monitored) == len(plain)
    assert [p[0] for p, m in zip(plain, monitored, strict=True) if p[1] != m[1]] == []


def test_mobilenet_v2_training_is_bit_identical():
    def run(callbacks):
        return _fit_bytes(_mobilenet, keras.optimizers.SGD(0.01), callbacks, (32, 32, 3), 12)  # 3 steps

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


def test_layers_and_summary():
    model = mlp((3, 4, 2))
    x, y = _data()
    monitor = GradientMonitor()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    cols = monitor.to_dict()
    assert cols["layer"][:4] == [model.layers[0].name] * 2 + [model.layers[1].name] * 2
    assert cols["layer_index"][:4] == [0, 0, 1, 1]
    assert monitor.history[0]["weight"] == model.trainable_variables[0].path
    summary = monitor.summary()
    assert model.layers[1].name in repr(summary) and "<table" in summary._repr_html_()


def test_to_dataframe():
    pd = pytest.importorskip("pandas")
    model, (x, y) = mlp(), _data()
    monitor = GradientMonitor()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    frame = monitor.to_dataframe()
    assert isinstance(frame, pd.DataFrame) and len(frame) == 2 * 4


def test_print_mode_one_line_per_layer_per_batch(capsys):
    model, (x, y) = mlp((3, 4, 2)), _data(16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[GradientMonitor(print_every=1)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * 2  # 2 batches x 2 layers
    first = lines[0].split()
    assert first[:5] == ["epoch", "1", "batch", "1", "|"]
    assert first[5] == model.layers[0].name and first[6] == "norm" and first[8] == "max|g|"
    float(first[7]), float(first[9])


def test_apply_restored_after_fit_and_when_fit_raises():
    model, (x, y) = mlp(), _data()
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
    model, (x, y) = mlp(), _data()
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

    model, (x, y) = mlp(), _data()
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


def _division_model():
    """d1 -> Lambda dividing by input column 0 (guarded forward, NaN backward) -> out."""
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh", name="d1")(inputs)
    divided = keras.layers.Lambda(lambda t: keras.ops.where(t[1][:, :1] == 0, 0.0, t[0] / t[1][:, :1]), name="divide")(
        [hidden, inputs]
    )
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(divided))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def _division_data():
    x, y = _data(32, 3, 1)
    x[:, 0] = np.abs(x[:, 0]) + 0.5
    x[20, 0] = 0.0  # batch 2 (0-based) of size 8
    return x, y


def test_nan_in_lambda_is_pinned_on_lambda_at_right_batch():
    model, (x, y) = _division_model(), _division_data()
    monitor = GradientMonitor(read_every=4)
    with pytest.warns(UserWarning, match="'divide'"):
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    first = monitor.anomalies[0]
    assert (first.kind, first.layer, first.epoch, first.batch, first.step) == ("nonfinite", "divide", 0, 2, 2)
    assert first.weight == "d1/kernel" and first.suspects == ("divide",)
    # Independent check that batch 2 is the first with a NaN gradient.
    cols = monitor.to_dict()
    bad_batches = sorted({b for b, n in zip(cols["batch"], cols["nan"], strict=True) if n})
    assert bad_batches[0] == 2


def test_stop_ends_fit_and_keeps_last_good_weights():
    model, (x, y) = _division_model(), _division_data()
    start = model.get_weights()
    monitor = GradientMonitor(on_anomaly="stop")
    with pytest.warns(UserWarning, match="Training stopped"):
        history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[monitor])
    assert len(history.history["loss"]) == 1 and model.stop_training
    assert monitor.last_good_step == 2
    # Truth: the same model trained on the two good batches only.
    reference = _division_model()
    reference.set_weights(start)
    reference.fit(x[:16], y[:16], batch_size=8, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(monitor.last_good_weights, reference.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    monitor.restore_last_good()
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_raise_raises_gradmagic_error_and_restores():
    model, (x, y) = _division_model(), _division_data()
    with pytest.raises(GradmagicError, match="'divide'") as info:
        model.fit(
            x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[GradientMonitor(on_anomaly="raise")]
        )
    assert isinstance(info.value, GradientAnomalyError) and info.value.anomaly.batch == 2
    assert "apply" not in vars(model.optimizer)
    # Raising skips on_train_end; the model must still have its plain train function back.
    assert getattr(model.train_function, "gradmagic_functions", None) is None


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
    x, y = _data(32)
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
    model, (x, y) = mlp(), _data()
    monitor = GradientMonitor()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    # The new optimizer (learning rate 0) is the one applied, and the monitor still records.
    for got, want in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert len(monitor.to_dict()["step"]) == 4 * len(model.trainable_variables)


def _forward_division_model():
    """d1 -> Lambda dividing by input column 0, unguarded (Inf/NaN in the forward pass) -> out."""
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh", name="d1")(inputs)
    divided = keras.layers.Lambda(lambda t: t[0] / t[1][:, :1], name="divide")([hidden, inputs])
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(divided))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


@pytest.mark.parametrize("action", ["stop", "raise"])
def test_forward_division_is_pinned_on_the_lambda_op_and_line(action):
    model, (x, y) = _forward_division_model(), _division_data()
    before = [w.copy() for w in model.get_weights()]
    monitor = GradientMonitor(on_anomaly=action)
    fit = lambda: model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])  # noqa: E731
    if action == "stop":
        with pytest.warns(UserWarning, match="RealDiv"):
            fit()
        anomaly = monitor.anomalies[0]
    else:
        with pytest.raises(GradientAnomalyError, match="RealDiv") as info:
            fit()
        anomaly = info.value.anomaly
    assert (anomaly.kind, anomaly.layer, anomaly.batch, anomaly.step) == ("nonfinite", "divide", 2, 2)
    assert anomaly.layer_index == [layer.name for layer in model.layers].index("divide")
    origin = anomaly.origin
    assert (origin.op_type, origin.layer, origin.backward) == ("RealDiv", "divide", False)
    # The user's own line: the Lambda's division in this file.
    assert "test_monitor.py" in origin.source and "t[0] / t[1][:, :1]" in origin.source
    assert "test_monitor.py" in anomaly.message and "'divide'" in anomaly.message
    # The batch is the one fit used at that step, and explaining it reproduces the op.
    bx, by, bw = monitor.bad_batch
    np.testing.assert_array_equal(bx, x[16:24])
    np.testing.assert_array_equal(by, y[16:24])
    assert bw is None
    # The weights from before the step: the reference trained on the two good batches only.
    reference = _forward_division_model()
    reference.set_weights(before)
    reference.fit(x[:16], y[:16], batch_size=8, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(monitor.bad_step_weights, reference.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    import gradmagic as gm

    reference.set_weights(monitor.bad_step_weights)
    assert gm.explain(reference, *monitor.bad_batch[:2]).nonfinite[0].op_type == "RealDiv"


def test_backward_only_nan_keeps_its_pinning_with_stop():
    # The guarded division: the forward pass is finite, the gradient of the hidden Inf is NaN.
    model, (x, y) = _division_model(), _division_data()
    monitor = GradientMonitor(on_anomaly="stop")
    with pytest.warns(UserWarning, match="'divide'"):
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    first = monitor.anomalies[0]
    assert (first.kind, first.layer, first.batch, first.weight) == ("nonfinite", "divide", 2, "d1/kernel")
    assert first.suspects == ("divide",)


def test_bad_batch_is_the_shuffled_batch_fit_used():
    model, (x, y) = _forward_division_model(), _division_data()
    # The sample weights are the row numbers 1..32: they name the rows fit put in each batch.
    sample_weight = np.arange(1, 33, dtype="float32")
    keras.utils.set_random_seed(5)
    monitor = GradientMonitor(on_anomaly="raise")
    with pytest.raises(GradientAnomalyError) as info:
        model.fit(
            x, y, sample_weight=sample_weight, batch_size=8, epochs=1, shuffle=True, verbose=0, callbacks=[monitor]
        )
    bx, by, bw = monitor.bad_batch
    rows = bw.astype(int) - 1
    assert len(rows) == 8 and len(set(rows)) == 8
    np.testing.assert_array_equal(bx, x[rows])
    np.testing.assert_array_equal(by, y[rows])
    assert 20 in rows  # the only row with a zero divisor, so the only batch that goes non-finite
    assert info.value.anomaly.batch == info.value.anomaly.step and info.value.anomaly.origin.op_type == "RealDiv"


@pytest.mark.parametrize(("jit", "steps_per_execution"), [(True, 1), (False, 3)])
def test_forward_division_pinned_with_xla_and_steps_per_execution(jit, steps_per_execution):
    model, (x, y) = _forward_division_model(), _division_data()
    model.compile(
        optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=jit, steps_per_execution=steps_per_execution
    )
    monitor = GradientMonitor(on_anomaly="raise")
    with pytest.raises(GradientAnomalyError) as info:
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    anomaly = info.value.anomaly
    # With 3 steps per execution the bad batch (index 2) is the last of the first execution.
    assert (anomaly.batch, anomaly.layer, anomaly.origin.op_type) == (2, "divide", "RealDiv")
    np.testing.assert_array_equal(monitor.bad_batch[0], x[16:24])


def test_forward_division_pinned_when_run_eagerly():
    model, (x, y) = _forward_division_model(), _division_data()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", run_eagerly=True)
    monitor = GradientMonitor(on_anomaly="raise")
    with pytest.raises(GradientAnomalyError) as info:
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    assert (info.value.anomaly.layer, info.value.anomaly.origin.op_type) == ("divide", "RealDiv")
    np.testing.assert_array_equal(monitor.bad_batch[0], x[16:24])


@pytest.mark.parametrize("action", ["stop", "raise"])
def test_keeping_the_bad_step_leaves_training_bit_identical(action):
    def run(callbacks):
        return _fit_bytes(_conv_bn_dropout, keras.optimizers.SGD(0.1), callbacks, (8, 8, 3), 12, 2)

    plain, monitored = run([]), run([GradientMonitor(on_anomaly=action)])
    assert [p[0] for p, m in zip(plain, monitored, strict=True) if p[1] != m[1]] == []


def test_exploding_and_vanishing():
    model, (x, y) = mlp(), _data()
    monitor = GradientMonitor(explode_threshold=1e-6, vanish_threshold=1e9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    kinds = {a.kind for a in monitor.anomalies}
    assert kinds == {"exploding", "vanishing"}


def test_steps_per_execution_records_every_batch():
    model, (x, y) = mlp(), _data(64)
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=4)
    monitor = GradientMonitor(read_every=1)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
    cols = monitor.to_dict()
    assert sorted(set(cols["step"])) == list(range(16))
    assert cols["batch"][:: len(model.trainable_variables)] == list(range(8)) * 2


def test_loss_scale_optimizer_records_unscaled_gradients():
    def run(optimizer):
        keras.utils.set_random_seed(3)
        model = mlp()
        model.compile(optimizer=optimizer, loss="mse")
        monitor = GradientMonitor()
        model.fit(*_data(), batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
        return np.array(monitor.to_dict()["norm"])

    plain = run(keras.optimizers.SGD(0.01))
    scaled = run(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=1024.0))
    np.testing.assert_allclose(scaled, plain, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("on_anomaly", "explode"),
        ("on_anomaly", None),
        ("print_every", 0),
        ("print_every", True),
        ("read_every", 1.5),
        ("full_every", 0),
        ("histogram_every", -3),
        ("histogram_bins", 0),
        ("histogram_bins", None),
        ("window", -1),
        ("window", 2.5),
        ("explode_factor", "big"),
        ("explode_factor", -1.0),
        ("explode_factor", float("nan")),
        ("explode_threshold", float("inf")),
        ("vanish_threshold", True),
        ("stats", "fast"),
        ("stream", "stdout"),
        ("log_dir", 123),
        ("log_dir", ""),
    ],
)
def test_bad_arguments_fail_in_the_constructor(name, value):
    with pytest.raises(MonitorArgumentError, match=f"Received: {name}=") as info:
        GradientMonitor(**{name: value})
    assert isinstance(info.value, GradmagicError) and "Expected" in str(info.value) and "Fix" in str(info.value)


def test_log_dir_that_cannot_be_created_fails_in_the_constructor(tmp_path):
    regular = tmp_path / "a_file"
    regular.write_text("not a directory")
    for log_dir in (regular / "logs", regular):
        with pytest.raises(MonitorArgumentError, match="Received: log_dir=") as info:
            GradientMonitor(log_dir=str(log_dir))
        assert str(regular) in str(info.value)
    # A path that does not exist yet is fine (and is not created before fit).
    GradientMonitor(log_dir=tmp_path / "new" / "logs")
    assert not (tmp_path / "new").exists()


def test_good_arguments_are_accepted():
    monitor = GradientMonitor(
        5,
        "stop",
        None,
        stats="full",
        full_every=3,
        window=1,
        explode_factor=2,
        vanish_threshold=1e-8,
        stream=sys.stderr,
    )
    assert (monitor.print_every, monitor.on_anomaly, monitor.stats, monitor.full_every) == (5, "stop", "full", 3)


_MIRRORED = textwrap.dedent(
    """
    import json, os
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from gradmagic.core.monitor.callback import GradientMonitor
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 3)).astype("float32"), rng.normal(size=(64, 2)).astype("float32")

    def run(strategy):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                                      keras.layers.Dense(2)])
            model.compile(optimizer="sgd", loss="mse")
        monitor = GradientMonitor(histogram_every=3, histogram_bins=6)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
        found = monitor.to_dict()
        found["histograms"] = [[h.step, h.edges.tolist(), h.counts.tolist()] for h in monitor.histograms]
        return found, strategy.num_replicas_in_sync

    single, _ = run(tf.distribute.get_strategy())
    mirrored, replicas = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    print(json.dumps({"single": single, "mirrored": mirrored, "replicas": replicas}))
    """
)


def test_mirrored_strategy_matches_single_device():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", _MIRRORED], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    single, mirrored = out["single"], out["mirrored"]
    assert single["step"] == mirrored["step"] and single["layer_index"] == mirrored["layer_index"]
    np.testing.assert_allclose(mirrored["norm"], single["norm"], rtol=1e-5)
    np.testing.assert_allclose(mirrored["max_abs"], single["max_abs"], rtol=1e-5)
    assert [h[0] for h in mirrored["histograms"]] == [h[0] for h in single["histograms"]] == [0] * 4 + [3] * 4 + [6] * 4
    for m, s in zip(mirrored["histograms"], single["histograms"], strict=True):
        np.testing.assert_allclose(m[1], s[1], rtol=1e-5)
        assert np.abs(np.subtract(m[2], s[2])).sum() <= 1


def test_tensorboard_export(tmp_path):
    model, (x, y) = mlp(), _data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[GradientMonitor(log_dir=str(tmp_path))])
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(str(events[0])) for v in e.summary.value}
    assert f"gradient_norm/{model.trainable_variables[0].path}" in tags


def test_live_panel_updates_during_fit_headless():
    from gradmagic.widgets.training_panel import TrainingPanel

    model, (x, y) = mlp((3, 4, 2)), _data(64)
    monitor = GradientMonitor(read_every=2)
    redraws_during_fit = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            redraws_during_fit.append(panel.redraws)

    # No time budget here: this checks that redraws happen while fit runs.
    panel = TrainingPanel(monitor, every=2, use_ipympl=False, max_fraction=1.0, min_interval=0.0)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[monitor, Probe()])
    assert redraws_during_fit[0] >= 1 and panel.redraws > redraws_during_fit[0]
    assert panel.image.value[:8] == b"\x89PNG\r\n\x1a\n" and panel.status.value == ""
    lines = panel.axes.get_lines()
    assert [ln.get_label() for ln in lines] == [model.layers[0].name, model.layers[1].name]
    assert len(lines[0].get_xdata()) == 16


def test_core_monitor_imports_no_ipython_or_widgets():
    # TensorFlow itself may import parts of IPython; gradmagic must add nothing of it.
    code = (
        "import sys, keras, tensorflow\n"
        "before = set(sys.modules)\n"
        "import gradmagic.core.monitor.callback\n"
        "print(any(m.split('.')[0] in ('IPython', 'ipywidgets') for m in set(sys.modules) - before))"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stderr[-1000:]


def _numpy_stats(g):
    g = np.asarray(g, np.float64).ravel()
    finite = g[np.isfinite(g)]
    counts = [np.isnan(g).sum(), np.isinf(g).sum()]
    if not len(finite):
        return [np.nan] * 3 + counts
    return [np.linalg.norm(finite), np.abs(finite).max(), finite.mean(), *counts]


@pytest.mark.parametrize("jit", [False, True])
def test_step_stats_of_large_odd_and_nonfinite_gradients(jit):
    # Sizes: row-reduced (large, composite), flat slices (prime > 65536), small, empty, scalar.
    rng = np.random.default_rng(0)
    shapes = [(784, 256), (131071,), (3, 7), (0,), ()]
    grads = [(rng.normal(size=s) * 3 + 0.5).astype("float32") for s in shapes]
    spoiled = [g.copy() for g in grads]
    spoiled[0].flat[[5, 70_000]] = [np.nan, -np.inf]
    spoiled[2].flat[:] = np.inf
    sizes = [g.size for g in grads]
    run = tf.function(lambda *g: step_stats(g, xla=jit), jit_compile=jit)
    for case in (grads, spoiled):
        want = np.array([_numpy_stats(g) for g in case])
        got = finish_stats(run(*case).numpy(), sizes)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6, equal_nan=True)
    # The optimizer's g**2, when given, replaces the passes for the norm and max |g|.
    specs = [tf.TensorSpec(g.shape, tf.float32) for g in grads]
    with_squares = stats_function(specs, [True, False, True, False, True], xla=jit)
    squares = [np.square(g) for g in grads[::2]]
    got = finish_stats(tf.function(lambda *t: with_squares(*t), jit_compile=jit)(*grads, *squares).numpy(), sizes)
    np.testing.assert_allclose(got, np.array([_numpy_stats(g) for g in grads]), rtol=2e-6, atol=1e-6, equal_nan=True)


def test_norm_tracker_checks_a_block_as_step_by_step():
    rng = np.random.default_rng(1)
    norms = np.exp(rng.normal(size=(120, 3)) * 2)
    norms[rng.random(norms.shape) < 0.05] = np.nan
    norms[70, 1] = 1e6
    one, block = NormTracker(3, 20, 30.0, None, 0.05), NormTracker(3, 20, 30.0, None, 0.05)
    stepwise = [(t, *found) for t in range(len(norms)) for found in one.check(norms[t])]
    blockwise = block.check_steps(norms[:7]) + [(t + 7, *f) for t, *f in block.check_steps(norms[7:])]
    assert stepwise == blockwise and ("exploding", 1) in {(k, w) for _, k, w, _ in stepwise}


@pytest.mark.parametrize("jit", [False, True])
def test_histograms_every_n_steps_match_numpy(jit):
    model = mlp((3, 5, 2))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit)
    x, y = _data()
    before, monitor = _WeightsBefore(), GradientMonitor(read_every=3, histogram_every=3, histogram_bins=8)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[before, monitor])
    n_w = len(model.trainable_variables)
    assert [h.step for h in monitor.histograms] == [s for s in (0, 3, 6) for _ in range(n_w)]
    for h in monitor.histograms:
        batch = h.step % 4
        truth = _tape_gradients(
            model, before.weights[h.step], x[8 * batch : 8 * batch + 8], y[8 * batch : 8 * batch + 8]
        )
        i = [v.path for v in model.trainable_variables].index(h.weight)
        g = truth[i].ravel()
        reach = np.abs(g).max()
        np.testing.assert_allclose(h.edges, np.linspace(-reach, reach, 9), rtol=1e-5)
        want, _ = np.histogram(g, np.linspace(-reach, reach, 9))
        assert h.counts.sum() == g.size and np.abs(h.counts - want).sum() <= 2  # float32 vs float64 bin edges
        assert (h.epoch, h.batch) == (h.step // 4, batch)


@pytest.mark.parametrize("xla", [False, True])
def test_histogram_leaves_out_nonfinite_entries(xla):
    from gradmagic.core.monitor.histograms import HistogramBuffer

    buffer = HistogramBuffer(1, every=1, bins=4, capacity=2, strategy=tf.distribute.get_strategy(), xla=xla)
    grad = tf.constant([np.nan, 1.0, -1.0, 0.5, np.inf, -0.2])

    @tf.function(jit_compile=xla)
    def record():
        buffer.record(tf.constant(0, tf.int64), [grad], [0], step_stats([grad]))

    record()
    steps, counts, ranges = buffer.read(0, 1)
    # Finite entries -1, -0.2, 0.5, 1 over [-1, 1] in 4 bins; NaN and Inf are not binned.
    assert steps == [0] and ranges[0, 0] == 1.0
    np.testing.assert_array_equal(counts[0, 0], [1, 1, 0, 2])


def test_tensorboard_histograms(tmp_path):
    model, (x, y) = mlp(), _data()
    monitor = GradientMonitor(log_dir=str(tmp_path), histogram_every=2, histogram_bins=5)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    (events,) = tmp_path.glob("events.out.tfevents.*")
    tag = f"gradient/{model.trainable_variables[0].path}"
    found = [
        (e.step, tf.make_ndarray(v.tensor), v.metadata.plugin_data.plugin_name)
        for e in tf.compat.v1.train.summary_iterator(str(events))
        for v in e.summary.value
        if v.tag == tag
    ]
    assert [step for step, _, _ in found] == [0]  # 2 batches: step 0 only
    _, buckets, plugin = found[0]
    assert plugin == "histograms" and buckets.shape == (5, 3)
    assert buckets[:, 2].sum() == model.trainable_variables[0].numpy().size
    np.testing.assert_allclose(buckets[1:, 0], buckets[:-1, 1])  # contiguous bins


def test_listener_cadence_lowers_the_read_interval():
    model, (x, y) = mlp(), _data(64)
    monitor = GradientMonitor()  # reads every 100 batches by default
    seen = []
    monitor.add_listener(lambda m: seen.append(len(m.recorded)), every=3)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    # 16 batches: reads after batches 3, 6, 9, 12, 15, then at the epoch end.
    assert seen == [3, 6, 9, 12, 15, 16]
    with pytest.raises(MonitorArgumentError, match="every=0"):
        monitor.add_listener(print, every=0)


def test_embedding_gradients_are_recorded_dense():
    # An Embedding's gradient arrives as IndexedSlices (repeated ids included): stats of the dense sum.
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(10, 4), keras.layers.Flatten()])
    model.add(keras.layers.Dense(1))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    ids = np.array([[1, 1, 2], [3, 1, 9]], "int32")
    y = np.array([[1.0], [-1.0]], "float32")
    weights = [v.numpy() for v in model.trainable_variables]
    monitor = GradientMonitor(stats="full")
    model.fit(ids, y, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    clone = keras.models.clone_model(model)
    clone.set_weights(weights)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, clone(ids))
    table = tf.convert_to_tensor(tape.gradient(loss, clone.trainable_variables[0])).numpy()
    cols = monitor.to_dict()
    np.testing.assert_allclose(cols["norm"][0], np.linalg.norm(table), rtol=1e-5)
    np.testing.assert_allclose(cols["mean"][0], table.mean(), rtol=1e-5, atol=1e-8)  # over all 40 entries
    np.testing.assert_allclose(cols["max_abs"][0], np.abs(table).max(), rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("magnitude", [1e20, 1e-20])
def test_step_stats_exact_where_squares_leave_float32(magnitude, jit):
    # |g| = 1e20 squares to Inf in float32 and 1e-20 to 0: the statistics must not (float64 path).
    rng = np.random.default_rng(2)
    grads = [(rng.normal(size=s) * magnitude).astype("float32") for s in [(70_000,), (5, 3)]]
    want = np.array([_numpy_stats(g) for g in grads])
    run = tf.function(lambda *g: step_stats(g, xla=jit), jit_compile=jit)
    np.testing.assert_allclose(finish_stats(run(*grads).numpy(), [g.size for g in grads]), want, rtol=2e-6)
    specs = [tf.TensorSpec(g.shape, tf.float32) for g in grads]
    with_squares = tf.function(stats_function(specs, [True, True], xla=jit), jit_compile=jit)
    with np.errstate(over="ignore", under="ignore"):
        squares = [np.square(g) for g in grads]  # what the optimizer computes: Inf or 0
    got = with_squares(*grads, *squares).numpy()
    np.testing.assert_allclose(finish_stats(got, [g.size for g in grads]), want, rtol=2e-6)


def test_histograms_of_huge_gradients_under_loss_scaling():
    model = mlp()
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.0), initial_scale=2.0**15)
    model.compile(optimizer=optimizer, loss=lambda y, p: 1e16 * keras.ops.mean((y - p) ** 2))
    monitor = GradientMonitor(histogram_every=1, histogram_bins=6)
    model.fit(*_data(), batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    cols = monitor.to_dict()
    assert not any(cols["skipped"]) and 1e14 < max(cols["max_abs"]) < 1e20  # scaled, these squares overflow
    sizes = {v.path: v.numpy().size for v in model.trainable_variables}
    for h, max_abs in zip(monitor.histograms, cols["max_abs"], strict=True):
        assert h.counts.sum() == sizes[h.weight]
        np.testing.assert_allclose(h.edges[-1], max_abs, rtol=1e-5)  # unscaled, like the statistics
