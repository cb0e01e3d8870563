"""The compiled-call fast path gives exactly what TensorFlow's own structured call gives."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from gradmagic.core.questions import compute


def _two_input_model() -> keras.Model:
    # Keys deliberately not in sorted order: flattening must follow TensorFlow's.
    zeta, alpha = keras.Input((3,), name="zeta"), keras.Input((2,), name="alpha")
    joined = keras.layers.Concatenate()([keras.layers.Dense(4)(zeta), keras.layers.Dense(4)(alpha)])
    return keras.Model({"zeta": zeta, "alpha": alpha}, keras.layers.Dense(1)(joined))


def _function(model: keras.Model):
    @tf.function
    def loss_and_grads(x, y, sample_weight):
        with tf.GradientTape() as tape:
            pred = model(x)
            per_sample = tf.reduce_sum((pred - y) ** 2, axis=1)
            if sample_weight is not None:
                per_sample = per_sample * sample_weight
            loss = tf.reduce_mean(per_sample)
        return loss, tape.gradient(loss, model.trainable_weights)

    return loss_and_grads


def test_flat_call_is_used_and_equals_the_structured_call():
    model = _two_input_model()
    fn = _function(model)
    rng = np.random.default_rng(0)
    x = {"zeta": rng.normal(size=(5, 3)).astype("float32"), "alpha": rng.normal(size=(5, 2)).astype("float32")}
    y = rng.normal(size=(5, 1)).astype("float32")
    for sample_weight in (None, rng.uniform(size=(5,)).astype("float32")):
        concrete: dict = {}
        loss, grads = compute.call_compiled(fn, concrete, (x, y, sample_weight))
        (traces,) = concrete.values()
        assert traces.exact.__name__ == "call_flat_tensors"  # the fast path, not the fallback
        want_loss, want_grads = fn(x, y, sample_weight)
        # The flat concrete function (free batch size) and the structured call may be two traces of the
        # same math: equal to float32 rounding, not necessarily bit for bit.
        np.testing.assert_allclose(loss.numpy(), want_loss.numpy(), rtol=1e-6)
        for got, want in zip(grads, want_grads):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)


def test_one_concrete_function_serves_every_batch_size():
    model = _two_input_model()
    fn = _function(model)
    concrete: dict = {}
    rng = np.random.default_rng(1)
    for batch in (1, 4, 9):
        x = {"alpha": rng.normal(size=(batch, 2)).astype("float32"), "zeta": rng.normal(size=(batch, 3))}
        x["zeta"] = x["zeta"].astype("float32")
        y = rng.normal(size=(batch, 1)).astype("float32")
        loss, _ = compute.call_compiled(fn, concrete, (x, y, None))
        pred = model(x).numpy()
        np.testing.assert_allclose(loss.numpy(), np.mean(np.sum((pred - y) ** 2, axis=1)), rtol=1e-5)
    assert len(concrete) == 1
    assert fn.experimental_get_tracing_count() == 1


def test_sequences_of_several_lengths_through_time_distributed_give_the_models_own_outputs():
    # Each length gets a trace of its own: TimeDistributed keeps the length it was built with, so a
    # trace with the time axis left free would silently compute with that length instead.
    inp = keras.Input((None, 3))
    hidden = keras.layers.LSTM(4, return_sequences=True)(inp)
    model = keras.Model(inp, keras.layers.TimeDistributed(keras.layers.Dense(2))(hidden))
    model(np.zeros((1, 2, 3), "float32"))  # a first eager call, as predict or a first question makes

    @tf.function
    def outputs(x):
        return model(x)

    concrete: dict = {}
    rng = np.random.default_rng(4)
    for length in (2, 3, 4, 6, 7):
        x = rng.normal(size=(2, length, 3)).astype("float32")
        got = compute.call_compiled(outputs, concrete, (x,))
        # The eager model and the traced graph: equal to float32 rounding.
        np.testing.assert_allclose(got.numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_a_question_fed_many_sequence_lengths_keeps_a_bounded_number_of_traces():
    import gradmagic as gm

    model = keras.Sequential(
        [keras.Input((None,), dtype="int32"), keras.layers.Embedding(20, 3), keras.layers.GlobalAveragePooling1D()]
    )
    model.add(keras.layers.Dense(1))
    rng = np.random.default_rng(5)
    held = []
    for length in range(2, 2 + 2 * compute.MAX_SIGNATURES):
        x = rng.integers(0, 20, size=(3, length)).astype("int32")
        y = rng.normal(size=(3, 1)).astype("float32")
        result = gm.weight_gradients(model, x, y, loss="mse")
        with tf.GradientTape() as tape:
            want = tf.reduce_mean(tf.square(model(x) - y))
        # Different compiled graphs of the same math: equal to float32 rounding.
        np.testing.assert_allclose(result.loss, float(want), rtol=1e-5)
        for got, ref in zip(result.arrays(), tape.gradient(want, model.trainable_weights)):
            np.testing.assert_allclose(got, tf.convert_to_tensor(ref).numpy(), atol=1e-6)
        held.append(sum(len(question.concrete) for question, _ in compute._cache.get(model, {}).values()))
    assert max(held) <= compute.MAX_SIGNATURES


def test_two_traces_serve_every_batch_size_with_exact_batch():
    """With exact_batch, the first batch size gets a static-shape graph; one free graph serves all others."""
    model = _two_input_model()
    fn = _function(model)
    concrete: dict = {}
    rng = np.random.default_rng(1)
    for batch in (4, 1, 9, 4, 2):
        x = {"alpha": rng.normal(size=(batch, 2)).astype("float32"), "zeta": rng.normal(size=(batch, 3))}
        x["zeta"] = x["zeta"].astype("float32")
        y = rng.normal(size=(batch, 1)).astype("float32")
        loss, _ = compute.call_compiled(fn, concrete, (x, y, None), exact_batch=True)
        pred = model(x).numpy()
        np.testing.assert_allclose(loss.numpy(), np.mean(np.sum((pred - y) ** 2, axis=1)), rtol=1e-5)
    assert len(concrete) == 1
    assert fn.experimental_get_tracing_count() == 2
    (traces,) = concrete.values()
    assert traces.batch == ((4,), (4,), (4,))  # alpha, zeta (sorted, as TensorFlow flattens), y
    assert traces.free is not None


def test_exact_batch_traces_the_first_batch_size_with_its_static_shape():
    """A graph for the exact shape, as a hand-written tf.function gets (a free batch axis slows RNN loops)."""
    shapes = []

    @tf.function
    def record(x):
        shapes.append(tuple(x.shape))
        return tf.reduce_sum(x)

    concrete: dict = {}
    assert compute.call_compiled(record, concrete, exact_batch=True, args=(np.ones((3, 2), "float32"),)).numpy() == 6.0
    assert compute.call_compiled(record, concrete, exact_batch=True, args=(np.ones((3, 2), "float32"),)).numpy() == 6.0
    assert shapes == [(3, 2)]
    assert compute.call_compiled(record, concrete, exact_batch=True, args=(np.ones((5, 2), "float32"),)).numpy() == 10.0
    assert compute.call_compiled(record, concrete, exact_batch=True, args=(np.ones((7, 2), "float32"),)).numpy() == 14.0
    assert shapes == [(3, 2), (None, 2)]
