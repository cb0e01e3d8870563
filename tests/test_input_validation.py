"""Every argument is checked where it enters, with a one-paragraph GradmagicError, and the model is untouched.

These are the regression cases of bad input that once escaped as raw Python or
TensorFlow errors (or were silently misread); each asserts the error class,
that the message says what was received, and that every variable of the model
and its optimizer is bit-identical afterwards (reads of the same variables, so
exact equality is right).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_unchanged, fingerprint, mlp

import gradmagic as gm
from gradmagic.errors import GradmagicWarning, InputError, LayerError, LossError, UserCodeError

X = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], "float32")
Y = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")


def _refused(call, error=gm.GradmagicError, match=None):
    model = mlp()
    before = fingerprint(model)
    with pytest.raises(error, match=match) as info:
        call(model)
    assert "Received" in str(info.value) or "raised" in str(info.value)
    assert "\n" not in str(info.value)  # one paragraph
    assert_unchanged(model, before)
    return info.value


@pytest.mark.parametrize(
    ("x", "match"),
    [
        ({1.0, 2.0, 3.0}, r"x as a set of 3 items"),
        ("abc", r"x='abc' \(a str\)"),
        ([[1.0, 2.0, 3.0], [1.0, 2.0]], r"ragged"),
        (np.array([[1 + 2j, 0, 0]]), r"complex128.*imaginary part"),
        (np.array([["a", "b", "c"]]), r"x of strings"),
        (np.array([[None, 1.0, 2.0]], dtype=object), r"cannot turn into a numeric array"),
        # The same as plain lists: one array of odd values, not "a list of several arrays".
        ([[None, 1.0, 2.0]], r"cannot turn into a numeric array"),
        ([[1 + 2j, 0.0, 0.0]], r"complex128.*imaginary part"),
        ([["a", "b", "c"]], r"x of strings"),
        (tf.constant([[1 + 1j, 0, 0]], tf.complex64), r"complex64"),
        (np.zeros((0, 3)), r"empty batch"),
    ],
)
def test_bad_x_is_refused_by_every_question(x, match):
    _refused(lambda m: gm.weight_gradients(m, x, Y), InputError, match)
    _refused(lambda m: gm.output_gradients(m, x, Y, layer=0), InputError, match)
    _refused(lambda m: gm.input_gradients(m, x), InputError, match)


@pytest.mark.parametrize(
    ("layer", "match"),
    [([0, 1], r"layer=\[0, 1\] of type list"), (1.5, r"layer=1.5"), (True, r"layer=True")],
)
def test_bad_layer_specs(layer, match):
    _refused(lambda m: gm.weight_gradients(m, X, Y, layer=layer), LayerError, match)
    _refused(lambda m: gm.output_gradients(m, X, Y, layer=layer), LayerError, match)


def test_a_variable_as_layer_names_its_layer():
    model = mlp()
    with pytest.raises(LayerError, match=r"a weight, not a layer.*layer='dense\w*' \(index 0\)"):
        gm.weight_gradients(model, X, Y, layer=model.layers[0].kernel)


@pytest.mark.parametrize("flag", ["False", "True", 0, 1, None, np.array([True])])
def test_flags_must_be_real_bools(flag):
    match = r"training=.*Expected True or False"
    _refused(lambda m: gm.weight_gradients(m, X, Y, training=flag), InputError, match)
    _refused(lambda m: gm.output_gradients(m, X, Y, layer=0, training=flag), InputError, match)
    _refused(lambda m: gm.input_gradients(m, X, training=flag), InputError, match)
    _refused(lambda m: gm.check_gradients(m, X, Y, training=flag), InputError, match)
    _refused(lambda m: gm.explain(m, X, training=flag), InputError, match)


def test_numpy_bools_are_bools():
    model = mlp()
    r = gm.weight_gradients(model, X, Y, training=np.bool_(False))
    np.testing.assert_allclose(r.loss, gm.weight_gradients(model, X, Y).loss, rtol=1e-6)


def test_training_string_false_no_longer_runs_dropout():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.9), keras.layers.Dense(2)])
    model.compile(loss="mse")
    with pytest.raises(InputError, match=r"training='False'.*even 'False'"):
        gm.weight_gradients(model, X, Y, training="False")


@pytest.mark.parametrize("seed", ["abc", -1, 1.5, None])
def test_check_gradients_seed(seed):
    _refused(lambda m: gm.check_gradients(m, X, Y, seed=seed), InputError, r"seed=.*Expected an int >= 0")


def test_clear_cache_refuses_a_name():
    with pytest.raises(gm.GradmagicError, match=r"Received: model='name' of type str.*a name does not identify"):
        gm.clear_cache("name")


def test_string_targets_blame_y():
    error = _refused(lambda m: gm.weight_gradients(m, X, np.array([["a", "b"], ["c", "d"]])), InputError)
    assert str(error).startswith("Received: y of strings") and "class ids" in str(error)


def test_target_dicts_name_expected_and_unknown_keys():
    model = mlp()
    name = model.layers[-1].name
    with pytest.raises(InputError, match=rf"keyed by 'nope'.*outputs '{name}'; unknown: 'nope'; missing: '{name}'"):
        gm.weight_gradients(model, X, {"nope": Y})


def test_multi_output_target_structures():
    inp = keras.Input((3,))
    model = keras.Model(inp, [keras.layers.Dense(1, name="a")(inp), keras.layers.Dense(2, name="b")(inp)])
    model.compile(loss="mse")
    with pytest.raises(InputError, match=r"unknown: 'bb'; missing: 'b'. Did you mean 'b'"):
        gm.weight_gradients(model, X, {"a": np.zeros((2, 1)), "bb": np.zeros((2, 2))})
    with pytest.raises(InputError, match=r"list of 3 arrays.*2 output\(s\) 'a', 'b'"):
        gm.weight_gradients(model, X, [np.zeros((2, 1)), np.zeros((2, 2)), np.zeros((2, 2))])


def test_a_list_of_targets_for_a_single_output():
    with pytest.raises(InputError, match=r"list of 2 arrays.*1 output\(s\).*np.stack"):
        gm.weight_gradients(mlp(), X, [np.zeros((2, 2)), np.zeros((2, 2))])


def test_wrong_target_and_weight_shapes():
    _refused(lambda m: gm.weight_gradients(m, X, np.zeros((2, 5))), InputError, r"y of shape \(2, 5\)")
    _refused(lambda m: gm.weight_gradients(m, X, np.zeros((3, 2))), InputError, r"y with 3 samples, but x has 2")
    match = r"sample_weight of shape \(2, 7\).*Expected sample_weight of shape \(batch,\)"
    _refused(lambda m: gm.weight_gradients(m, X, Y, sample_weight=np.ones((2, 7))), InputError, match)
    _refused(lambda m: gm.weight_gradients(m, X, Y, sample_weight=np.ones(3)), InputError, r"sample_weight with 3")


def test_a_user_loss_that_raises_is_named_and_chained():
    def exploding(y_true, y_pred):
        raise RuntimeError("boom in the loss")

    error = _refused(lambda m: gm.weight_gradients(m, X, Y, loss=exploding), UserCodeError, r"'.*exploding'")
    assert isinstance(error.__cause__, RuntimeError) and "boom in the loss" in str(error.__cause__)
    # The user's own line is in the chained traceback.
    frames = [f.name for f in __import__("traceback").extract_tb(error.__cause__.__traceback__)]
    assert "exploding" in frames


def test_a_loss_subclass_that_raises_is_named():
    class Broken(keras.losses.Loss):
        def call(self, y_true, y_pred):
            raise ValueError("broken call")

    error = _refused(lambda m: gm.output_gradients(m, X, Y, layer=0, loss=Broken()), UserCodeError, r"Broken")
    assert isinstance(error.__cause__, ValueError)


def test_a_loss_returning_none():
    _refused(lambda m: gm.weight_gradients(m, X, Y, loss=lambda t, p: None), LossError, r"returned None")


def test_a_loss_class_instead_of_an_instance():
    match = r"loss=MeanSquaredError, a class.*loss=MeanSquaredError\(\)"
    _refused(lambda m: gm.weight_gradients(m, X, Y, loss=keras.losses.MeanSquaredError), LossError, match)
    _refused(lambda m: gm.check_gradients(m, X, Y, loss=keras.losses.MeanSquaredError), LossError, match)


def test_not_a_loss_at_all():
    _refused(lambda m: gm.weight_gradients(m, X, Y, loss=5), LossError, r"loss=5 of type int")
    _refused(lambda m: gm.weight_gradients(m, X, Y, loss="msee"), LossError, r"loss='msee', which is not a Keras loss")


class _Boom(keras.layers.Layer):
    def compute_output_shape(self, shape):
        return shape

    def call(self, x):
        raise ValueError("layer boom")


def test_a_layer_whose_call_raises_is_named_and_chained():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3), _Boom(name="boomy")])
    model.compile(loss="mse")
    before = fingerprint(model)
    for call in (
        lambda: gm.input_gradients(model, X),
        lambda: gm.weight_gradients(model, X, np.zeros((2, 3))),
        lambda: gm.output_gradients(model, X, np.zeros((2, 3)), layer=0),
    ):
        with pytest.raises(UserCodeError, match=r"Layer 1 'boomy' \(_Boom\).*raised ValueError.*layer boom") as info:
            call()
        assert isinstance(info.value.__cause__, ValueError)
    assert_unchanged(model, before)


def test_nan_and_inf_in_the_data_warn_and_are_counted():
    model = mlp()
    x = X.copy()
    x[0, 0] = np.nan
    with pytest.warns(GradmagicWarning, match=r"x holding 1 NaN and 0 Inf"):
        r = gm.weight_gradients(model, x, Y)
    assert not np.isfinite(r.loss) and r.stats[0].nan > 0
    with pytest.warns(GradmagicWarning, match=r"y holding 0 NaN and 1 Inf"):
        gm.weight_gradients(model, X, np.array([[np.inf, 0.0], [0.0, 1.0]]))
    with pytest.warns(GradmagicWarning, match=r"x holding 0 NaN and 3 Inf"):
        gm.input_gradients(model, np.full((1, 3), np.inf))


def test_a_compiled_user_loss_that_raises_is_named():
    def compiled_boom(y_true, y_pred):
        raise KeyError("no such column")

    model = mlp()
    model.compile(optimizer="sgd", loss=compiled_boom)
    before = fingerprint(model)
    with pytest.raises(
        UserCodeError, match=r"compiled loss 'test_a_compiled_user_loss_that_raises_is_named.<locals>"
    ) as info:
        gm.weight_gradients(model, X, Y)
    assert isinstance(info.value.__cause__, KeyError)
    assert_unchanged(model, before)


def test_one_loss_per_output_must_match_the_outputs():
    inp = keras.Input((3,))
    model = keras.Model(inp, [keras.layers.Dense(1, name="a")(inp), keras.layers.Dense(2, name="b")(inp)])
    y = [np.zeros((2, 1)), np.zeros((2, 2))]
    with pytest.raises(LossError, match=r"loss as a dict keyed by 'a', 'bb'.*unknown: 'bb'. Did you mean 'b'"):
        gm.weight_gradients(model, X, y, loss={"a": "mse", "bb": "mae"})
    with pytest.raises(LossError, match=r"loss as a list of 3 losses.*2 output\(s\) 'a', 'b'"):
        gm.output_gradients(model, X, y, layer="a", loss=["mse", "mse", "mae"])
    _refused(lambda m: gm.weight_gradients(m, X, Y, loss=["mse", "mae"]), LossError, r"list of 2 losses")


@pytest.mark.parametrize(
    "thing",
    [np, len, keras.layers.Dense(2), object(), tf.ragged.constant([[1.0, 2, 3], [1.0]]), tf.sparse.eye(3)],
)
def test_objects_that_are_not_data(thing):
    _refused(lambda m: gm.weight_gradients(m, thing, Y), InputError, r"Received: x of type \w+ .*which is not data")
    _refused(lambda m: gm.weight_gradients(m, X, thing), InputError, r"Received: y")
    _refused(lambda m: gm.input_gradients(m, thing), InputError, r"Received: x")


class _Halves(keras.Model):
    def __init__(self):
        super().__init__(name="halves")
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        if x.shape[-1] != 3:
            raise ValueError(f"halves needs 3 features, got {x.shape[-1]}")
        return self.dense(x) * 0.5


def test_a_subclassed_models_own_call_is_named_and_chained():
    model = _Halves()
    with pytest.raises(gm.GradmagicError, match=r"Received: x of shape \(2, 4\).*halves needs 3 features") as info:
        gm.input_gradients(model, np.ones((2, 4), "float32"))
    assert isinstance(info.value.__cause__, ValueError) and not model.built
    gm.input_gradients(model, np.ones((2, 3), "float32"))  # builds it
    with pytest.raises(UserCodeError, match=r"The call of model 'halves' \(_Halves.call\) raised ValueError") as info:
        gm.input_gradients(model, np.ones((2, 5), "float32"))
    assert isinstance(info.value.__cause__, ValueError)


def test_a_list_of_strings_is_data_for_a_string_input():
    # A model that takes text (a string Input into StringLookup) takes a Python list of strings as a NumPy
    # array of them. Truth: the loss by hand, from the embedding rows the lookup picks.
    text = keras.Input((), dtype="string")
    ids = keras.layers.StringLookup(vocabulary=["a", "b", "c"])(text)  # "a" -> 1, "b" -> 2 (0: unknown)
    out = keras.layers.Dense(1, use_bias=False)(keras.layers.Embedding(4, 2)(ids))
    model = keras.Model(text, out)
    y = np.array([[1.0], [0.0]], "float32")
    result = gm.weight_gradients(model, ["a", "b"], y, loss="mse")
    table = model.layers[2].embeddings.numpy()
    kernel = model.layers[3].kernel.numpy()
    expected = np.mean((table[[1, 2]] @ kernel - y) ** 2)
    np.testing.assert_allclose(result.loss, expected, rtol=1e-6)  # float32 arithmetic in two orders
    np.testing.assert_allclose(
        gm.weight_gradients(model, np.array(["a", "b"]), y, loss="mse").loss, expected, rtol=1e-6
    )
