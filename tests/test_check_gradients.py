"""check_gradients(): finite differences against autodiff, on models whose right answer is known."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Opaque, assert_unchanged, fingerprint

import gradmagic as gm
from gradmagic.core.diagnose.gradcheck import check_gradients

RNG = np.random.default_rng(0)
X = RNG.normal(size=(5, 3)).astype("float32")
Y = RNG.normal(size=(5, 2)).astype("float32")


def _square_with_gradient_times(factor):
    @tf.custom_gradient
    def square(t):
        def grad(upstream):
            return upstream * 2.0 * t * factor  # factor 1: the true derivative of t**2

        return t * t, grad

    return square


@keras.saving.register_keras_serializable(package="gradmagic_tests")
class CustomSquare(keras.layers.Layer):
    """t**2 with a hand-written gradient, scaled by ``factor`` (1 is correct)."""

    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, t):
        return _square_with_gradient_times(self.factor)(t)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


class NoConfig(keras.layers.Layer):
    """A custom layer without get_config whose constructor takes no **kwargs: rebuilt from its own arguments."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def call(self, t):
        return tf.tanh(t) * self.scale


def _model(factor=1.0, width=4):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(width, activation="tanh", name="first"),
            keras.layers.Lambda(lambda t: tf.sin(t) * 2.0, name="lam"),
            CustomSquare(factor, name="square"),
            keras.layers.Dense(2, name="last"),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    return model


def test_healthy_model_with_lambda_and_custom_gradient_passes_in_float64():
    model = _model()
    model.fit(X, Y, epochs=1, verbose=0)  # optimizer state too must be left alone
    before = fingerprint(model)

    c = check_gradients(model, X, Y, max_directions=16)  # every entry of these small rows

    assert c.passed and c.dtype == "float64" and c.notes == []
    assert c.max_rel_error < 1e-6
    assert [(r.index, r.name, r.what) for r in c.rows] == [(0, "first", "kernel, bias"), (3, "last", "kernel, bias"),
                                                           (None, "x", "input")]  # fmt: skip
    assert all(r.mode == "every entry" and r.directions == r.size for r in c.rows)
    np.testing.assert_allclose(c.loss, gm.weight_gradients(model, X, Y).loss, rtol=1e-5)
    # The default: 4 random unit directions per row larger than that, and the same verdict.
    default = check_gradients(model, X, Y)
    assert default.passed and default.max_rel_error < 1e-6
    assert all(r.directions == min(r.size, 4) for r in default.rows)
    assert_unchanged(model, before)


def test_wrong_custom_gradient_fails_by_the_predicted_amount():
    model = _model(factor=3.0)
    before = fingerprint(model)

    c = check_gradients(model, X, Y)

    assert not c.passed
    rows = {r.name: r for r in c.rows}
    # Autodiff is exactly 3x the true gradient upstream of the square, so ||a - f|| = 2/3 ||a||, which
    # counts against the larger of the row's gradient and 1/100 of the model's whole gradient (autodiff's own).
    grads = gm.weight_gradients(model, X, Y)
    first = np.sqrt(sum(np.sum(g**2) for g in grads[0].arrays()))
    whole = np.sqrt(sum(np.sum(g**2) for g in grads.arrays()))
    assert rows["first"].rel_error == pytest.approx(2 / 3 * first / max(first, whole / 100), rel=1e-4)
    assert rows["x"].rel_error == pytest.approx(2 / 3, rel=1e-5)  # the only input: its row is the whole
    assert rows["last"].passed and rows["last"].rel_error < 1e-6  # downstream of the bug
    assert c.max_rel_error == pytest.approx(2 / 3, rel=1e-5)
    assert all(r.status in ("ok", "FAIL") for r in c.rows)  # a smooth model: a wrong derivative is no kink
    assert [r.name for r in c.failed] == ["first", "x"]
    assert c.suspects == ["0 'first'", "1 'lam'", "2 'square'"]
    text = repr(c)
    assert "FAILED" in text and "FAIL" in text and "2 'square'" in text
    assert c._repr_html_().count('class="gm-failed"') == 2
    assert_unchanged(model, before)


def test_big_weights_use_random_directions_with_bounded_cost():
    passes = tf.Variable(0, dtype="int64")

    def counting(t):
        passes.assign_add(1)  # a stateful op: runs on every forward pass of a compiled function
        return t

    model = _model(width=64)  # first layer: 3*64 + 64 = 256 entries, last: 64*2 + 2 = 130
    model = keras.Sequential([keras.Input((3,)), *model.layers, keras.layers.Lambda(counting, output_shape=(2,))])

    check = check_gradients(model, X, Y, loss="mse", max_directions=8, seed=3)

    assert [(r.size, r.directions, r.mode) for r in check.rows] == [
        (256, 8, "random directions"),
        (130, 8, "random directions"),
        (15, 8, "random directions"),
    ]
    assert check.passed, check
    # 2 forward passes per direction (3 rows x 8 directions), plus one autodiff pass and one loss
    # evaluation each of the model and of its float64 copy to compare them, plus 6 passes that
    # measure the loss's round-off.
    assert int(passes.numpy()) == 2 * 8 * 3 + 3 + 6
    wrong = _model(factor=3.0, width=64)
    wrong.set_weights(model.get_weights())
    bad = check_gradients(wrong, X, Y, max_directions=8, seed=3)
    # ||a - f|| = 2/3 ||a|| along any direction; the denominator is at least ||a|| (more when the
    # model's whole gradient, seen through 8 directions of 256, is larger than this row's).
    assert not bad.rows[0].passed and 0.1 < bad.rows[0].rel_error <= 2 / 3 + 1e-9


