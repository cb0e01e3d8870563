"""A compiled question is reused only for the same computation: every change a user can make is seen.

Each case changes something between two calls (a loss's attribute, a closure's
value, a global, the compiled loss, a frozen layer, a layer swapped in) and
checks the second result against a hand-written ``tf.GradientTape`` of the
computation as it is *now*. Results and references come from different
compiled graphs, so they are compared with float tolerances (rtol 1e-5), never
exactly.
"""

from __future__ import annotations

import functools
import gc

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import X6, assert_unchanged, fingerprint, mlp, numpy_mse, two_outputs

import gradmagic as gm
from gradmagic.core.backends import keras_internals
from gradmagic.core.questions import compute
from gradmagic.core.questions.cache_keys import KeyBuilder
from gradmagic.errors import GradmagicWarning

X = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [0.0, 1.0, 1.0]], "float32")
Y = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], "float32")
_SCALE = 1.0  # read as a global by _global_scaled


def _tape(model, loss_fn, x=X, y=Y, training=False, sample_weight=None):
    """The loss and dLoss/dW written out by hand (regularization-free models only)."""
    with tf.GradientTape() as tape:
        pred = model(x, training=training)
        per_sample = loss_fn(tf.constant(y), pred)
        if sample_weight is not None:
            per_sample = per_sample * sample_weight
        loss = tf.reduce_mean(per_sample)
    return float(loss), [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]


