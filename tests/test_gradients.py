"""The three gradient questions against independent truths: closed forms and finite differences."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp

import gradmagic as gm
from gradmagic import examples


def _dense_model(n_in=3, n_out=2):
    model = keras.Sequential([keras.Input((n_in,)), keras.layers.Dense(n_out, name="linear")])
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_single_dense_weight_gradients_match_closed_form():
    model = _dense_model()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3)).astype("float32")
    y = rng.normal(size=(5, 2)).astype("float32")
    w, b = (v.numpy() for v in model.layers[0].weights)
    residual = x @ w + b - y
    # MSE = mean over all 5*2 entries of residual^2.
    expected_w = 2.0 / residual.size * x.T @ residual
    expected_b = 2.0 / residual.size * residual.sum(axis=0)

    r = gm.weight_gradients(model, x, y)

    np.testing.assert_allclose(r.loss, np.mean(residual**2), rtol=1e-5)
    grad_w, grad_b = r.arrays()
    np.testing.assert_allclose(grad_w, expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_b, expected_b, rtol=1e-5, atol=1e-6)
    assert [row.labels["weight"] for row in r] == ["kernel", "bias"]


def test_sample_weight_and_explicit_losses_match_closed_form():
    model = _dense_model(2, 1)
    x = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], "float32")
    y = np.array([[1.0], [0.0], [2.0]], "float32")
    sw = np.array([1.0, 0.0, 2.0], "float32")
    w, b = (v.numpy() for v in model.layers[0].weights)
    residual = x @ w + b - y  # (3, 1)

    weighted = gm.weight_gradients(model, x, y, sample_weight=sw)
    # Keras's default reduction divides the weighted sum by the number of samples.
    expected_w = 2.0 / 3.0 * x.T @ (sw[:, None] * residual)
    np.testing.assert_allclose(weighted.arrays()[0], expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weighted.loss, np.sum(sw[:, None] * residual**2) / 3.0, rtol=1e-5)

    mae = gm.weight_gradients(model, x, y, loss="mae")
    np.testing.assert_allclose(mae.arrays()[0], x.T @ np.sign(residual) / 3.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mae.loss, np.mean(np.abs(residual)), rtol=1e-5)

    def half_squares(y_true, y_pred):
        return 0.5 * keras.ops.sum((y_pred - y_true) ** 2, axis=-1)

    custom = gm.weight_gradients(model, x, y, loss=half_squares)
    np.testing.assert_allclose(custom.arrays()[0], x.T @ residual / 3.0, rtol=1e-5, atol=1e-6)
    as_object = gm.weight_gradients(model, x, y, loss=keras.losses.MeanAbsoluteError())
    np.testing.assert_allclose(as_object.arrays()[0], mae.arrays()[0], rtol=1e-6)


def test_flat_targets_are_not_broadcast_against_column_outputs():
    # y of shape (n,) against an (n, 1) output must not become an (n, n) residual.
    model = _dense_model(1, 1)
    x = np.array([[1.0], [2.0], [3.0]], "float32")
    y = np.array([0.0, 1.0, 0.5], "float32")
    w, b = (v.numpy() for v in model.layers[0].weights)
    residual = x @ w + b - y[:, None]

    def squares(y_true, y_pred):
        return keras.ops.mean((y_pred - y_true) ** 2, axis=-1)

    r = gm.weight_gradients(model, x, y, loss=squares)
    np.testing.assert_allclose(r.arrays()[0], 2.0 / 3.0 * x.T @ residual, rtol=1e-5, atol=1e-6)


def test_layer_selection_by_index_and_name_matches_full_result():
    model = mlp((3, 5, 4, 2))
    x = np.random.default_rng(0).normal(size=(6, 3)).astype("float32")
    y = np.zeros((6, 2), "float32")
    full = gm.weight_gradients(model, x, y)
    by_index = gm.weight_gradients(model, x, y, layer=1)
    by_name = gm.weight_gradients(model, x, y, layer=model.layers[1].name)
    assert len(by_index.arrays()) == 2
    for part in (by_index, by_name, full[1], full[model.layers[1].name]):
        for got, want in zip(part.arrays(), full.arrays()[2:4]):
            # One layer's gradients and every layer's are two compiled graphs: equal to float32 rounding.
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert len(full.arrays()) == len(model.trainable_weights)


def _finite_difference(f, point, eps):
    """Central differences of a scalar function at every entry of `point`."""
    grad = np.zeros_like(point)
    for index in np.ndindex(point.shape):
        step = np.zeros_like(point)
        step[index] = eps
        grad[index] = (f(point + step) - f(point - step)) / (2 * eps)
    return grad


def test_layer_output_gradients_match_finite_differences(float64):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(3, activation="sigmoid"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(loss="mse")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    hidden = model.layers[1](model.layers[0](x)).numpy()

    def loss_from_hidden(h):
        pred = model.layers[2](h).numpy()
        return np.mean((pred - y) ** 2)

    o = gm.output_gradients(model, x, y, layer=1)
    assert o.array.shape == (4, 3)
    np.testing.assert_allclose(o.output, hidden, rtol=1e-12)
    np.testing.assert_allclose(o.array, _finite_difference(loss_from_hidden, hidden, 1e-6), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(o.loss, loss_from_hidden(hidden), rtol=1e-12)


def test_input_gradient_of_fitted_regression_net_matches_finite_difference():
    model = examples.regression_net()
    x, y = examples.regression_data(256)
    model.fit(x, y, epochs=15, batch_size=32, verbose=0)
    j = gm.input_gradients(model, 0.5)
    assert j.array.shape == (1, 1, 1)
    slope = float(j.array[0, 0, 0])
    h = 1e-2
    fd = (model(np.array([[0.5 + h]])) - model(np.array([[0.5 - h]]))).numpy().item() / (2 * h)
    assert slope == pytest.approx(fd, rel=2e-3, abs=1e-4)
    analytic = float(examples.regression_slope(0.5))
    print(f"dy/dx at 0.5: gradmagic {slope:.4f}, finite difference {fd:.4f}, analytic {analytic:.4f}")
    assert np.isfinite(slope) and slope < 0 and analytic < 0


def test_input_jacobian_is_per_sample_and_vectorised(float64):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    x = np.random.default_rng(3).normal(size=(5, 3))
    j = gm.input_gradients(model, x)
    assert j.array.shape == (5, 2, 3)
    for i in range(5):
        for k in range(2):
            fd = _finite_difference(lambda p, k=k: model(p[None]).numpy()[0, k], x[i], 1e-6)
            np.testing.assert_allclose(j.array[i, k], fd, rtol=1e-6, atol=1e-9)
    unit = gm.input_gradients(model, x, output=1)
    assert unit.array.shape == (5, 3)
    np.testing.assert_allclose(unit.array, j.array[:, 1], rtol=1e-12)
    last = gm.input_gradients(model, x, output=-1)
    np.testing.assert_allclose(last.array, unit.array, rtol=1e-12)


def _two_in_two_out(dict_inputs=False):
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    joined = keras.layers.Concatenate(name="join")([a, b])
    first = keras.layers.Dense(1, name="first")(joined)
    second = keras.layers.Dense(2, name="second")(joined)
    model = keras.Model({"a": a, "b": b} if dict_inputs else [a, b], [first, second], name="two_by_two")
    model.compile(optimizer="sgd", loss=["mse", "mse"])
    return model


def test_multi_input_multi_output_jacobians_equal_the_kernels():
    model = _two_in_two_out()
    xa = np.ones((4, 2), "float32")
    xb = np.ones((4, 3), "float32")
    j = gm.input_gradients(model, [xa, xb])
    k1 = model.get_layer("first").kernel.numpy()  # (5, 1)
    k2 = model.get_layer("second").kernel.numpy()  # (5, 2)
    (ja1, jb1), (ja2, jb2) = j.array
    assert ja1.shape == (4, 1, 2) and jb1.shape == (4, 1, 3)
    np.testing.assert_allclose(ja1[0], k1[:2].T, rtol=1e-6)
    np.testing.assert_allclose(jb2[3], k2[2:].T, rtol=1e-6)
    np.testing.assert_allclose(ja2[1], k2[:2].T, rtol=1e-6)
    # Unit 2 of the concatenated flat output is unit 1 of the second output.
    unit = gm.input_gradients(model, [xa, xb], output=2)
    np.testing.assert_allclose(unit.array[1][0], k2[2:, 1], rtol=1e-6)


def test_dict_inputs_and_multi_output_loss():
    model = _two_in_two_out(dict_inputs=True)
    rng = np.random.default_rng(4)
    x = {"a": rng.normal(size=(3, 2)).astype("float32"), "b": rng.normal(size=(3, 3)).astype("float32")}
    y = [np.zeros((3, 1), "float32"), np.zeros((3, 2), "float32")]
    r = gm.weight_gradients(model, x, y)
    joined = np.concatenate([x["a"], x["b"]], axis=1)
    k1, b1 = (v.numpy() for v in model.get_layer("first").weights)
    pred1 = joined @ k1 + b1
    # Total loss = mse(first) + mse(second): d/dk1 only sees the first term.
    np.testing.assert_allclose(r["first"].arrays()[0], 2.0 / pred1.size * joined.T @ pred1, rtol=1e-5, atol=1e-6)
    j = gm.input_gradients(model, x)
    assert set(j.array[0]) == {"a", "b"}
    np.testing.assert_allclose(j.array[0]["b"][0], k1[2:].T, rtol=1e-6)


def test_subclassed_model_weight_output_and_input_gradients(float64):
    class Residual(keras.Model):
        def __init__(self):
            super().__init__(name="residual")
            self.inner = keras.layers.Dense(3, activation="tanh", name="inner")
            self.head = keras.layers.Dense(1, name="head")

        def call(self, x):
            return self.head(self.inner(x) + x)

    model = Residual()
    model.compile(loss="mse")
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 1))
    r = gm.weight_gradients(model, x, y)  # builds the model from x
    assert len(r.arrays()) == 4
    hidden = model.inner(x).numpy()
    kernel, bias = (v.numpy() for v in model.head.weights)

    def loss_from_inner(h):
        return np.mean(((h + x) @ kernel + bias - y) ** 2)

    o = gm.output_gradients(model, x, y, layer="inner")
    np.testing.assert_allclose(o.array, _finite_difference(loss_from_inner, hidden, 1e-6), rtol=1e-6, atol=1e-10)
    j = gm.input_gradients(model, x, output=0)
    fd = _finite_difference(lambda p: model(p[None]).numpy()[0, 0], x[2], 1e-6)
    np.testing.assert_allclose(j.array[2], fd, rtol=1e-6, atol=1e-9)


def test_lambda_layer_gradients_flow_through_its_function(float64):
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(3, name="pre"),
            keras.layers.Lambda(lambda t: t**2, name="square"),
            keras.layers.Dense(1, name="post"),
        ]
    )
    model.compile(loss="mse")
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(3, 2)), rng.normal(size=(3, 1))
    pre = model.layers[0](x).numpy()
    kernel, bias = (v.numpy() for v in model.layers[2].weights)

    def loss_from_pre(h):
        return np.mean((h**2 @ kernel + bias - y) ** 2)

    o = gm.output_gradients(model, x, y, layer="pre")
    np.testing.assert_allclose(o.array, _finite_difference(loss_from_pre, pre, 1e-6), rtol=1e-6, atol=1e-10)
    lam = gm.output_gradients(model, x, y, layer="square")
    np.testing.assert_allclose(o.array, lam.array * 2 * pre, rtol=1e-9)


def test_input_layer_of_functional_model_gives_loss_gradient_wrt_input():
    inputs = keras.Input((2,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(inputs))
    model.compile(loss="mse")
    x = np.array([[1.0, 2.0], [0.0, 1.0]], "float32")
    y = np.zeros((2, 1), "float32")
    o = gm.output_gradients(model, x, y, layer=0)
    kernel, bias = (v.numpy() for v in model.layers[1].weights)
    pred = x @ kernel + bias
    np.testing.assert_allclose(o.array, 2.0 / 2 * pred @ kernel.T, rtol=1e-5)


def test_disconnected_weights_are_reported_not_raised():
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(3, name="cut_off"),
            keras.layers.Lambda(tf.stop_gradient, name="stop"),
            keras.layers.Dense(1, name="head"),
        ]
    )
    model.compile(loss="mse")
    x, y = np.ones((2, 2), "float32"), np.zeros((2, 1), "float32")
    r = gm.weight_gradients(model, x, y)
    arrays = r.arrays()
    assert arrays[0] is None and arrays[1] is None
    assert arrays[2] is not None
    assert [row.labels["weight"] for row in r if row.disconnected] == ["kernel", "bias"]
    assert all(row.labels["layer"] == "cut_off" for row in r if row.disconnected)
    assert "gm-disconnected" in r._repr_html_() and "disconnected" in repr(r)
    o = gm.output_gradients(model, x, y, layer="cut_off")
    assert o.array is None and o.disconnected


def test_nan_gradients_are_counted_per_weight():
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(2, name="d"),
            keras.layers.Lambda(lambda t: t / 0.0),
            keras.layers.Dense(1),
        ]
    )
    model.compile(loss="mse")
    r = gm.weight_gradients(model, np.ones((2, 1), "float32"), np.zeros((2, 1), "float32"))
    stats = r["d"].stats
    assert stats[0].nan + stats[0].inf == 2
    assert "gm-nonfinite" in r._repr_html_()


def test_training_flag_changes_dropout_but_not_inference():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dropout(0.5), keras.layers.Dense(1)]
    )
    model.compile(loss="mse")
    x, y = np.ones((3, 4), "float32"), np.zeros((3, 1), "float32")
    inference = gm.weight_gradients(model, x, y)
    again = gm.weight_gradients(model, x, y)
    trained = gm.weight_gradients(model, x, y, training=True)
    # Exact on purpose: the same cached compiled function re-run on the same inputs.
    np.testing.assert_array_equal(inference.arrays()[0], again.arrays()[0])
    assert not np.allclose(inference.arrays()[0], trained.arrays()[0])
    # State is restored after each call, so the same dropout mask is drawn again (same graph: exact).
    np.testing.assert_array_equal(trained.arrays()[0], gm.weight_gradients(model, x, y, training=True).arrays()[0])


def test_inputs_as_lists_tensors_and_single_samples_agree():
    model = mlp((2, 3, 1))
    as_array = gm.input_gradients(model, np.array([[0.5, -1.0]], "float32")).array
    for variant in ([0.5, -1.0], [[0.5, -1.0]], tf.constant([0.5, -1.0]), np.array([0.5, -1.0], "float64")):
        np.testing.assert_allclose(gm.input_gradients(model, variant).array, as_array, rtol=1e-6)


def test_unbuilt_sequential_is_built_from_x():
    model = keras.Sequential([keras.layers.Dense(2), keras.layers.Dense(1)])
    model.compile(loss="mse")
    r = gm.weight_gradients(model, np.ones((3, 4), "float32"), np.zeros((3, 1), "float32"))
    assert [a.shape for a in r.arrays()] == [(4, 2), (2,), (2, 1), (1,)]


def test_repeated_calls_do_not_retrace():
    from gradmagic.core.questions import compute

    model = mlp()
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    for _ in range(5):
        gm.weight_gradients(model, x, y)
    ((question, _),) = [q for k, q in compute._cache[model].items() if k[0] == "weights"]
    assert question.fn.experimental_get_tracing_count() == 1
    for value in np.linspace(0, 1, 5):
        gm.input_gradients(model, np.full((1, 3), value, "float32"))
    ((question, _),) = [q for k, q in compute._cache[model].items() if k[0] == "input"]
    assert question.fn.experimental_get_tracing_count() == 1


def test_input_gradients_carry_the_output_values():
    model = mlp((2, 3, 2))
    x = np.array([[0.1, 0.2], [0.3, -0.4]], "float32")
    j = gm.input_gradients(model, x)
    # Compiled Jacobian graph against an eager call: equal to float32 rounding, not bit for bit.
    np.testing.assert_allclose(j.values, model(x).numpy(), rtol=1e-5, atol=1e-7)


def test_weight_gradients_of_one_output_unit_need_no_targets():
    model = _dense_model(3, 2)
    x = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]], "float32")
    r = gm.weight_gradients(model, x, None, output=1)
    # d mean_b(x_b . w[:, 1] + b[1]) / dW is the mean input in column 1, zero elsewhere.
    expected = np.zeros((3, 2), "float32")
    expected[:, 1] = x.mean(axis=0)
    np.testing.assert_allclose(r.arrays()[0], expected, rtol=1e-6)
    np.testing.assert_allclose(r.arrays()[1], [0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(r.loss, model(x).numpy()[:, 1].mean(), rtol=1e-6)
    with pytest.raises(gm.GradmagicError, match=r"output=2.*\[0, 1\]"):
        gm.weight_gradients(model, x, None, output=2)


def test_numpy_inside_a_lambda_gets_the_tracing_explanation():
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(2), keras.layers.Lambda(lambda t: np.round(t)), keras.layers.Dense(1)]
    )
    model.compile(loss="mse")
    with pytest.raises(gm.GradmagicError, match=r"calls NumPy on a tensor.*tf\.round"):
        gm.weight_gradients(model, np.ones((2, 2)), np.zeros((2, 1)))


def test_freezing_a_layer_is_seen_by_the_next_call():
    model = mlp((3, 4, 2))
    x, y = np.ones((2, 3), "float32"), np.zeros((2, 2), "float32")
    assert len(gm.weight_gradients(model, x, y).arrays()) == 4
    model.layers[0].trainable = False
    r = gm.weight_gradients(model, x, y)
    assert r.paths == [v.path for v in model.trainable_weights] and len(r.arrays()) == 2


# --- loss precision and gradient types ---

X6 = np.random.default_rng(7).normal(size=(6, 3)).astype("float32")


def test_mixed_precision_losses_are_not_rounded_or_overflowed():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        inputs = keras.Input((3,))
        hidden = keras.layers.Dense(4)(inputs)
        model = keras.Model(inputs, keras.layers.Dense(1, dtype="float32")(hidden))
        model.compile(loss="mse")
    finally:
        keras.config.set_dtype_policy(previous)
    y = np.full((6, 1), 300.123, "float32")  # large, with digits float16 cannot hold
    pred = model(X6)
    keras_loss = float(model.compute_loss(x=X6, y=y, y_pred=pred))
    assert gm.weight_gradients(model, X6, y).loss == pytest.approx(keras_loss, rel=1e-6)
    explicit = gm.weight_gradients(model, X6, y, loss="mse")
    assert np.isfinite(explicit.loss) and explicit.loss == pytest.approx(keras_loss, rel=1e-6)


def test_embedding_weight_gradients_are_dense_arrays():
    model = keras.Sequential(
        [keras.Input((4,), dtype="int32"), keras.layers.Embedding(10, 3), keras.layers.Flatten(), keras.layers.Dense(1)]
    )
    model.compile(loss="mse")
    ids, y = np.array([[1, 2, 3, 1], [4, 4, 0, 9]]), np.zeros((2, 1), "float32")
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=ids, y=y, y_pred=model(ids))
    expected = tf.convert_to_tensor(tape.gradient(loss, model.trainable_weights[0])).numpy()
    table = gm.weight_gradients(model, ids, y).arrays()[0]
    np.testing.assert_allclose(table, expected, rtol=1e-6)
    assert table.shape == (10, 3) and not table[5:9].any()  # rows never looked up get exactly 0
