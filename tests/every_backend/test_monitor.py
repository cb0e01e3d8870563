"""GradientMonitor on every Keras backend: the recorded gradients, anomalies, printing, the panel.

The truth for the recorded norms is the framework's own autodiff of a
hand-written mean squared error at the weights before the step (written out per
framework inside the test); training with the monitor must give the very same
bits as training without it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest

import gradmagic as gm
from gradmagic.errors import GradientAnomalyError

BATCH = 8


def _mlp(seed: int = 3) -> keras.Model:
    initializer = keras.initializers.GlorotUniform(seed=seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, activation="tanh", kernel_initializer=initializer, name="hidden"),
            keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1), name="out"),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def _data(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")).astype("float32")


def _hand_gradients(backend: str, model: keras.Model, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """d mean((model(x) - y)**2) / d trainable weights, with the framework's own autodiff."""
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in model.trainable_variables]
        others = [v.value for v in model.non_trainable_variables]

        def loss(weights: list) -> jnp.ndarray:
            pred, _ = model.stateless_call(weights, others, jnp.asarray(x))
            return jnp.mean((pred - y) ** 2)

        return [np.asarray(g) for g in jax.grad(loss)(trainable)]
    if backend == "torch":
        import torch

        weights = [v.value for v in model.trainable_variables]
        pred = model(torch.as_tensor(x))
        loss = torch.mean((pred - torch.as_tensor(y)) ** 2)
        return [g.detach().cpu().numpy() for g in torch.autograd.grad(loss, weights)]
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x) - y) ** 2)
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


def _state(model: keras.Model) -> list[np.ndarray]:
    """Every variable of the model and of its optimizer, as NumPy arrays."""
    return [keras.ops.convert_to_numpy(v) for v in [*model.weights, *model.optimizer.variables]]


def _fit(model: keras.Model, x: np.ndarray, y: np.ndarray, monitor=None, **kwargs) -> None:
    callbacks = [] if monitor is None else [monitor]
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=callbacks, **kwargs)


@pytest.mark.parametrize("stats", ["norm", "full"])
def test_recorded_statistics_equal_the_hand_written_gradient_at_the_pre_step_weights(backend, stats):
    x, y = _data()
    model = _mlp()
    monitor = gm.GradientMonitor(stats=stats, full_every=2)
    _fit(model, x, y, monitor)
    d = monitor.to_dict()
    assert d["step"] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert d["weight"][:4] == [v.path for v in model.trainable_variables]
    for step in range(4):
        # The weights before step k: a twin trained k steps without the monitor.
        twin = _mlp()
        if step:
            _fit(twin, x[: step * BATCH], y[: step * BATCH])
        batch = slice(step * BATCH, (step + 1) * BATCH)
        want = _hand_gradients(backend, twin, x[batch], y[batch])
        rows = slice(4 * step, 4 * step + 4)
        # float32 tolerance: Keras's compiled step and the hand-written gradient
        # are different programs (different reduction orders).
        np.testing.assert_allclose(d["norm"][rows], [np.linalg.norm(g) for g in want], rtol=1e-5)
        full = stats == "full" or step % 2 == 1  # full_every=2: batches 2 and 4 of the epoch
        assert d["full"][rows] == [full] * 4
        if full:
            np.testing.assert_allclose(d["max_abs"][rows], [np.abs(g).max() for g in want], rtol=1e-5)
            np.testing.assert_allclose(d["mean"][rows], [g.mean() for g in want], rtol=1e-4, atol=1e-7)
        else:  # only the norm was measured: the other statistics read 0
            assert d["max_abs"][rows] == [0.0] * 4
        assert d["nan"][rows] == [0] * 4 and d["inf"][rows] == [0] * 4


@pytest.mark.parametrize("stats", ["norm", "full"])
def test_training_is_bit_identical_and_the_model_left_as_keras_made_it(backend, stats):
    x, y = _data()
    plain = _mlp()
    _fit(plain, x, y, epochs=2)
    watched = _mlp()
    monitor = gm.GradientMonitor(stats=stats, print_every=3, stream=io.StringIO())
    _fit(watched, x, y, monitor, epochs=2)
    for a, b in zip(_state(plain), _state(watched), strict=True):
        np.testing.assert_array_equal(a, b)  # the same bits: the monitor only reads the gradients
    assert len(monitor.to_dict()["step"]) == 8 * 4  # 8 steps, 4 weights
    optimizer = watched.optimizer
    assert "apply" not in vars(optimizer) and "stateless_apply" not in vars(optimizer)
    assert len(optimizer.variables) == len(plain.optimizer.variables)
    assert not hasattr(watched.train_function, "gradmagic_functions")
    # A later fit without the monitor runs Keras's own function and still trains alike.
    _fit(plain, x, y)
    _fit(watched, x, y)
    for a, b in zip(_state(plain), _state(watched), strict=True):
        np.testing.assert_array_equal(a, b)


