"""The first non-finite step's batch and weights, kept on the device, and the op that made NaN/Inf first."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from monitor_helpers import division_data

from gradmagic.core.monitor.anomaly import GradientAnomalyError
from gradmagic.core.monitor.callback import GradientMonitor


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
    model, (x, y) = _forward_division_model(), division_data()
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
    assert "test_monitor_bad_step.py" in origin.source and "t[0] / t[1][:, :1]" in origin.source
    assert "test_monitor_bad_step.py" in anomaly.message and "'divide'" in anomaly.message
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


def test_bad_batch_is_the_shuffled_batch_fit_used():
    model, (x, y) = _forward_division_model(), division_data()
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
    model, (x, y) = _forward_division_model(), division_data()
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
    model, (x, y) = _forward_division_model(), division_data()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", run_eagerly=True)
    monitor = GradientMonitor(on_anomaly="raise")
    with pytest.raises(GradientAnomalyError) as info:
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    assert (info.value.anomaly.layer, info.value.anomaly.origin.op_type) == ("divide", "RealDiv")
    np.testing.assert_array_equal(monitor.bad_batch[0], x[16:24])


def test_bad_step_capture_keeps_the_first_bad_step_and_the_weights_before_it():
    from gradmagic.core.monitor.bad_step import BadStepCapture

    weights = [tf.Variable([1.0, 2.0]), tf.Variable([[3.0]])]
    capture = BadStepCapture(weights)
    spec = tf.TensorSpec([2, 2], tf.float32)

    @tf.function(input_signature=[spec, spec, tf.TensorSpec([], tf.bool), tf.TensorSpec([], tf.int64)])
    def step(x, y, finite, count):
        capture.data = (x, y)
        capture.record(finite, count)
        for variable in weights:  # the "update" that follows, as the optimizer's would
            variable.assign_add(tf.ones_like(variable))

    x0 = np.array([[1.0, 2.0], [3.0, 4.0]], "float32")
    step(x0, -x0, True, 4)
    assert capture.read() is None  # a finite step copies nothing
    step(x0 + 10, -x0 - 10, False, 5)  # the first bad step: weights were [2, 3] and [[4]] before it
    step(x0 + 20, -x0 - 20, False, 6)  # a later bad step does not overwrite the first
    count, (x, y, sample_weight), kept = capture.read()
    assert count == 5 and sample_weight is None
    np.testing.assert_array_equal(x, x0 + 10)
    np.testing.assert_array_equal(y, -x0 - 10)
    np.testing.assert_array_equal(kept[0], [2.0, 3.0])
    np.testing.assert_array_equal(kept[1], [[4.0]])
    capture.reset()
    assert capture.read() is None


def test_first_origin_names_the_forward_division_and_puts_the_weights_back():
    from gradmagic.core.monitor.origin import first_origin

    model = _forward_division_model()
    at_step = [w.numpy().copy() for w in model.trainable_variables]
    now = [w + 1.0 for w in at_step]
    for variable, value in zip(model.trainable_variables, now, strict=True):
        variable.assign(value)
    x = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 1.0]], "float32")  # row 1 divides by zero
    y = np.zeros((2, 1), "float32")
    origin = first_origin(model, (x, y, None), at_step)
    assert (origin.op_type, origin.layer, origin.backward) == ("RealDiv", "divide", False)
    for variable, value in zip(model.trainable_variables, now, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)
    assert first_origin(model, (x[:1], y[:1], None), at_step) is None  # a finite batch has no origin