def _assert_matches(result, expected):
    loss, grads = expected
    np.testing.assert_allclose(result.loss, loss, rtol=1e-5)
    assert len(result.arrays()) == len(grads)
    for got, want in zip(result.arrays(), grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _mse(y_true, y_pred):
    return tf.reduce_mean(tf.square(y_pred - y_true), axis=-1)


def _questions(model, kind="weights"):
    return [key for key in compute._cache.get(model, {}) if key[0] == kind]


class Scaled(keras.losses.Loss):
    """A user loss whose only difference between instances is an attribute."""

    factor = 1.0

    def __init__(self, scale):
        super().__init__(name="scaled")  # the same name: get_config() cannot tell instances apart
        self.scale = scale

    def call(self, y_true, y_pred):
        return self.factor * self.scale * keras.ops.mean(keras.ops.square(y_pred - y_true), axis=-1)


def _scaled(scale, factor=1.0):
    return lambda t, p: factor * scale * _mse(t, p)


def test_loss_subclass_instances_that_differ_in_an_attribute_are_different_questions():
    model = mlp()
    _assert_matches(gm.weight_gradients(model, X, Y, loss=Scaled(1.0)), _tape(model, _scaled(1.0)))
    _assert_matches(gm.weight_gradients(model, X, Y, loss=Scaled(10.0)), _tape(model, _scaled(10.0)))


def test_an_attribute_changed_on_the_same_loss_object_is_seen():
    model, loss = mlp(), Scaled(1.0)
    gm.weight_gradients(model, X, Y, loss=loss)
    loss.scale = 3.0
    _assert_matches(gm.weight_gradients(model, X, Y, loss=loss), _tape(model, _scaled(3.0)))


def test_a_class_constant_of_a_user_loss_is_seen():
    model, loss = mlp(), Scaled(1.0)
    gm.weight_gradients(model, X, Y, loss=loss)
    try:
        Scaled.factor = 4.0
        _assert_matches(gm.weight_gradients(model, X, Y, loss=loss), _tape(model, _scaled(1.0, 4.0)))
    finally:
        Scaled.factor = 1.0


def test_a_closure_whose_captured_value_changes_is_seen():
    model = mlp()
    scale = 1.0

    def loss(y_true, y_pred):
        return scale * _mse(y_true, y_pred)

    _assert_matches(gm.weight_gradients(model, X, Y, loss=loss), _tape(model, _scaled(1.0)))
    scale = 5.0
    _assert_matches(gm.weight_gradients(model, X, Y, loss=loss), _tape(model, _scaled(5.0)))
    scale = 1.0  # back to a value seen before: the first function is right again, and found again
    _assert_matches(gm.weight_gradients(model, X, Y, loss=loss), _tape(model, _scaled(1.0)))
    assert len(_questions(model)) == 2


def _global_scaled(y_true, y_pred):
    return _SCALE * _mse(y_true, y_pred)


def test_a_module_global_read_by_the_loss_is_seen():
    global _SCALE
    model = mlp()
    gm.weight_gradients(model, X, Y, loss=_global_scaled)
    try:
        _SCALE = 7.0
        _assert_matches(gm.weight_gradients(model, X, Y, loss=_global_scaled), _tape(model, _scaled(7.0)))
    finally:
        _SCALE = 1.0


def test_an_array_changed_in_place_inside_a_closure_is_seen():
    model = mlp()
    weights = np.array([1.0, 1.0], "float32")

    def loss(y_true, y_pred):
        return tf.reduce_mean(weights * tf.square(y_pred - y_true), axis=-1)

    gm.weight_gradients(model, X, Y, loss=loss)
    weights[:] = [2.0, 0.0]
    expected = _tape(model, lambda t, p: tf.reduce_mean(tf.constant([2.0, 0.0]) * tf.square(p - t), axis=-1))
    _assert_matches(gm.weight_gradients(model, X, Y, loss=loss), expected)


def test_a_loss_holding_a_large_array_is_computed_fresh_not_cached():
    model = mlp()
    big = np.ones(300_000, "float32")  # 1.2 MB: too large to snapshot, so never reused

    def loss(y_true, y_pred):
        return big[0] * _mse(y_true, y_pred)

    with pytest.warns(GradmagicWarning, match=r"an array of 1200000 bytes.*compiled afresh on every call"):
        _assert_matches(gm.weight_gradients(model, X, Y, loss=loss), _tape(model, _scaled(1.0)))
    big[0] = 2.0
    with pytest.warns(GradmagicWarning):
        _assert_matches(gm.weight_gradients(model, X, Y, loss=loss), _tape(model, _scaled(2.0)))
    assert _questions(model) == []


def test_a_loss_reading_arrays_of_more_than_a_megabyte_in_all_is_computed_fresh():
    model = mlp()
    halves = {"a": np.ones(150_000, "float32"), "b": np.ones(150_000, "float32")}  # 0.6 MB each, 1.2 MB in all

    def loss(y_true, y_pred):
        return halves["a"][0] * halves["b"][0] * _mse(y_true, y_pred)

    with pytest.warns(GradmagicWarning, match=r"arrays of 1200000 bytes in all"):
        _assert_matches(gm.weight_gradients(model, X, Y, loss=loss), _tape(model, _scaled(1.0)))
    halves["b"][0] = 3.0
    with pytest.warns(GradmagicWarning):
        _assert_matches(gm.weight_gradients(model, X, Y, loss=loss), _tape(model, _scaled(3.0)))
    assert _questions(model) == []


def test_compile_with_a_new_loss_is_seen():
    model = mlp()
    _assert_matches(gm.weight_gradients(model, X, Y), _tape(model, _mse))
    model.compile(optimizer="sgd", loss="mae")
    mae = lambda t, p: tf.reduce_mean(tf.abs(p - t), axis=-1)  # noqa: E731
    _assert_matches(gm.weight_gradients(model, X, Y), _tape(model, mae))
    model.compile(optimizer="sgd", loss=Scaled(2.0))
    _assert_matches(gm.weight_gradients(model, X, Y), _tape(model, _scaled(2.0)))
    model.loss.scale = 6.0  # the compiled loss object changed in place
    _assert_matches(gm.weight_gradients(model, X, Y), _tape(model, _scaled(6.0)))


def test_freezing_batch_normalization_between_calls_is_seen_in_training_mode():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(), keras.layers.Dense(2)]
    )
    model.compile(loss="mse")
    _assert_matches(gm.weight_gradients(model, X, Y, training=True), _tape(model, _mse, training=True))
    model.layers[1].trainable = False  # a frozen BatchNormalization runs in inference mode
    expected = _tape(model, _mse, training=True)
    result = gm.weight_gradients(model, X, Y, training=True)
    assert result.paths == [v.path for v in model.trainable_weights]
    _assert_matches(result, expected)