def _nan_model() -> keras.Model:
    """A Lambda dividing by the input's last column: NaN/Inf wherever that column is 0."""
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Lambda(lambda t: t[:, :2] / t[:, 2:3], name="divide"),
            keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(seed=5), name="hidden"),
            keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=6), name="out"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.01), "mse")
    return model


def _nan_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 3)).astype("float32")
    x[:, 2] = 1.0 + rng.random(32).astype("float32")
    x[2 * BATCH + 3, 2] = 0.0  # one sample of the third batch (step 2)
    return x, rng.normal(size=(32, 1)).astype("float32")


def test_a_nan_raises_at_its_step_and_layer(backend):
    x, y = _nan_data()
    model = _nan_model()
    monitor = gm.GradientMonitor(on_anomaly="raise")
    with pytest.raises(GradientAnomalyError) as raised:
        _fit(model, x, y, monitor)
    anomaly = raised.value.anomaly
    assert (anomaly.kind, anomaly.step, anomaly.batch) == ("nonfinite", 2, 2)
    assert "batch 3 (step 2)" in anomaly.message
    counts = monitor.to_dict()
    bad = [w for w, n, i in zip(counts["weight"], counts["nan"], counts["inf"], strict=True) if n + i > 0]
    # The forward pass made it, so every weight's gradient at step 2 is NaN (and none before).
    assert bad == [v.path for v in model.trainable_variables]
    # The NaN/Inf-origin pass on the kept batch names the Lambda's division, on every backend.
    assert anomaly.layer == "divide" and anomaly.origin.layer == "divide" and not anomaly.origin.backward
    assert "apply" not in vars(model.optimizer) and "stateless_apply" not in vars(model.optimizer)
    assert len(monitor.to_dict()["step"]) == 3 * 4  # steps 0, 1, 2 (four weights each)


def test_a_nan_stops_training_and_keeps_the_last_good_weights(backend):
    x, y = _nan_data()
    model = _nan_model()
    monitor = gm.GradientMonitor(on_anomaly="stop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, x, y, monitor, epochs=2)
    assert any("NaN/Inf" in str(w.message) and "Training stopped" in str(w.message) for w in caught)
    assert [a.step for a in monitor.anomalies] == [2]
    assert max(monitor.to_dict()["step"]) == 2  # stopped right after the bad step
    twin = _nan_model()
    _fit(twin, x[: 2 * BATCH], y[: 2 * BATCH])
    assert monitor.last_good_step == 2
    for a, b in zip(monitor.last_good_weights, twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the same bits as two steps without the monitor
    monitor.restore_last_good()
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_loss_scale_optimizer_is_recorded_unscaled_and_its_skipped_step_is_no_anomaly(backend):
    x, y = _nan_data()
    model = _nan_model()
    model.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01)), "mse")
    monitor = gm.GradientMonitor(stats="full", on_anomaly="raise")
    _fit(model, x, y, monitor)  # no raise: the optimizer skips the NaN step on purpose
    assert monitor.skipped_steps == [2] and monitor.anomalies == []
    d = monitor.to_dict()
    want = _hand_gradients(backend, _nan_model(), x[:BATCH], y[:BATCH])
    # Divided by the loss scale (2**15, a power of two, so exactly); float32 tolerance as above.
    np.testing.assert_allclose(d["norm"][:4], [np.linalg.norm(g) for g in want], rtol=1e-5)
    np.testing.assert_allclose(d["max_abs"][:4], [np.abs(g).max() for g in want], rtol=1e-5)


def test_exploding_and_vanishing_gradients_warn_once_per_layer(backend):
    x, y = _data()
    monitor = gm.GradientMonitor(explode_threshold=1e-6, read_every=1)
    with pytest.warns(UserWarning, match="Exploding gradient at layer 'hidden'"):
        _fit(_mlp(), x, y, monitor)
    assert {a.kind for a in monitor.anomalies} == {"exploding"}
    monitor = gm.GradientMonitor(vanish_threshold=1e6, read_every=1)
    with pytest.warns(UserWarning, match="Vanishing gradient at layer 'out'"):
        _fit(_mlp(), x, y, monitor)


