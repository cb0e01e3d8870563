"""Property-based checks of the core entry points' contract (Hypothesis).

For generated bad or odd values of every argument (x, y, sample_weight, layer,
loss, output, flags, seed; shapes, ranks, dtypes, structures, NaN/Inf, empty
batches):

- the exception is a ``GradmagicError`` whose text says what was received, and
- the model's variables, optimizer state and build state are bit-identical
  afterwards (reads of the same variables: exact equality is right here).

For generated valid values the results are finite and agree with a
hand-written ``tf.GradientTape`` (different compiled graphs: compared with
rtol 1e-4 / atol 1e-5, float32 round-off over a few ops).

The models are built once per module; examples are derandomized and budgeted
so the suite runs in well under a minute on a laptop CPU
(``pytest tests/test_properties_core.py --hypothesis-show-statistics``).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import fingerprint
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradmagic as gm
from gradmagic.errors import GradmagicWarning, UserCodeError

SETTINGS = settings(
    derandomize=True,
    deadline=None,
    max_examples=60,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no "explain" phase: it reruns failures for minutes
    # The autouse seeding fixture is function-scoped; it does not change between examples.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --- the models, built once --------------------------------------------------------------------------------------


def _trained(model: keras.Model, x: np.ndarray, y: np.ndarray) -> keras.Model:
    """Give the optimizer real state (moments, iteration count) so 'unchanged' means something."""
    model.fit(x, y, epochs=1, batch_size=len(x), verbose=0)
    return model


@pytest.fixture(scope="module")
def mlp_model() -> keras.Model:
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)], name="prop_mlp"
    )
    model.compile(optimizer="adam", loss="mse")
    return _trained(model, np.ones((2, 3), "float32"), np.zeros((2, 2), "float32"))


@pytest.fixture(scope="module")
def stateful_model() -> keras.Model:
    """Dropout and BatchNormalization: a forward pass in training mode would change state."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(2),
        ],
        name="prop_stateful",
    )
    model.compile(optimizer="adam", loss="mse")
    return _trained(model, np.ones((2, 3), "float32"), np.zeros((2, 2), "float32"))


@pytest.fixture(scope="module")
def two_io_model() -> keras.Model:
    keras.utils.set_random_seed(3)
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    hidden = keras.layers.Dense(3, activation="tanh", name="hidden")(keras.layers.Concatenate()([a, b]))
    model = keras.Model(
        {"a": a, "b": b}, [keras.layers.Dense(1, name="p")(hidden), keras.layers.Dense(2, name="q")(hidden)]
    )
    model.compile(optimizer="adam", loss="mse")
    return model


def _state(model: keras.Model) -> tuple:
    """Every variable's bytes plus the build state: what 'unchanged' means."""
    layers = tuple((type(layer).__name__, layer.name, layer.built) for layer in model.layers)
    return fingerprint(model), model.built, layers, tuple(tuple(v.shape) for v in model.weights)


# --- bad values ------------------------------------------------------------------------------------------------------

finite = st.floats(-10, 10, allow_nan=False, width=32)


def _array(shape, elements=finite, dtype="float32"):
    return hnp.arrays(dtype, shape, elements=elements)


bad_x = st.one_of(
    # wrong feature count, wrong rank, empty batch
    st.tuples(st.integers(1, 4), st.integers(1, 6).filter(lambda k: k != 3)).flatmap(_array),
    st.tuples(st.integers(1, 3), st.just(3), st.integers(2, 3)).flatmap(_array),
    st.integers(0, 0).map(lambda n: np.zeros((n, 3), "float32")),
    # dtypes and kinds that are not numbers (or not real numbers)
    st.builds(lambda n: np.ones((n, 3)) * (1 + 1j), st.integers(1, 3)),
    st.builds(lambda n: np.full((n, 3), "a"), st.integers(1, 3)),
    st.builds(lambda n: np.full((n, 3), None, dtype=object), st.integers(1, 3)),
    st.builds(lambda n: np.zeros((n, 3), "datetime64[s]"), st.integers(1, 3)),
    # structures
    st.sets(finite, min_size=1, max_size=4),
    st.text(min_size=1, max_size=5),
    st.lists(st.lists(finite, min_size=1, max_size=4), min_size=2, max_size=3).filter(
        lambda rows: len({len(r) for r in rows}) > 1
    ),
    st.just(None),
    st.dictionaries(st.sampled_from(["u", "v"]), st.just(np.ones((2, 3), "float32")), min_size=2),
)