def test_training_flag_and_sample_weight_presence_are_separate_questions():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(), keras.layers.Dense(2)]
    )
    model.compile(loss="mse")
    weights = np.array([1.0, 0.0, 2.0], "float32")
    for training in (False, True, False):
        _assert_matches(gm.weight_gradients(model, X, Y, training=training), _tape(model, _mse, training=training))
        _assert_matches(
            gm.weight_gradients(model, X, Y, training=training, sample_weight=weights),
            _tape(model, _mse, training=training, sample_weight=weights),
        )
    assert len(_questions(model)) == 4


def test_a_layer_swapped_in_after_pop_gets_its_own_function():
    model = mlp()
    gm.weight_gradients(model, X, Y)
    for _ in range(3):  # a freed layer's id may be reused by the next one: that must not matter
        model.pop()
        gc.collect()
        model.add(keras.layers.Dense(2))
        _assert_matches(gm.weight_gradients(model, X, Y), _tape(model, _mse))


def test_same_question_asked_twice_reuses_one_function():
    model = mlp()
    for loss in ("mse", "mse", keras.losses.Huber(), keras.losses.Huber()):
        gm.weight_gradients(model, X, Y, loss=loss)
    assert len(_questions(model)) == 2  # Keras's own Huber() inline is one question, by its contents
    gm.weight_gradients(model, X, Y, loss=keras.losses.Huber(delta=0.1))
    assert len(_questions(model)) == 3
    # The same layer as index, name or object is one question.
    for layer in (0, model.layers[0].name, model.layers[0]):
        gm.output_gradients(model, X, Y, layer=layer)
    assert len(_questions(model, "output")) == 1


def test_identity_keys_die_with_their_object():
    builder = KeyBuilder()
    loss = Scaled(1.0)
    key = builder.key(builder.value(loss)).stored()  # as kept in the cache: held weakly
    assert key.alive()
    del loss, builder
    gc.collect()
    assert not key.alive()


@pytest.mark.parametrize("value", [float("nan"), np.array([np.nan]), {"a": [1, (2.0, "x")]}])
def test_plain_values_key_equal_to_themselves(value):
    assert KeyBuilder().value(value) == KeyBuilder().value(value)


def test_a_lambda_whose_captured_value_changes_is_seen_by_output_gradients():
    model = mlp()
    scale = 1.0
    loss = lambda y_true, y_pred: scale * _mse(y_true, y_pred)  # noqa: E731

    def at_output(factor):
        with tf.GradientTape() as tape:
            pred = model(X)
            tape.watch(pred)
            value = tf.reduce_mean(factor * _mse(tf.constant(Y), pred))
        return float(value), tape.gradient(value, pred).numpy()

    for scale in (1.0, 10.0, 0.5):  # the lambda reads the new value through its closure cell
        o = gm.output_gradients(model, X, Y, layer=-1, loss=loss)
        value, grad = at_output(scale)
        np.testing.assert_allclose(o.loss, value, rtol=1e-5)
        np.testing.assert_allclose(o.array, grad, rtol=1e-5, atol=1e-7)
    assert len(_questions(model, "output")) == 3


def test_a_tf_function_loss_is_cached_like_its_python_function(recwarn):
    # The tf.function wrapper holds locks and trace caches a snapshot cannot read; keyed by the wrapper's
    # identity and its Python function, it is one cached question, with no "compiled afresh" warning.
    model = mlp()
    mse = tf.function(_mse)
    for _ in range(2):
        _assert_matches(gm.weight_gradients(model, X, Y, loss=mse), _tape(model, _mse))
    assert len(_questions(model)) == 1
    assert not [w for w in recwarn if issubclass(w.category, GradmagicWarning)]
    # Another tf.function over another scale is another question, never the first one's trace.
    _assert_matches(gm.weight_gradients(model, X, Y, loss=tf.function(_scaled(3.0))), _tape(model, _scaled(3.0)))
    assert len(_questions(model)) == 2