def test_print_mode_prints_each_layer_every_n_batches(backend):
    x, y = _data()
    stream = io.StringIO()
    monitor = gm.GradientMonitor(print_every=2, stream=stream)
    _fit(_mlp(), x, y, monitor)
    lines = stream.getvalue().splitlines()
    assert [line.split("|")[0].split() for line in lines] == [["epoch", "1", "batch", b] for b in "2244"]
    d = monitor.to_dict()
    # The printed norm of layer 'hidden' at batch 2 is the combined norm of its kernel and bias (step 1).
    combined = np.hypot(d["norm"][4], d["norm"][5])
    assert lines[0].split("|")[1].split()[:3] == ["hidden", "norm", f"{combined:.3e}"]


def test_the_training_panel_draws_the_recorded_norms(backend):
    pytest.importorskip("ipywidgets")
    from gradmagic.widgets.training_panel import TrainingPanel

    x, y = _data()
    monitor = gm.GradientMonitor()
    panel = TrainingPanel(monitor, every=1, use_ipympl=False, max_fraction=1.0, min_interval=0.0)
    _fit(_mlp(), x, y, monitor)
    steps, norms = panel._lines["out"].get_data()
    d = monitor.to_dict()
    want = [np.hypot(d["norm"][k], d["norm"][k + 1]) for k in range(2, 16, 4)]
    np.testing.assert_allclose(steps, [0, 1, 2, 3])
    np.testing.assert_allclose(norms, want, rtol=1e-6)


def test_a_log_dir_needs_tensorflow_only_off_its_backend(backend, tmp_path):
    x, y = _data()
    monitor = gm.GradientMonitor(log_dir=tmp_path)
    _fit(_mlp(), x, y, monitor)  # TensorFlow is installed here: events are written on every backend
    assert any(name.startswith("events") for name in os.listdir(tmp_path))


_DATA_PARALLEL = textwrap.dedent(
    """
    import json, sys
    import numpy as np, keras, jax
    import gradmagic as gm

    def run(distribution):
        if distribution is not None:
            keras.distribution.set_distribution(distribution)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 4)).astype("float32")
        y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")).astype("float32")
        init = keras.initializers.GlorotUniform
        hidden = keras.layers.Dense(6, activation="tanh", kernel_initializer=init(3))
        model = keras.Sequential([keras.Input((4,)), hidden, keras.layers.Dense(1, kernel_initializer=init(4))])
        model.compile(keras.optimizers.Adam(0.01), "mse")
        monitor = gm.GradientMonitor(stats="full")
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0, epochs=2, callbacks=[monitor])
        d = monitor.to_dict()
        return {k: np.asarray(d[k], float).tolist() for k in ("norm", "max_abs", "mean")}

    single = run(None)
    devices = jax.devices()
    parallel = run(keras.distribution.DataParallel(devices=devices))
    print(json.dumps({"devices": len(devices), "single": single, "parallel": parallel}))
    """
)