bad_layer = st.one_of(
    st.lists(st.integers(0, 1), min_size=2, max_size=3),
    st.integers(2, 50),
    st.integers(-50, -3),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v != int(v)),
    st.booleans(),
    st.text(alphabet="xyz_", min_size=1, max_size=6),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)

bad_flag = st.one_of(
    st.text(max_size=6), st.integers(), st.floats(allow_nan=False), st.just(None), st.lists(st.booleans(), max_size=2)
)


def _raising_loss(y_true, y_pred):
    raise ZeroDivisionError("user loss failed")


bad_loss = st.one_of(
    st.integers(),
    st.text(alphabet="qwz", min_size=1, max_size=6),
    st.sampled_from([keras.losses.MeanSquaredError, keras.losses.Huber, object()]),
    st.just(_raising_loss),
    st.just(lambda y_true, y_pred: None),
    st.lists(st.sampled_from(["mse", "mae"]), min_size=2, max_size=4),  # one output, several losses
    st.dictionaries(st.text(alphabet="xyz", min_size=1, max_size=3), st.just("mse"), min_size=1, max_size=2),
)


def _good_y(n):
    return np.zeros((n, 2), "float32")


bad_y = st.one_of(
    st.integers(1, 3).map(lambda n: np.full((n, 2), "label")),
    st.integers(1, 3).map(lambda n: np.zeros((n, 5), "float32")),
    st.sampled_from([1, 3, 4]).map(lambda n: np.zeros((n, 2), "float32")),  # x has 2 samples
    st.integers(1, 3).map(lambda n: {"nope": np.zeros((n, 2), "float32")}),
    st.integers(1, 3).map(lambda n: [np.zeros((n, 2)), np.zeros((n, 2))]),
    st.integers(1, 3).map(lambda n: np.ones((n, 2)) * 1j),
)

bad_weight = st.one_of(
    st.integers(1, 3).map(lambda n: np.ones((n, 7), "float32")),
    st.integers(1, 3).map(lambda n: np.ones(n + 2, "float32")),
    st.integers(1, 3).map(lambda n: np.full(n, "w")),
    st.sets(st.floats(0, 1), min_size=2, max_size=2),
)


def _call_with(model, argument, value):
    """One entry point with one argument replaced by ``value`` (the others valid)."""
    x, y = np.ones((2, 3), "float32"), _good_y(2)
    calls = {
        "x:weights": lambda: gm.weight_gradients(model, value, y),
        "x:output": lambda: gm.output_gradients(model, value, y, layer=0),
        "x:input": lambda: gm.input_gradients(model, value),
        "x:check": lambda: gm.check_gradients(model, value, y),
        "x:explain": lambda: gm.explain(model, value),
        "layer:weights": lambda: gm.weight_gradients(model, x, y, layer=value),
        "layer:output": lambda: gm.output_gradients(model, x, y, layer=value),
        "loss:weights": lambda: gm.weight_gradients(model, x, y, loss=value),
        "loss:output": lambda: gm.output_gradients(model, x, y, layer=1, loss=value),
        "loss:check": lambda: gm.check_gradients(model, x, y, loss=value),
        "training:weights": lambda: gm.weight_gradients(model, x, y, training=value),
        "training:input": lambda: gm.input_gradients(model, x, training=value),
        "training:explain": lambda: gm.explain(model, x, training=value),
        "output:input": lambda: gm.input_gradients(model, x, output=value),
        "output:weights": lambda: gm.weight_gradients(model, x, None, output=value),
        "seed:check": lambda: gm.check_gradients(model, x, y, seed=value),
        "y:weights": lambda: gm.weight_gradients(model, x, value),
        "sample_weight:weights": lambda: gm.weight_gradients(model, x, y, sample_weight=value),
    }
    return calls[argument]


BAD = st.one_of(
    st.tuples(st.sampled_from(["x:weights", "x:output", "x:input", "x:check", "x:explain"]), bad_x),
    st.tuples(st.sampled_from(["layer:weights", "layer:output"]), bad_layer),
    st.tuples(st.sampled_from(["loss:weights", "loss:output", "loss:check"]), bad_loss),
    st.tuples(st.sampled_from(["training:weights", "training:input", "training:explain"]), bad_flag),
    st.tuples(
        st.sampled_from(["output:input", "output:weights"]),
        st.one_of(st.integers(2, 99), st.integers(-99, -3), st.text(max_size=3), st.booleans(), st.floats()),
    ),
    st.tuples(st.just("seed:check"), st.one_of(st.text(max_size=3), st.integers(-99, -1), st.floats())),
    st.tuples(st.just("y:weights"), bad_y),
    st.tuples(st.just("sample_weight:weights"), bad_weight),
)