class WeightedLossModel(keras.Model):
    """A subclassed model whose own compute_loss reads a Python hyperparameter (a beta-VAE's beta, say)."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)
        self.beta = 1.0

    def call(self, x):
        return self.dense(x)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return self.beta * keras.ops.mean(keras.ops.square(y_pred - y))


def test_a_models_own_hyperparameter_changed_between_calls_is_seen():
    model = WeightedLossModel()
    gm.weight_gradients(model, X, Y)
    model.beta = 10.0
    _assert_matches(gm.weight_gradients(model, X, Y), _tape(model, _scaled(10.0)))


def test_an_activation_swapped_between_calls_is_seen():
    model = mlp()
    gm.weight_gradients(model, X, Y)
    model.layers[0].activation = keras.activations.relu
    _assert_matches(gm.weight_gradients(model, X, Y), _tape(model, _mse))


class _Scaled:
    """An activation given as a callable object: y = k * t."""

    def __init__(self, k):
        self.k = k

    def __call__(self, t):
        return t * self.k


def _times(t, k):
    return t * k


def test_an_activation_given_as_a_partial_or_a_callable_object_is_seen_when_swapped_or_changed():
    model = mlp()
    layer = model.layers[0]
    layer.activation = functools.partial(_times, k=2.0)
    gm.weight_gradients(model, X, Y)
    layer.activation = functools.partial(_times, k=3.0)  # another partial: new contents
    _assert_matches(gm.weight_gradients(model, X, Y), _tape(model, _mse))
    layer.activation = _Scaled(2.0)
    gm.weight_gradients(model, X, Y)
    layer.activation = _Scaled(5.0)  # another object of the same class
    _assert_matches(gm.weight_gradients(model, X, Y), _tape(model, _mse))
    layer.activation.k = 0.5  # the same object, changed in place
    _assert_matches(gm.weight_gradients(model, X, Y), _tape(model, _mse))


def test_predict_and_fit_between_questions_reuse_the_function():
    # Keras swaps the model's predict_function/train_function; that changes no question.
    model = mlp()
    gm.weight_gradients(model, X, Y)
    model.predict(X, verbose=0)
    model.fit(X, Y, epochs=1, verbose=0)
    _assert_matches(gm.weight_gradients(model, X, Y), _tape(model, _mse))
    assert len(_questions(model)) == 1


class Scale(keras.layers.Layer):
    """Multiplies by ``self.factor`` when it has one (a number, or a one-element list)."""

    def call(self, t):
        factor = getattr(self, "factor", 1.0)
        return t * (factor[0] if isinstance(factor, list) else factor)


def _scaled_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), Scale()])
    model.compile(loss="mse")
    return model


def _tape_with(dense, factor):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(_mse(tf.constant(Y), dense(X) * factor))
    return float(loss), [g.numpy() for g in tape.gradient(loss, dense.trainable_weights)]


def test_a_setting_added_to_a_layer_after_the_first_call_is_seen():
    model = _scaled_model()
    _assert_matches(gm.weight_gradients(model, X, Y), _tape_with(model.layers[0], 1.0))
    model.layers[1].factor = 3.0  # a new attribute: the layer's list of names changes
    _assert_matches(gm.weight_gradients(model, X, Y), _tape_with(model.layers[0], 3.0))


def test_a_setting_that_turns_from_a_list_into_a_number_is_seen():
    model = _scaled_model()
    model.layers[1].factor = [2.0]  # a list, keyed by its contents
    _assert_matches(gm.weight_gradients(model, X, Y), _tape_with(model.layers[0], 2.0))
    model.layers[1].factor = 5.0  # same name, another type
    _assert_matches(gm.weight_gradients(model, X, Y), _tape_with(model.layers[0], 5.0))
    model.layers[1].factor = 5  # an int equal to the float: the type is part of the key
    gm.weight_gradients(model, X, Y)
    assert len(_questions(model)) == 3


def test_same_all_keys_objects_by_identity_in_order():
    a, b = Scaled(1.0), Scaled(1.0)
    builder = KeyBuilder()
    assert builder.same_all([a, b]) != builder.same_all([b, a])
    assert builder.same_all([a, b]) == KeyBuilder().same_all([a, b])
    key = builder.key(builder.same_all([a])).stored()
    del a, builder
    gc.collect()
    assert not key.alive()


# --- inline losses, loss weights, frozen layers and swapped layers in every question ---


def test_a_lambda_loss_is_right_and_an_inline_loss_object_is_traced_once():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    y = np.zeros((6, 1), "float32")
    r = gm.weight_gradients(model, X6, y, loss=lambda t, p: keras.ops.mean((p - t) ** 2, axis=-1))
    assert r.loss == pytest.approx(numpy_mse(y, model(X6).numpy()), rel=1e-5)
    for _ in range(3):  # an inline Loss object each call is the same question, traced once
        gm.weight_gradients(model, X6, y, loss=keras.losses.Huber(delta=0.5))
    assert len(_questions(model)) == 2


def test_recompiling_with_other_loss_weights_is_seen():
    model = two_outputs()
    optimizer = keras.optimizers.SGD()
    y = [np.ones((6, 2), "f4"), np.ones((6, 1), "f4")]
    model.compile(optimizer=optimizer, loss=["mse", "mse"], loss_weights=[1.0, 1.0])
    both = gm.weight_gradients(model, X6, y).loss
    model.compile(optimizer=optimizer, loss=["mse", "mse"], loss_weights=[1.0, 0.0])
    first_only = gm.weight_gradients(model, X6, y).loss
    assert first_only == pytest.approx(numpy_mse(y[0], model(X6)[0].numpy()), rel=1e-5) and first_only < both


def test_freezing_batchnorm_is_seen_by_output_and_input_questions():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(name="bn")])
    model.compile(loss="mse")
    y = np.zeros((6, 4), "float32")
    before = gm.output_gradients(model, X6, y, layer=0, training=True).loss
    model.get_layer("bn").trainable = False  # Keras 3 then runs BN in inference mode
    frozen = gm.output_gradients(model, X6, y, layer=0, training=True).loss
    assert frozen == pytest.approx(float(model.compute_loss(x=X6, y=y, y_pred=model(X6, training=True))), rel=1e-5)
    assert frozen != pytest.approx(before)
    jac = gm.input_gradients(model, X6[:1], training=True).array
    with tf.GradientTape() as tape:
        point = tf.constant(X6[:1])
        tape.watch(point)
        out = model(point, training=True)
    np.testing.assert_allclose(jac[0], tape.jacobian(out, point).numpy()[0, :, 0, :], rtol=1e-5)


def test_sequential_pop_and_add_are_seen():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d1"), keras.layers.Dense(2, name="d2")])
    model.compile(loss="mse")
    gm.weight_gradients(model, X6, np.zeros((6, 2)))
    model.pop()
    model.add(keras.layers.Dense(5, name="d3"))
    before = fingerprint(model)
    o = gm.output_gradients(model, X6, np.zeros((6, 5)), layer=1)
    assert o.layer_name == "d3" and o.array.shape == (6, 5)
    kernel = model.get_layer("d3").kernel.numpy()
    expected = (model.layers[0].kernel.numpy() @ kernel).T
    np.testing.assert_allclose(gm.input_gradients(model, X6[:1]).array[0], expected, rtol=1e-5)
    assert_unchanged(model, before)


class Coefficients(keras.layers.Layer):
    """Multiplies by an array and by the first entry of a list, both plain public settings."""

    def __init__(self, coef, factors):
        super().__init__()
        self.coef, self.factors = coef, factors

    def call(self, t):
        return t * self.coef * self.factors[0]


def _tape_with_regularization(model, training=False):
    """Like ``_tape``, plus the regularization losses ``model.losses`` reports now."""
    with tf.GradientTape() as tape:
        pred = model(X, training=training)
        loss = tf.reduce_mean(_mse(tf.constant(Y), pred)) + tf.add_n([tf.constant(0.0), *model.losses])
    return float(loss), [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]


def test_an_array_or_a_list_setting_replaced_or_changed_in_place_is_seen():
    layer = Coefficients(np.array([1.0, 2.0], "float32"), [1.0])
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), layer])
    gm.weight_gradients(model, X, Y, loss="mse")
    layer.coef = np.array([3.0, -1.0], "float32")  # another array, same type
    _assert_matches(gm.weight_gradients(model, X, Y, loss="mse"), _tape_with_regularization(model))
    layer.coef[0] = 0.5  # the same array, changed in place
    _assert_matches(gm.weight_gradients(model, X, Y, loss="mse"), _tape_with_regularization(model))
    layer.factors[0] = 4.0  # the same list, changed in place
    _assert_matches(gm.weight_gradients(model, X, Y, loss="mse"), _tape_with_regularization(model))


def test_a_regularizer_factor_changed_in_place_is_seen():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_regularizer=keras.regularizers.L2(0.01))])
    gm.weight_gradients(model, X, Y, loss="mse")
    model.layers[0].kernel_regularizer.l2 = 0.5  # the object the kernel's regularization loss calls
    _assert_matches(gm.weight_gradients(model, X, Y, loss="mse"), _tape_with_regularization(model))


def test_an_activation_layer_held_by_a_layer_and_changed_in_place_is_seen():
    dense = keras.layers.Dense(2, activation=keras.layers.LeakyReLU(negative_slope=0.1))
    model = keras.Sequential([keras.Input((3,)), dense])
    x = -np.abs(X)  # negative inputs and a negative-only kernel: the leaky side is what is differentiated
    dense.kernel.assign(np.abs(dense.kernel.numpy()))
    gm.weight_gradients(model, x, Y, loss="mse")
    dense.activation.negative_slope = 0.7
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(_mse(tf.constant(Y), model(x)))
    expected = float(loss), [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]
    _assert_matches(gm.weight_gradients(model, x, Y, loss="mse"), expected)


class Gained(keras.Model):
    """Reads an optional setting by its name as a string (``getattr(self, "gain", ...)``)."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)
        self.offsets = [0.0]

    def call(self, t):
        return self.dense(t) * getattr(self, "gain", 1.0) + self.offsets[0]


