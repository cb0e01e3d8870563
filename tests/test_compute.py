"""The compiled-call fast path gives exactly what TensorFlow's own structured call gives."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from gradmagic.core.questions import compute


def _callers(concrete: dict) -> list:
    """The callers among the entries (the dict also notes the shapes it has seen)."""
    return [v for v in concrete.values() if callable(v)]


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
        (caller,) = _callers(concrete)
        assert caller.__name__ == "call_flat_tensors"  # the fast path, not the fallback
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
    assert len(_callers(concrete)) == 1


def _sequence_model() -> keras.Model:
    # Any sequence length: Embedding and the pooling take the time axis as it comes.
    model = keras.Sequential(
        [keras.Input((None,), dtype="int32"), keras.layers.Embedding(20, 3), keras.layers.GlobalAveragePooling1D()]
    )
    model.add(keras.layers.Dense(1))
    return model


def test_sequences_of_many_lengths_share_one_trace_with_a_free_time_axis():
    model = _sequence_model()
    fn = _function(model)
    concrete: dict = {}
    rng = np.random.default_rng(2)
    for length in (2, 3, 5, 8, 13, 21, 34):
        x = rng.integers(0, 20, size=(3, length)).astype("int32")
        y = rng.normal(size=(3, 1)).astype("float32")
        loss, grads = compute.call_compiled(fn, concrete, (x, y, None))
        with tf.GradientTape() as tape:
            want = tf.reduce_mean(tf.reduce_sum((model(x) - y) ** 2, axis=1))
        # Different compiled graphs of the same math: equal to float32 rounding.
        np.testing.assert_allclose(loss.numpy(), want.numpy(), rtol=1e-5)
        for got, ref in zip(grads, tape.gradient(want, model.trainable_weights)):
            np.testing.assert_allclose(tf.convert_to_tensor(got).numpy(), tf.convert_to_tensor(ref).numpy(), atol=1e-6)
    # Two lengths traced as they are, then one trace for every length: not one graph per length.
    assert fn.experimental_get_tracing_count() <= 3


class SumOfSquares(keras.layers.Layer):
    """Reads its input's static length in Python: it cannot be traced with that axis free."""

    def call(self, t):
        return tf.reshape(tf.square(t), (-1, int(t.shape[1]))) @ tf.ones((int(t.shape[1]), 1))


def test_a_model_that_needs_static_sizes_keeps_exact_traces_and_right_values():
    model = keras.Sequential([SumOfSquares()])  # no declared input: it could not be built with a free length
    fn = _function(model)
    concrete: dict = {}
    rng = np.random.default_rng(3)
    for length in (1, 2, 3, 4, 5):
        x, y = rng.normal(size=(2, length)).astype("float32"), rng.normal(size=(2, 1)).astype("float32")
        loss, _ = compute.call_compiled(fn, concrete, (x, y, None))
        by_hand = np.mean((np.sum(x**2, axis=1, keepdims=True) - y) ** 2)
        np.testing.assert_allclose(loss.numpy(), by_hand, rtol=1e-5)
    assert len(_callers(concrete)) == 5  # one exact trace per length: the free-axis trace failed once
