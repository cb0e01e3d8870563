"""explain(): ops per layer, gradient verdicts and disconnected weights, against TensorFlow's own tape."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_unchanged, fingerprint

import gradmagic as gm
from gradmagic.core.diagnose.explain import explain
from gradmagic.errors import ComputeError

X = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
Y = np.random.default_rng(1).normal(size=(4, 2)).astype("float32")


def _numpy_round(t):
    # tf.numpy_function loses the static shape; restoring it lets the next Dense build.
    return tf.ensure_shape(tf.numpy_function(np.round, [t], tf.float32), t.shape)


def _int_round_trip(t):
    return tf.cast(tf.cast(t * 3.0, tf.int32), tf.float32)


def _one_hot_argmax(t):
    return tf.one_hot(tf.argmax(t, axis=-1), 3)


def _lambda_model(fn, functional=False):
    """Dense 'pre' -> Lambda 'lam' -> Dense 'post'; compiled with MSE."""
    layers = [
        keras.layers.Dense(3, name="pre"),
        keras.layers.Lambda(fn, output_shape=(3,), name="lam"),
        keras.layers.Dense(2, name="post"),
    ]
    if functional:
        inputs = keras.Input((3,), name="x")
        h = inputs
        for layer in layers:
            h = layer(h)
        model = keras.Model(inputs, h)
    else:
        model = keras.Sequential([keras.Input((3,)), *layers])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _tape_disconnected(model, x, y=None):
    """Truth from TensorFlow directly: paths of weights whose gradient is None or all zero."""
    with tf.GradientTape() as tape:
        out = model(x, training=False)
        target = tf.reduce_sum(out) if y is None else keras.losses.mean_squared_error(y, out)
        target = tf.reduce_mean(target)
    grads = tape.gradient(target, model.trainable_weights)
    return {v.path for v, g in zip(model.trainable_weights, grads, strict=True) if g is None or not np.any(g)}


BLOCKING = [
    pytest.param(tf.round, "Round", "no gradient", "round", id="round"),
    pytest.param(_one_hot_argmax, "ArgMax", "no gradient", "_one_hot_argmax", id="argmax"),
    pytest.param(_int_round_trip, "Cast", "no gradient", "_int_round_trip", id="cast-int"),
    pytest.param(lambda t: tf.stop_gradient(t), "StopGradient", "no gradient", "<lambda>", id="stop_gradient"),
    pytest.param(_numpy_round, "PyFunc", "no gradient", "_numpy_round", id="numpy_function"),
    pytest.param(tf.sign, "Sign", "zero gradient", "sign", id="sign"),
]


@pytest.mark.parametrize(("fn", "op", "verdict", "fn_name"), BLOCKING)
def test_blocking_lambda_is_flagged_on_its_layer_and_op(fn, op, verdict, fn_name):
    model = _lambda_model(fn)
    before = fingerprint(model)
    truth = _tape_disconnected(model, X)

    e = explain(model, X)

    assert [r.name for r in e.blocked] == ["lam"]
    lam = e["lam"]
    assert (lam.verdict, lam.op, lam.function) == (verdict, op, fn_name)
    assert op in lam.ops_text() and f"{op}!" in lam.ops_text()
    assert lam.op_name.split("/")[-1].startswith(op)
    assert e["pre"].verdict == e["post"].verdict == "flows"
    assert lam.observed == verdict
    # The weights TensorFlow itself gives no gradient are exactly those reported, cut at 'lam' by that op.
    assert truth == {f"{model.name}/pre/kernel", f"{model.name}/pre/bias"}
    assert {d.path for d in e.disconnected} == truth
    assert {(d.cut_index, d.cut_layer, d.cut_op) for d in e.disconnected} == {(1, "lam", op)}
    assert {d.gradient for d in e.disconnected} == {"zero" if verdict == "zero gradient" else "None"}
    assert_unchanged(model, before)


def test_blocking_lambda_with_loss_uses_the_core_and_names_the_cut():
    model = _lambda_model(tf.round, functional=True)
    before = fingerprint(model)
    truth = _tape_disconnected(model, X, Y)
    core = gm.weight_gradients(model, X, Y)

    e = explain(model, X, Y)

    assert e.target == "loss"
    np.testing.assert_allclose(e.value, core.loss, rtol=1e-6)
    assert [r.name for r in e.layers] == [layer.name for layer in model.layers]
    assert e.layers[0].verdict == "input" and e.layers[0].type == "InputLayer"
    assert {d.path for d in e.disconnected} == truth == {p for p, g in zip(core.paths, core.arrays()) if g is None}
    assert {(d.index, d.cut_index, d.cut_op) for d in e.disconnected} == {(1, 2, "Round")}
    assert_unchanged(model, before)


@pytest.mark.parametrize(("fn", "fn_name", "op"), [(lambda t: t * 2.0, "<lambda>", "Mul"), (tf.sin, "sin", "Sin")])
def test_healthy_lambda_flows(fn, fn_name, op):
    model = _lambda_model(fn)
    before = fingerprint(model)

    e = explain(model, X, Y)

    assert [r.verdict for r in e.layers] == ["flows"] * 3
    assert [r.observed for r in e.layers] == ["flows"] * 3
    assert e["lam"].function == fn_name and e["lam"].op is None
    assert [(i.type, i.gradient, i.on_path) for i in e["lam"].ops if i.type == op] == [(op, "flows", True)]
    assert "MatMul" in e["pre"].ops_text() and "!" not in e["pre"].ops_text()
    assert e.disconnected == [] == sorted(_tape_disconnected(model, X, Y))
    assert_unchanged(model, before)


def test_where_keeps_a_path_although_it_contains_round():
    # tf.where(t > 0, round(t), t): the second branch still carries the gradient.
    model = _lambda_model(lambda t: tf.where(t > 0, tf.round(t), t))
    e = explain(model, X)
    assert e["lam"].verdict == "flows"
    assert "Round!" in e["lam"].ops_text()  # on the path, and it blocks its own branch


class _Quantize(keras.layers.Layer):
    """A custom layer with a weight whose only use goes through Round."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

    def call(self, t):
        return tf.round(t * self.scale)