def test_a_models_setting_read_through_getattr_or_changed_in_place_in_a_list_is_seen():
    model = Gained()
    gm.weight_gradients(model, X, Y, loss="mse")
    model.gain = 3.0  # added after the first call, read by getattr with a string
    _assert_matches(gm.weight_gradients(model, X, Y, loss="mse"), _tape(model, _mse))
    model.offsets[0] = 2.0  # a list the model's code reads, changed in place
    _assert_matches(gm.weight_gradients(model, X, Y, loss="mse"), _tape(model, _mse))


def test_recompiling_with_other_loss_weights_is_seen_without_keras_compiled_loss_object(monkeypatch):
    # As if a Keras release moved its compiled-loss object: the door then finds none.
    monkeypatch.setattr(keras_internals, "_COMPILE_LOSS", "_compile_loss_moved_away")
    model = mlp()
    optimizer = model.optimizer
    gm.weight_gradients(model, X, Y)
    model.compile(optimizer=optimizer, loss="mse", loss_weights=[3.0])  # same loss, same optimizer object
    loss, grads = _tape(model, _mse)
    _assert_matches(gm.weight_gradients(model, X, Y), (3.0 * loss, [3.0 * g for g in grads]))


_SLOPE = 0.1  # read as a global by _leaky


def _leaky(t):
    return tf.maximum(t, _SLOPE * t)


def _scaled_by(factors):
    def scaled(t):
        return t * factors[0]

    return scaled


def test_an_activation_functions_global_or_closure_changed_between_calls_is_seen():
    global _SLOPE
    model = mlp()
    model.layers[0].activation = _leaky
    gm.weight_gradients(model, X, Y)
    _SLOPE = 0.9
    try:
        _assert_matches(gm.weight_gradients(model, X, Y), _tape(model, _mse))
    finally:
        _SLOPE = 0.1
    factors = [1.0]
    model.layers[0].activation = _scaled_by(factors)
    gm.weight_gradients(model, X, Y)
    factors[0] = 3.0  # the same function object; what its closure holds changed
    _assert_matches(gm.weight_gradients(model, X, Y), _tape(model, _mse))