def test_jax_data_parallel_records_the_all_reduced_gradient(backend, tmp_path):
    if backend != "jax":
        pytest.skip("keras.distribution.DataParallel over host devices is a JAX feature")
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    script = tmp_path / "data_parallel.py"
    script.write_text(_DATA_PARALLEL)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2
    for name in ("norm", "max_abs", "mean"):
        # float32 tolerance: two devices each reduce half the batch before the all-reduce,
        # one device reduces it whole: the same gradient, summed in another order.
        np.testing.assert_allclose(result["parallel"][name], result["single"][name], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("setting", [{"steps_per_execution": 2}, {"run_eagerly": True}, {"jit_compile": False}])
def test_every_batch_is_recorded_however_keras_runs_the_step(backend, setting):
    if backend == "torch" and "steps_per_execution" in setting:
        pytest.skip("Keras on PyTorch refuses steps_per_execution > 1")
    x, y = _data()
    reference = gm.GradientMonitor(stats="full")
    _fit(_mlp(), x, y, reference)
    model = _mlp()
    model.compile(keras.optimizers.Adam(0.01), "mse", **setting)
    monitor = gm.GradientMonitor(stats="full")
    _fit(model, x, y, monitor)
    got, want = monitor.to_dict(), reference.to_dict()
    assert got["step"] == want["step"] and got["batch"] == want["batch"]
    # float32 tolerance: eager, unrolled or differently compiled steps round differently.
    np.testing.assert_allclose(got["norm"], want["norm"], rtol=1e-5)
    np.testing.assert_allclose(got["max_abs"], want["max_abs"], rtol=1e-5)


_NO_TENSORFLOW = textwrap.dedent(
    """
    import sys
    import numpy as np, keras
    import gradmagic as gm

    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("adam", "mse")
    monitor = gm.GradientMonitor(print_every=1, on_anomaly="stop")
    model.fit(x, x[:, :2], batch_size=8, verbose=0, callbacks=[monitor])
    monitor.summary()
    steps = len(monitor.to_dict()["step"])
    # A forward NaN, its origin pass on the kept batch, and histograms: still no TensorFlow.
    x[5, 2] = 0.0
    model = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda t: t / t[:, 2:]), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    monitor = gm.GradientMonitor(on_anomaly="raise", histogram_every=1)
    try:
        model.fit(x, x[:, :2], batch_size=8, shuffle=False, verbose=0, callbacks=[monitor])
    except gm.GradientAnomalyError as error:
        print(error.anomaly.origin.layer == model.layers[0].name, len(monitor.histograms))
    print(steps, "tensorflow" in sys.modules)
    """
)


def test_the_monitor_imports_no_tensorflow_off_its_backend(backend, tmp_path):
    if backend == "tensorflow":
        pytest.skip("checks the JAX and PyTorch paths")
    script = tmp_path / "no_tensorflow.py"
    script.write_text(_NO_TENSORFLOW)
    env = dict(os.environ, KERAS_BACKEND=backend)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # 2 steps x 2 weights recorded; the NaN pinned on the Lambda, 2 histograms; TensorFlow never imported.
    assert done.stdout.split()[-4:] == ["True", "2", "4", "False"]


@pytest.mark.parametrize("mode", ["full", "norm"])
def test_the_statistics_stay_exact_for_non_finite_tiny_and_huge_gradients(backend, mode):
    if backend == "tensorflow":
        pytest.skip("the TensorFlow statistics have their own tests (tests/test_monitor_stats.py)")
    import importlib

    from gradmagic.core.monitor.finish import finish_stats, square_floors

    door = importlib.import_module(f"gradmagic.core.backends.{backend}")
    grads = [
        np.array([[1e-25, -3e-25], [2e-25, 0.0]], "float32"),  # squares underflow float32
        np.array([1.0, np.nan, np.inf, -2.0, np.inf], "float32"),
        np.zeros(3, "float32"),
        np.array([3e20, -4e20], "float32"),  # squares overflow float32
        np.array([0.5, -0.25], "float32"),
    ]
    sizes = [g.size for g in grads]
    if backend == "jax":
        import jax.numpy as jnp

        tensors = [jnp.asarray(g) for g in grads]
    else:
        import torch

        tensors = [torch.as_tensor(g) for g in grads]
    floors = square_floors(sizes)
    if mode == "full":
        raw = door.full_stats(tensors, floors.astype("float32") if backend == "jax" else floors)
    elif backend == "jax":
        raw = door.norm_stats(tensors, jnp.asarray(False), floors.astype("float32"))
    else:
        raw = door.norm_stats(tensors, False, floors)
    got = finish_stats(door.host_array(raw)[None], sizes)[0]
    for row, grad in zip(got, grads, strict=True):
        wide = grad.astype(np.float64)
        finite = wide[np.isfinite(wide)]
        norm, max_abs, mean, nan, inf = row
        # Within float32 rounding of the float64 truth: the non-finite entry sends the step
        # down the exact path, which scales by max |g| before squaring.
        np.testing.assert_allclose(norm, np.sqrt(np.sum(finite**2)), rtol=1e-6)
        np.testing.assert_allclose(max_abs, np.abs(finite).max(), rtol=1e-6)
        np.testing.assert_allclose(mean, finite.mean(), rtol=1e-6, atol=1e-30)
        assert (nan, inf) == (np.isnan(wide).sum(), np.isinf(wide).sum())


def test_a_fit_after_compile_trains_with_the_new_loss_after_monitored_and_plain_fits(backend):
    # A monitored fit, then a plain one, then compile() with another loss: the next
    # fit must descend the new loss. Truth: one full-batch SGD step on the mean
    # absolute error of a linear model, written out in NumPy.
    x, y = _data(16)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, kernel_initializer="ones")])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    monitor = gm.GradientMonitor()  # kept alive, as a user's monitor is
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0, callbacks=[monitor])
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    model.compile(keras.optimizers.SGD(0.1), "mae")
    kernel, bias = (keras.ops.convert_to_numpy(w).astype(np.float64) for w in model.weights)
    sign = np.sign(x @ kernel + bias - y)
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    # float32 tolerance: Keras's compiled step against the same step in float64 NumPy.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.weights[0]), kernel - 0.1 * x.T @ sign / 16, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.weights[1]), bias - 0.1 * sign.mean(0), atol=1e-5)