def test_custom_layer_cutting_its_own_weight():
    model = keras.Sequential([keras.Input((3,)), _Quantize(name="quant"), keras.layers.Dense(2, name="head")])
    truth = _tape_disconnected(model, X)

    e = explain(model, X)

    assert (e["quant"].verdict, e["quant"].op, e["quant"].function) == ("no gradient", "Round", None)
    assert truth == {d.path for d in e.disconnected} == {f"{model.name}/quant/scale"}
    assert (e.disconnected[0].cut_layer, e.disconnected[0].cut_op) == ("quant", "Round")


def test_zero_gradient_from_the_data_is_not_blamed_on_an_op():
    # Every pre-activation is -1 (zero kernel, bias -1), so ReLU is inactive for every sample.
    dead = keras.layers.Dense(2, "relu", kernel_initializer="zeros", bias_initializer=keras.initializers.Constant(-1))
    model = keras.Sequential([keras.Input((3,)), dead, keras.layers.Dense(1, name="head")])
    truth = _tape_disconnected(model, X)

    e = explain(model, X)

    assert e.blocked == []
    assert e.layers[0].observed == "zero gradient"
    assert {d.path for d in e.disconnected} == truth
    assert all(d.cut_op is None and "zero for this data" in d.reason for d in e.disconnected)


def test_batchnorm_and_dropout_in_training_mode_leave_the_model_unchanged():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(2),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    model.fit(X, Y, epochs=1, verbose=0)  # optimizer state and BN statistics that must survive
    before = fingerprint(model)

    e = explain(model, X, Y, training=True)

    assert [r.verdict for r in e.layers] == ["flows"] * 4
    assert_unchanged(model, before)


def test_nested_model_and_shared_layer():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3), keras.layers.Lambda(tf.stop_gradient)])
    shared = keras.layers.Dense(3, name="shared")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(inner(shared(shared(inputs)))))

    e = explain(model, X)

    assert e["shared"].calls == 2 and e["shared"].ops_text().count("MatMul×2") == 1
    assert (e[2].verdict, e[2].op) == ("no gradient", "StopGradient")
    assert {d.path for d in e.disconnected} == _tape_disconnected(model, X)


def test_prevent_gradient_is_explained_although_autodiff_raises():
    model = _lambda_model(lambda t: tf.raw_ops.PreventGradient(input=t, message="frozen"))
    with pytest.raises(LookupError):  # TensorFlow's own behaviour
        with tf.GradientTape() as tape:
            out = model(X)
        tape.gradient(out, model.trainable_weights)

    e = explain(model, X, Y)

    assert (e["lam"].verdict, e["lam"].op) == ("no gradient", "PreventGradient")
    assert any("could not compute the gradient" in n for n in e.notes)
    assert {(d.layer, d.cut_op) for d in e.disconnected} == {("pre", "PreventGradient")}


