"""The monitor's bad step on every backend: the batch fit used, and the op that made NaN/Inf first.

With ``on_anomaly="stop"`` or ``"raise"`` the monitor keeps each step's batch
until it has checked the step; at the first non-finite one it runs the
NaN/Inf-origin pass of ``gm.explain`` on that batch at the pre-step weights.
Truths: the rows fit fed to its train step, recorded from a plain run of the
same fit (``run_eagerly``, the same seed); the weights before the step, from a
twin trained on the good batches without the monitor; the Lambda by its name.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

import gradmagic as gm
from gradmagic.errors import GradientAnomalyError

from .backend_truths import hand_mse_gradients

BATCH = 8
#: The op type each backend's explain gives a division: TensorFlow's op, JAX's primitive, the torch function.
DIVISION = {"tensorflow": "RealDiv", "jax": "div", "torch": "div"}


def _forward_division_model(guarded: bool = False) -> keras.Model:
    """d1 -> Lambda dividing by input column 0 -> out; unguarded, Inf/NaN in the forward pass."""
    init = keras.initializers.GlorotUniform
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh", kernel_initializer=init(seed=1), name="d1")(inputs)
    if guarded:  # finite forward pass; the gradient of the hidden Inf is NaN (backward only)
        divide = keras.layers.Lambda(
            lambda t: keras.ops.where(t[1][:, :1] == 0, 0.0, t[0] / t[1][:, :1]), name="divide"
        )
    else:
        divide = keras.layers.Lambda(lambda t: t[0] / t[1][:, :1], name="divide")
    outputs = keras.layers.Dense(1, kernel_initializer=init(seed=2), name="out")(divide([hidden, inputs]))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def _division_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    x[:, 0] = np.abs(x[:, 0]) + 0.5
    x[20, 0] = 0.0  # the only zero divisor: batch 2 (0-based) of size 8
    return x, y


def _fit(model: keras.Model, x: np.ndarray, y: np.ndarray, monitor=None, **kwargs) -> None:
    callbacks = [] if monitor is None else [monitor]
    kwargs.setdefault("shuffle", False)
    model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=callbacks, **kwargs)


def _numpy(value):
    return None if value is None else keras.ops.convert_to_numpy(value)


@pytest.mark.parametrize("action", ["stop", "raise"])
def test_an_unguarded_forward_division_is_pinned_on_the_lambda(backend, action):
    x, y = _division_data()
    model = _forward_division_model()
    monitor = gm.GradientMonitor(on_anomaly=action)
    if action == "stop":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit(model, x, y, monitor, epochs=2)
        assert any("Training stopped" in str(w.message) and "'divide'" in str(w.message) for w in caught)
        anomaly = monitor.anomalies[0]
    else:
        with pytest.raises(GradientAnomalyError) as raised:
            _fit(model, x, y, monitor, epochs=2)
        anomaly = raised.value.anomaly
    assert (anomaly.kind, anomaly.step, anomaly.batch, anomaly.layer) == ("nonfinite", 2, 2, "divide")
    assert anomaly.layer_index == [layer.name for layer in model.layers].index("divide")
    origin = anomaly.origin
    assert (origin.op_type, origin.layer, origin.backward) == (DIVISION[backend], "divide", False)
    # The user's own line: the Lambda's division in this file, named in the message too.
    assert "test_monitor_bad_step.py" in origin.source and "t[0] / t[1][:, :1]" in origin.source
    assert "t[0] / t[1][:, :1]" in anomaly.message and "'divide'" in anomaly.message
    # The batch fit used at that step (shuffle=False: rows 16 to 23).
    bx, by, bw = monitor.bad_batch
    np.testing.assert_array_equal(bx, x[16:24])
    np.testing.assert_array_equal(by, y[16:24])
    assert bw is None
    # The weights before the step: a twin trained on the two good batches without the monitor
    # (the same compiled step on the same values: the same bits).
    twin = _forward_division_model()
    _fit(twin, x[:16], y[:16])
    for got, want in zip(monitor.bad_step_weights, twin.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    # Explaining the batch at those weights shows the same op again.
    again = gm.explain(twin, *monitor.bad_batch[:2], training=True, verbose=False).nonfinite[0]
    assert (again.op_type, again.layer, again.backward) == (DIVISION[backend], "divide", False)


def _rows_fed_to_train_step(model: keras.Model, x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> list:
    """The sample weights of every batch ``fit`` hands to ``model.train_step``, from a plain eager run."""
    seen = []
    original = model.train_step

    def train_step(*args):  # JAX: (state, data); TensorFlow, PyTorch: (data,)
        seen.append(_numpy(keras.utils.unpack_x_y_sample_weight(args[-1])[2]))
        return original(*args)

    object.__setattr__(model, "train_step", train_step)
    keras.utils.set_random_seed(5)
    _fit(model, x, y, sample_weight=weight, shuffle=True)
    return seen


def test_the_bad_batch_is_the_shuffled_batch_fit_used(backend):
    x, y = _division_data()
    # The sample weights are the row numbers 1..32: they name the rows of each batch.
    weight = np.arange(1, 33, dtype="float32")
    plain = _forward_division_model()
    plain.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", run_eagerly=True)
    fed = _rows_fed_to_train_step(plain, x, y, weight)
    model = _forward_division_model()
    monitor = gm.GradientMonitor(on_anomaly="raise")
    keras.utils.set_random_seed(5)
    with pytest.raises(GradientAnomalyError) as raised:
        _fit(model, x, y, monitor, sample_weight=weight, shuffle=True)
    anomaly = raised.value.anomaly
    bx, by, bw = monitor.bad_batch
    rows = bw.astype(int) - 1
    # The batch that holds row 20 (the only zero divisor), as the plain run was fed it.
    want = next(w for w in fed if 21 in w)
    np.testing.assert_array_equal(bw, want)
    assert anomaly.step == anomaly.batch == next(k for k, w in enumerate(fed) if 21 in w)
    np.testing.assert_array_equal(bx, x[rows])
    np.testing.assert_array_equal(by, y[rows])
    assert anomaly.origin.layer == "divide" and not anomaly.origin.backward


def test_a_backward_only_nan_keeps_its_pinning(backend):
    x, y = _division_data()
    model = _forward_division_model(guarded=True)
    monitor = gm.GradientMonitor(on_anomaly="stop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, x, y, monitor)
    assert any("'divide'" in str(w.message) for w in caught)
    first = monitor.anomalies[0]
    # The forward pass is finite: only the gradient leaving 'divide' into d1 is NaN.
    assert (first.kind, first.layer, first.batch, first.weight) == ("nonfinite", "divide", 2, "d1/kernel")
    assert first.suspects == ("divide",)
    # The op that made it: the division (its Inf is masked by the where in the forward pass).
    assert first.origin.layer == "divide" and "t[0] / t[1][:, :1]" in first.origin.source


@pytest.mark.parametrize("setting", [{"steps_per_execution": 3}, {"run_eagerly": True}, {"jit_compile": False}])
def test_the_bad_batch_however_keras_runs_the_step(backend, setting):
    if backend == "torch" and "steps_per_execution" in setting:
        pytest.skip("Keras on PyTorch refuses steps_per_execution > 1")
    x, y = _division_data()
    model = _forward_division_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", **setting)
    monitor = gm.GradientMonitor(on_anomaly="raise")
    with pytest.raises(GradientAnomalyError) as raised:
        _fit(model, x, y, monitor)
    anomaly = raised.value.anomaly
    # With 3 steps per execution each batch is still recorded apart: the bad one (index 2)
    # is the last of the first execution, and the batch kept is that one.
    assert (anomaly.batch, anomaly.layer, anomaly.origin.op_type) == (2, "divide", DIVISION[backend])
    np.testing.assert_array_equal(monitor.bad_batch[0], x[16:24])
    twin = _forward_division_model()
    _fit(twin, x[:16], y[:16])
    for got, want in zip(monitor.bad_step_weights, twin.get_weights(), strict=True):
        # float32 tolerance: eager or unrolled steps may round differently from the compiled one.
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _conv_bn_dropout() -> keras.Model:
    init = keras.initializers.GlorotUniform
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, padding="same", kernel_initializer=init(seed=1)),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dropout(0.3, seed=4),
            keras.layers.Flatten(),
            keras.layers.Dense(2, kernel_initializer=init(seed=2)),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


@pytest.mark.parametrize("action", ["stop", "raise"])
def test_training_stays_bit_identical_while_the_batches_are_kept(backend, action):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 6, 6, 2)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    states = []
    for monitor in (None, gm.GradientMonitor(on_anomaly=action, histogram_every=3)):
        keras.utils.set_random_seed(7)  # the same Dropout masks in both runs
        model = _conv_bn_dropout()
        _fit(model, x, y, monitor, epochs=2)
        optimizer = model.optimizer
        states.append([_numpy(v) for v in [*model.weights, *optimizer.variables]])
        assert "apply" not in vars(optimizer) and "train_step" not in vars(model)
    for plain, watched in zip(*states, strict=True):
        np.testing.assert_array_equal(plain, watched)  # the monitor only reads: the same bits


def test_histograms_match_numpy_on_the_hand_written_gradient(backend):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    init = keras.initializers.GlorotUniform

    def mlp() -> keras.Model:
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(5, activation="tanh", kernel_initializer=init(seed=1)),
                keras.layers.Dense(1, kernel_initializer=init(seed=2)),
            ]
        )
        model.compile(keras.optimizers.SGD(0.1), "mse")
        return model

    monitor = gm.GradientMonitor(read_every=3, histogram_every=3, histogram_bins=8)
    model = mlp()
    _fit(model, x, y, monitor, epochs=2)
    paths = [v.path for v in model.trainable_variables]
    assert [h.step for h in monitor.histograms] == [s for s in (0, 3, 6) for _ in paths]
    for h in monitor.histograms:
        batch = h.step % 4
        twin = mlp()  # the weights before the step: a twin trained on the batches before it
        if h.step:
            _fit(twin, np.concatenate([x] * 2)[: h.step * BATCH], np.concatenate([y] * 2)[: h.step * BATCH])
        rows = slice(BATCH * batch, BATCH * batch + BATCH)
        g = hand_mse_gradients(twin, x[rows], y[rows])[paths.index(h.weight)].ravel()
        reach = np.abs(g).max()
        # float32 tolerance: the train step and the hand-written gradient are different programs.
        np.testing.assert_allclose(h.edges, np.linspace(-reach, reach, 9), rtol=1e-5)
        want, _ = np.histogram(g, np.linspace(-reach, reach, 9))
        # An entry within rounding of a bin edge may fall on either side of it.
        assert h.counts.sum() == g.size and np.abs(h.counts - want).sum() <= 2
        assert (h.epoch, h.batch) == (h.step // 4, batch)


def test_histograms_leave_out_non_finite_entries(backend):
    x, y = _division_data()
    model = _forward_division_model()
    monitor = gm.GradientMonitor(on_anomaly="raise", histogram_every=1, histogram_bins=4)
    with pytest.raises(GradientAnomalyError):
        _fit(model, x, y, monitor)
    # Truth: the hand-written gradient of the bad batch at the weights before the step.
    twin = _forward_division_model()
    twin.set_weights(monitor.bad_step_weights)
    truth = hand_mse_gradients(twin, x[16:24], y[16:24])
    paths = [v.path for v in model.trainable_variables]
    bad = [h for h in monitor.histograms if h.step == 2]
    assert [h.weight for h in bad] == paths
    for h in bad:
        g = truth[paths.index(h.weight)].ravel()
        finite = g[np.isfinite(g)]
        assert h.counts.sum() == finite.size < g.size  # NaN and Inf entries are not binned


def test_the_bad_batch_of_a_model_with_dict_inputs(backend):
    a, b = keras.Input((2,), name="a"), keras.Input((1,), name="b")
    divided = keras.layers.Lambda(lambda t: t[0] / t[1], name="divide")([a, b])
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(1, name="out")(divided))
    model.compile(keras.optimizers.SGD(0.01), "mse")
    rng = np.random.default_rng(4)
    x = {"a": rng.normal(size=(16, 2)).astype("float32"), "b": 1 + rng.random((16, 1)).astype("float32")}
    x["b"][11] = 0.0  # a zero divisor in batch 2 (of 4 rows)
    y = rng.normal(size=(16, 1)).astype("float32")
    monitor = gm.GradientMonitor(on_anomaly="raise")
    with pytest.raises(GradientAnomalyError) as raised:
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0, callbacks=[monitor])
    assert (raised.value.anomaly.step, raised.value.anomaly.origin.layer) == (2, "divide")
    bx, by, bw = monitor.bad_batch
    assert sorted(bx) == ["a", "b"] and bw is None
    for name in ("a", "b"):
        np.testing.assert_array_equal(bx[name], x[name][8:12])
    np.testing.assert_array_equal(by, y[8:12])
