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