def _branchy(t):
    if t > 0:  # Python `if` on a tensor: fails when traced
        return t
    return -t


@pytest.mark.parametrize(
    ("fn", "fn_name", "expected"),
    [
        (_branchy, "_branchy", ["Python control flow", "tf.where", "keras.ops.where", "tf.cond", "AutoGraph"]),
        (
            lambda t: np.round(t),
            "<lambda>",
            ["NumPy", "tf.round", "keras.ops", "tf.numpy_function", "stops the gradient"],
        ),
    ],
)
def test_classic_lambda_mistakes_get_a_clear_message(fn, fn_name, expected):
    model = _lambda_model(fn)
    before = fingerprint(model)
    with pytest.raises(ComputeError) as info:
        explain(model, X)
    message = str(info.value)
    assert message.startswith(f"Layer 1 'lam' (Lambda, function {fn_name!r}) of model '{model.name}'")
    assert all(word in message for word in expected), message
    assert "\n" not in message and "File " not in message
    assert isinstance(info.value, gm.GradmagicError)
    assert_unchanged(model, before)


def test_result_tables_and_dict():
    model = _lambda_model(tf.round)
    e = explain(model, X)

    columns = e.to_dict()["layers"]
    assert len({len(v) for v in columns.values()}) == 1
    assert columns["layer"] == ["pre", "lam", "post"]
    assert columns["verdict"] == ["flows", "no gradient", "flows"]
    assert e.to_dict()["disconnected"]["cut_op"] == ["Round", "Round"]
    text = repr(e)
    assert "lam" in text and "Round!" in text and "Disconnected weights" in text
    page = e._repr_html_()
    assert page.count('class="gm-no-gradient"') == 1 and "<table" in page and "Round" in page
    with pytest.raises(gm.GradmagicError, match="'pre', 'lam', 'post'"):
        e["nope"]


def test_bad_arguments_are_reported_before_tracing():
    model = _lambda_model(tf.sin)
    with pytest.raises(gm.GradmagicError, match="samples"):
        explain(model, X, Y[:2])
    with pytest.raises(gm.GradmagicError, match="not a Keras loss"):
        explain(model, X, Y, loss="msee")


def test_cut_in_the_loss_or_in_the_models_own_call():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])

    def rounded_mse(y_true, y_pred):
        return tf.reduce_mean((tf.round(y_pred) - y_true) ** 2, axis=-1)

    e = explain(model, X, Y, loss=rounded_mse)
    assert e.blocked == []  # no layer is to blame
    assert {(d.cut_index, d.cut_layer, d.cut_op) for d in e.disconnected} == {(None, "loss", "Round")}
    assert "cut in the loss by op Round" in repr(e)

    class Floored(keras.Model):
        def __init__(self):
            super().__init__(name="floored")
            self.first, self.second = keras.layers.Dense(3), keras.layers.Dense(2)

        def call(self, t):
            return self.second(tf.floor(self.first(t)))  # the Floor belongs to no layer

    sub = Floored()
    sub(X)
    e = explain(sub, X)
    assert {d.path for d in e.disconnected} == _tape_disconnected(sub, X)
    assert {(d.cut_index, d.cut_layer, d.cut_op) for d in e.disconnected} == {(None, "floored", "Floor")}
    assert "cut in the call of model 'floored' itself by op Floor" in repr(e)


def test_public_names_stay_importable_from_the_explain_module():
    from gradmagic.core.diagnose import explain as module
    from gradmagic.core.diagnose import explanation

    for name in ("Explanation", "LayerPath", "OpInfo", "DisconnectedWeight"):
        assert getattr(module, name) is getattr(explanation, name)
    assert module.explain is gm.explain and module.Explanation is gm.Explanation


def test_nan_from_an_unpicked_where_branch_is_pinned_on_its_layer():
    inputs = keras.Input((2,))
    hidden = keras.layers.Dense(3, name="hidden")(inputs)
    # tf.where picks 0 where the divisor is 0, but the gradient of the other branch is still NaN there.
    divide = keras.layers.Lambda(lambda t: tf.where(t[1][:, :1] == 0.0, 0.0, t[0] / t[1][:, :1]), name="divide")(
        [hidden, inputs]
    )
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(divide))
    model.compile(loss="mse")
    x = np.array([[1.0, 2.0], [0.0, 1.0]], "float32")  # the divisor column is 0 in sample 2
    explanation = explain(model, x, np.zeros((2, 1), "float32"))
    observed = {row["layer"]: row["observed"] for row in _rows(explanation)}
    assert observed["divide"] == "NaN/Inf starts here"
    assert observed["hidden"] == "NaN/Inf" and observed["head"] == "flows"
    # The core agrees: dLoss/d(output of hidden) has NaN, dLoss/d(output of divide) has none.
    assert np.isnan(gm.output_gradients(model, x, np.zeros((2, 1)), layer="hidden").array).any()
    assert np.isfinite(gm.output_gradients(model, x, np.zeros((2, 1)), layer="divide").array).all()


