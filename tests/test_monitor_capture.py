"""The statistics the monitor records in the train step, against gradients from an independent tape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp
from monitor_helpers import WeightsBefore, sample_data, tape_gradients

from gradmagic.core.monitor.callback import GradientMonitor


@pytest.mark.parametrize("stats", ["norm", "full"])
@pytest.mark.parametrize(("jit", "optimizer"), [(False, "sgd"), (True, "sgd"), (False, "adam")])
def test_recorded_stats_equal_independent_gradients(jit, optimizer, stats):
    # Adam squares the gradient itself; the monitor then reduces that g**2 instead.
    model = mlp((3, 5, 2))
    optimizer = keras.optimizers.SGD(0.1) if optimizer == "sgd" else keras.optimizers.Adam(0.01)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit)
    x, y = sample_data()
    before, monitor = WeightsBefore(), GradientMonitor(read_every=3, stats=stats)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[before, monitor])
    cols = monitor.to_dict()
    n_w = len(model.trainable_variables)
    assert len(cols["step"]) == 8 * n_w and len(set(map(len, cols.values()))) == 1
    for k, weights in enumerate(before.weights):
        batch = k % 4
        truth = tape_gradients(model, weights, x[8 * batch : 8 * batch + 8], y[8 * batch : 8 * batch + 8])
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
    before, monitor = WeightsBefore(), GradientMonitor()
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


def test_loss_scale_optimizer_records_unscaled_gradients():
    def run(optimizer):
        keras.utils.set_random_seed(3)
        model = mlp()
        model.compile(optimizer=optimizer, loss="mse")
        monitor = GradientMonitor()
        model.fit(*sample_data(), batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
        return np.array(monitor.to_dict()["norm"])

    plain = run(keras.optimizers.SGD(0.01))
    scaled = run(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=1024.0))
    np.testing.assert_allclose(scaled, plain, rtol=1e-5)


def test_steps_per_execution_records_every_batch():
    model, (x, y) = mlp(), sample_data(64)
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=4)
    monitor = GradientMonitor(read_every=1)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
    cols = monitor.to_dict()
    assert sorted(set(cols["step"])) == list(range(16))
    assert cols["batch"][:: len(model.trainable_variables)] == list(range(8)) * 2


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


def test_stats_buffer_rows_put_each_statistic_in_its_named_column():
    from gradmagic.core.monitor.capture import StatsBuffer
    from gradmagic.core.monitor.columns import BUFFER_COLUMNS, column

    rng = np.random.default_rng(4)
    variables = [tf.Variable(np.zeros(s, "float32"), name=n) for n, s in (("a", (3, 2)), ("b", (4,)), ("c", (5,)))]
    buffer = StatsBuffer([v.name for v in variables], capacity=4, mode="full")
    grads = [rng.normal(size=v.shape).astype("float32") for v in variables]
    grads[2][1] = np.inf

    @tf.function(autograph=False)
    def step(a, c):
        buffer.record([a, None, c], variables)  # "b" gets no gradient

    step(grads[0], grads[2])
    count, rows = buffer.read(0)
    assert count == 1 and rows.shape == (1, 3, len(BUFFER_COLUMNS))
    # The truth from NumPy: the finite entries' statistics, NaN/Inf counts, and the flags.
    finite = grads[2][np.isfinite(grads[2])]
    np.testing.assert_allclose(
        column(rows, "norm")[0, [0, 2]], [np.linalg.norm(grads[0]), np.linalg.norm(finite)], rtol=1e-6
    )
    np.testing.assert_allclose(
        column(rows, "max_abs")[0, [0, 2]], [np.abs(grads[0]).max(), np.abs(finite).max()], rtol=1e-6
    )
    np.testing.assert_allclose(column(rows, "mean")[0, [0, 2]], [grads[0].mean(), finite.mean()], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(column(rows, "nan")[0], [0, 0, 0])
    np.testing.assert_array_equal(column(rows, "inf")[0], [0, 0, 1])
    np.testing.assert_array_equal(column(rows, "missing")[0], [0, 1, 0])
    np.testing.assert_array_equal(column(rows, "full")[0], [1, 1, 1])
    np.testing.assert_array_equal(column(rows, "skipped")[0], [0, 0, 0])  # only a LossScaleOptimizer skips


def test_default_norms_of_tiny_gradients_equal_a_tape_in_float64():
    # A loss scaled by 2**-80 makes every gradient entry about 1e-24: float32 squares of
    # those flush to 0, so a float32 sum of squares reads 0. The recorded norms must keep
    # their scale: the tape's gradients of the unscaled loss, times 2**-80 (exact, a power
    # of two), normed in float64 by NumPy.
    scale = 2.0**-80
    model = mlp((3, 5, 2))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=lambda y, p: scale * keras.ops.mean((y - p) ** 2))
    x, y = sample_data(16)
    before, monitor = WeightsBefore(), GradientMonitor()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[before, monitor])
    norms = np.array(monitor.to_dict()["norm"]).reshape(2, -1)
    unscaled = mlp((3, 5, 2))  # the same layers with the plain MSE (a clone cannot copy the lambda loss)
    for k, weights in enumerate(before.weights):
        truth = tape_gradients(unscaled, weights, x[8 * k : 8 * k + 8], y[8 * k : 8 * k + 8])
        want = [np.linalg.norm(g.astype(np.float64) * scale) for g in truth]
        assert min(want) < 1e-20  # small enough that float32 squares underflow
        # Tolerance: the tape's graph and the train step's are different graphs.
        np.testing.assert_allclose(norms[k], want, rtol=1e-5)


def test_default_mode_measures_everything_at_a_non_finite_step_and_keeps_its_schedule():
    # A LossScaleOptimizer skips the step whose scaled gradients overflow, so training goes on
    # with finite gradients after it: the non-finite step between two scheduled ones must get
    # every statistic (its NaN/Inf counts), and the schedule (every 3rd batch) must not move.
    model = mlp((3, 5, 2), activation="linear")  # no saturation: the huge inputs reach the loss
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
    x, y = sample_data(64)
    x[8:16] *= 1e30  # batch 1: the squared error overflows float32, the gradients are Inf/NaN
    monitor = GradientMonitor(read_every=3)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    cols = monitor.to_dict()
    n_w = len(model.trainable_variables)
    per_step = {name: np.array(cols[name]).reshape(8, n_w) for name in ("full", "skipped", "nan", "inf", "norm")}
    assert per_step["full"][:, 0].tolist() == [False, True, True, False, False, True, False, False]
    assert per_step["skipped"][:, 0].tolist() == [False, True] + [False] * 6
    assert (per_step["nan"][1] + per_step["inf"][1]).sum() > 0  # counted, not just flagged
    assert (per_step["nan"] + per_step["inf"])[[0, *range(2, 8)]].sum() == 0
    assert np.isfinite(per_step["norm"][[0, *range(2, 8)]]).all()