@SETTINGS
@given(case=BAD)
def test_bad_values_raise_a_gradmagic_error_and_change_nothing(mlp_model, case):
    argument, value = case
    before = _state(mlp_model)
    with pytest.raises(gm.GradmagicError) as info:
        _call_with(mlp_model, argument, value)()
    message = str(info.value)
    assert message.startswith("Received") or (isinstance(info.value, UserCodeError) and "raised" in message), message
    assert "\n" not in message.strip()  # one paragraph
    assert _state(mlp_model) == before


@settings(SETTINGS, max_examples=25)  # a fresh model per example: each builds and traces once
@given(case=BAD)
def test_bad_values_leave_an_unbuilt_model_unbuilt(case):
    argument, value = case
    model = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(2)], name="unbuilt")
    model.compile(loss="mse")
    with pytest.raises(gm.GradmagicError):
        _call_with(model, argument, value)()
    assert not model.built and model.weights == [] and len(model.layers) == 2
    # A call on valid data now works and builds the model as it would have been built.
    result = gm.weight_gradients(model, np.ones((2, 3), "float32"), _good_y(2))
    assert model.built and np.isfinite(result.loss)


# --- odd but valid values ----------------------------------------------------------------------------------------


class Scaled(keras.losses.Loss):
    def __init__(self, scale):
        super().__init__(name="scaled")
        self.scale = scale

    def call(self, y_true, y_pred):
        return self.scale * keras.ops.mean(keras.ops.square(y_pred - y_true), axis=-1)


def _per_sample(loss_name, y_true, y_pred):
    """The per-sample loss, written out (Keras's reduction: the mean over samples, weights multiplied in)."""
    kind, param = loss_name
    diff = y_pred - y_true
    if kind == "mse":
        return tf.reduce_mean(diff**2, axis=-1)
    if kind == "mae":
        return tf.reduce_mean(tf.abs(diff), axis=-1)
    if kind == "huber":
        small = tf.abs(diff) <= param
        return tf.reduce_mean(tf.where(small, 0.5 * diff**2, param * tf.abs(diff) - 0.5 * param**2), axis=-1)
    return param * tf.reduce_mean(diff**2, axis=-1)  # scaled


def _loss_argument(loss_name):
    kind, param = loss_name
    if kind == "huber":
        return keras.losses.Huber(delta=param)
    if kind == "scaled":
        return Scaled(param) if param > 1 else (lambda t, p: param * keras.ops.mean(keras.ops.square(p - t), axis=-1))
    return kind


LOSSES = st.sampled_from(
    [("mse", None), ("mae", None), ("huber", 0.5), ("huber", 2.0), ("scaled", 0.5), ("scaled", 3.0)]
)


@st.composite
def valid_batches(draw):
    n = draw(st.integers(1, 5))
    x = draw(_array((n, 3), st.floats(-3, 3, width=32)))
    y = draw(_array((n, 2), st.floats(-3, 3, width=32)))
    weights = draw(st.one_of(st.none(), _array((n,), st.floats(0, 2, width=32))))
    as_tensor = draw(st.booleans())
    return (tf.constant(x) if as_tensor else x), y, weights


def _reference(model, x, y, weights, loss_name, layer):
    """Loss, dLoss/dW and dLoss/d(output of ``layer``) by hand, for the two-Dense MLP."""
    first, second = model.layers
    with tf.GradientTape(persistent=True) as tape:
        hidden = first(tf.convert_to_tensor(x))
        tape.watch(hidden)
        pred = second(hidden)
        tape.watch(pred)
        per_sample = _per_sample(loss_name, tf.constant(y), pred)
        if weights is not None:
            per_sample = per_sample * weights
        loss = tf.reduce_mean(per_sample)
    grads = [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]
    at_output = tape.gradient(loss, [hidden, pred][layer]).numpy()
    return float(loss), grads, at_output