def _rows(explanation):
    columns = explanation.to_dict()["layers"]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


# --- sample weights, and the batch a GradientMonitor kept -------------------------------------------------------


def _forward_division_model() -> keras.Model:
    """d1 -> Lambda dividing by input column 0, unguarded (Inf/NaN in the forward pass) -> out."""
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh", name="d1")(inputs)
    divided = keras.layers.Lambda(lambda t: t[0] / t[1][:, :1], name="divide")([hidden, inputs])
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(divided))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def test_sample_weights_weigh_the_loss_and_its_gradient():
    model = _forward_division_model()
    x = np.random.default_rng(2).uniform(0.5, 1.5, (4, 3)).astype("float32")  # no zero divisor
    y = np.random.default_rng(3).normal(size=(4, 1)).astype("float32")
    sw = np.array([1.0, 0.0, 2.0, 0.5], "float32")
    weighted = gm.explain(model, x, y, sample_weight=sw, verbose=False)
    # Independent truth: Keras's own weighted MSE (the mean over the batch of sw * squared error).
    want = float(np.mean(sw * np.mean((model.predict(x, verbose=0) - y) ** 2, axis=-1)))
    # The compiled graph and predict's graph round differently in float32: equal to round-off.
    assert weighted.value == pytest.approx(want, rel=1e-5)
    assert gm.explain(model, x, y, verbose=False).value != pytest.approx(want, rel=1e-3)
    # All-zero weights make the loss 0 everywhere: every weight's gradient is exactly zero.
    zero = gm.explain(model, x, y, sample_weight=np.zeros(4, "float32"), verbose=False)
    assert zero.value == 0.0
    assert sorted((d.layer, d.gradient) for d in zero.disconnected) == [("d1", "zero")] * 2 + [("out", "zero")] * 2


@pytest.mark.parametrize("diagnosis", [gm.explain, gm.check_gradients])
def test_sample_weights_in_the_place_of_the_loss_get_a_clear_message(diagnosis):
    model = _forward_division_model()
    y = np.zeros((4, 1), "float32")
    with pytest.raises(gm.GradmagicError, match=r"loss=<float32 array of shape \(4,\)>.*sample_weight=sw") as info:
        diagnosis(model, X, y, np.ones(4, "float32"))
    assert "\n" not in str(info.value) and diagnosis.__name__ in str(info.value)


def test_sample_weight_without_y_is_refused():
    with pytest.raises(gm.GradmagicError, match="sample_weight without y"):
        gm.explain(_forward_division_model(), X, sample_weight=np.ones(4, "float32"))


def test_the_batch_a_monitor_kept_with_sample_weights_explains_the_division():
    model = _forward_division_model()
    rng = np.random.default_rng(4)
    x = rng.uniform(0.5, 1.5, (32, 3)).astype("float32")
    x[20, 0] = 0.0  # row 20 divides by zero: the third batch of 8 goes non-finite
    y = rng.normal(size=(32, 1)).astype("float32")
    sample_weight = np.linspace(0.5, 2.0, 32).astype("float32")
    monitor = gm.GradientMonitor(on_anomaly="raise")
    with pytest.raises(gm.GradientAnomalyError):
        model.fit(x, y, sample_weight=sample_weight, batch_size=8, epochs=1, shuffle=False, verbose=0,
                  callbacks=[monitor])  # fmt: skip
    bx, by, bw = monitor.bad_batch
    np.testing.assert_array_equal(bw, sample_weight[16:24])
    model.set_weights(monitor.bad_step_weights)
    before = fingerprint(model)
    e = gm.explain(model, bx, by, sample_weight=bw, verbose=False)
    assert_unchanged(model, before)
    first = e.nonfinite[0]
    assert (first.op_type, first.layer, first.backward) == ("RealDiv", "divide", False)
    assert not np.isfinite(e.value)
    check = gm.check_gradients(model, bx[:2], by[:2], sample_weight=bw[:2], verbose=False)  # rows 16, 17: finite
    assert check.passed, check