def test_functional_model_with_two_inputs():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    merged = keras.layers.Concatenate()([keras.layers.Dense(2, activation="tanh")(a), b])
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(2)(merged))

    c = check_gradients(model, {"a": X, "b": X[:, :2]}, Y, loss="mse")

    assert c.passed and c.dtype == "float64"
    assert [r.name for r in c.rows if r.index is None] == ["x['a']", "x['b']"]


def test_float32_fallback_restores_the_perturbed_weights_bit_for_bit():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="first"), Opaque(lambda t: tf.tanh(t) * 2)])
    model.compile(optimizer="sgd", loss="mse")
    before = fingerprint(model)

    with pytest.warns(UserWarning, match="float32"):
        c = check_gradients(model, X, X[:, :1].repeat(4, axis=1))

    assert c.dtype == "float32" and c.tol == 1e-2 and c.epsilon == 1e-3
    assert "float64 copy of the model was not possible" in c.notes[0]
    assert c.passed, c
    assert_unchanged(model, before)


def test_custom_layer_without_get_config_is_rebuilt_from_its_arguments():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="first"), NoConfig(2.0)])
    model.compile(optimizer="sgd", loss="mse")
    c = check_gradients(model, X, X[:, :1].repeat(4, axis=1))
    assert c.passed and c.dtype == "float64" and c.notes == []
    np.testing.assert_allclose(c.loss, gm.weight_gradients(model, X, X[:, :1].repeat(4, axis=1)).loss, rtol=1e-5)


def test_subclassed_model_falls_back_to_float32():
    class Tiny(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, t):
            return tf.tanh(self.dense(t))

    model = Tiny()
    model(X)
    before = fingerprint(model)
    with pytest.warns(UserWarning):
        c = check_gradients(model, X, Y, loss="mse")
    assert c.passed and c.dtype == "float32"
    assert_unchanged(model, before)


def test_stop_gradient_fails_the_check_as_documented():
    # The finite difference sees the function; autodiff sees a gradient of zero: they disagree.
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(3, name="pre"),
            keras.layers.Lambda(tf.stop_gradient),
            keras.layers.Dense(2),
        ]
    )
    c = check_gradients(model, X, Y, loss="mse")
    assert [r.name for r in c.failed] == ["pre", "x"]
    assert c.rows[0].rel_error == pytest.approx(1.0)


def test_to_dict_and_arguments():
    model = _model()
    columns = check_gradients(model, X, Y, max_directions=4).to_dict()
    assert len({len(v) for v in columns.values()}) == 1 and columns["passed"] == [True] * 3
    for bad in ({"tol": 0}, {"epsilon": -1.0}, {"max_directions": 0}):
        with pytest.raises(gm.GradmagicError, match=next(iter(bad))):
            check_gradients(model, X, Y, **bad)
    with pytest.raises(gm.GradmagicError, match="no compiled loss"):
        check_gradients(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), X, Y)


def test_classic_lambda_mistake_is_named():
    def branchy(t):
        if t > 0:
            return t
        return -t

    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(3), keras.layers.Lambda(branchy, output_shape=(3,), name="lam")]
    )
    with pytest.raises(gm.GradmagicError, match=r"Layer 1 'lam' \(Lambda, function 'branchy'\).*tf\.where"):
        check_gradients(model, X, X, loss="mse")


def test_embedding_gradients_are_checked_and_integer_inputs_skipped():
    ids = np.array([[1, 2, 3], [0, 4, 2]])
    model = keras.Sequential(
        [keras.Input((3,), dtype="int32"), keras.layers.Embedding(5, 2), keras.layers.Flatten(), keras.layers.Dense(1)]
    )
    c = check_gradients(model, ids, np.ones((2, 1), "float32"), loss="mse")
    assert c.passed and c.dtype == "float64"
    assert [r.what for r in c.rows] == ["embeddings", "kernel, bias"]  # no row for the integer input


def test_layer_hard_coding_float32_falls_back_with_the_reason():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(3), keras.layers.Lambda(lambda t: t + tf.constant(1.0, tf.float32))]
    )
    with pytest.warns(UserWarning, match="float32"):
        c = check_gradients(model, X, X, loss="mse")
    assert c.dtype == "float32" and c.passed
    assert "AddV2" in c.notes[0]  # the op that mixed float32 into the float64 copy


def test_public_names_stay_importable_from_the_gradcheck_module():
    from gradmagic.core.diagnose import gradcheck, gradcheck_results

    assert gradcheck.CheckRow is gradcheck_results.CheckRow
    assert gradcheck.GradientCheck is gradcheck_results.GradientCheck is gm.GradientCheck
    assert gradcheck.check_gradients is gm.check_gradients


def test_nested_model_gradient_check_is_honest_about_precision():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="tanh", name="inner_dense")])
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inner(inputs)))
    model.compile(loss="mse")
    check = gm.check_gradients(model, X, np.zeros((len(X), 1), "float32"))
    # The nested model is copied too: the whole copy computes in float64, so the agreement is
    # far below what float32 differences could show (about 1e-3 relative).
    assert check.passed and check.dtype == "float64" and check.notes == [], repr(check)
    assert check.max_rel_error < 1e-7