@SETTINGS
@given(batch=valid_batches(), loss_name=LOSSES, layer=st.sampled_from([0, 1, -1, -2]), training=st.booleans())
def test_valid_values_agree_with_a_hand_written_tape(mlp_model, batch, loss_name, layer, training):
    x, y, weights = batch
    before = _state(mlp_model)
    loss_value, grads, at_output = _reference(mlp_model, x, y, weights, loss_name, layer % 2)
    loss = _loss_argument(loss_name)
    r = gm.weight_gradients(mlp_model, x, y, loss=loss, training=training, sample_weight=weights)
    np.testing.assert_allclose(r.loss, loss_value, rtol=1e-4, atol=1e-5)
    for got, want in zip(r.arrays(), grads):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    o = gm.output_gradients(mlp_model, x, y, layer=layer, loss=loss, training=training, sample_weight=weights)
    np.testing.assert_allclose(o.array, at_output, rtol=1e-4, atol=1e-5)
    part = gm.weight_gradients(mlp_model, x, y, layer=layer, loss=loss, sample_weight=weights)
    for got, want in zip(part.arrays(), grads[2 * (layer % 2) : 2 * (layer % 2) + 2]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert _state(mlp_model) == before


@SETTINGS
@given(batch=valid_batches(), output=st.one_of(st.none(), st.integers(-2, 1)), training=st.booleans())
def test_input_gradients_agree_with_a_batch_jacobian(mlp_model, batch, output, training):
    x = np.asarray(batch[0])
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        pred = mlp_model(xt)
    jacobian = tape.batch_jacobian(pred, xt).numpy()  # (n, 2, 3)
    j = gm.input_gradients(mlp_model, x, output=output, training=training)
    want = jacobian if output is None else jacobian[:, output % 2]
    np.testing.assert_allclose(j.array, want, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(batch=valid_batches(), training=st.booleans(), structure=st.sampled_from(["dict", "list"]))
def test_two_inputs_two_outputs_agree_with_a_tape(two_io_model, batch, training, structure):
    x3, y2, weights = batch
    x3, n = np.asarray(x3), len(y2)
    xa, xb = x3[:, :2], x3
    yp, yq = y2[:, :1], y2
    x = {"a": xa, "b": xb} if structure == "dict" else [xa, xb]
    y = {"p": yp, "q": yq} if structure == "dict" else [yp, yq]
    with tf.GradientTape() as tape:
        p, q = two_io_model({"a": xa, "b": xb})
        per_sample = [tf.reduce_mean((p - yp) ** 2, axis=-1), tf.reduce_mean((q - yq) ** 2, axis=-1)]
        if weights is not None:
            per_sample = [term * weights for term in per_sample]
        loss = tf.add_n([tf.reduce_sum(term) / n for term in per_sample])
    grads = tape.gradient(loss, two_io_model.trainable_weights)
    before = _state(two_io_model)
    r = gm.weight_gradients(two_io_model, x, y, loss="mse", training=training, sample_weight=weights)
    np.testing.assert_allclose(r.loss, float(loss), rtol=1e-4, atol=1e-5)
    for got, want in zip(r.arrays(), grads):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    assert _state(two_io_model) == before


@SETTINGS
@given(
    batch=valid_batches(),
    where=st.sampled_from(["x", "y"]),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    training=st.booleans(),
)
def test_nan_and_inf_warn_and_change_nothing(stateful_model, batch, where, bad, training):
    x, y, _ = batch
    x, y = np.array(x), y.copy()
    (x if where == "x" else y)[0, 0] = bad
    before = _state(stateful_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = gm.weight_gradients(stateful_model, x, y, training=training)
        gm.input_gradients(stateful_model, x, training=training)
    assert any(issubclass(w.category, GradmagicWarning) and f"{where} holding" in str(w.message) for w in caught)
    assert not all(s.finite for s in r.stats) or not np.isfinite(r.loss)
    assert _state(stateful_model) == before


@SETTINGS
@given(batch=valid_batches(), training=st.booleans(), layer=st.integers(0, 3))
def test_training_mode_leaves_batch_norm_and_dropout_state_alone(stateful_model, batch, training, layer):
    x, y, weights = batch
    before = _state(stateful_model)
    r = gm.weight_gradients(stateful_model, x, y, training=training, sample_weight=weights)
    o = gm.output_gradients(stateful_model, x, y, layer=layer, training=training)
    assert np.isfinite(r.loss) and all(np.all(np.isfinite(a)) for a in r.arrays())
    assert np.all(np.isfinite(o.array))
    assert _state(stateful_model) == before
