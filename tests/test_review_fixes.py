"""Regressions found in review: output alignment, mixed precision, caching, Embedding, lambda losses."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_unchanged, fingerprint

import gradmagic as gm

RNG = np.random.default_rng(7)
X = RNG.normal(size=(6, 3)).astype("float32")


def _two_outputs(dict_outputs: bool = False) -> keras.Model:
    inputs = keras.Input((3,), name="inp")
    second = keras.layers.Dense(2, name="second")(inputs)  # created first, named later in the alphabet
    first = keras.layers.Dense(1, name="first")(inputs)
    outputs = {"z": second, "a": first} if dict_outputs else [second, first]
    return keras.Model(inputs, outputs)


def _mse(y_true, y_pred, weight=None):
    per_sample = np.mean((y_pred - y_true) ** 2, axis=-1)
    return float(np.mean(per_sample if weight is None else per_sample * weight))


def test_dict_targets_and_weights_follow_output_names_not_sorted_keys():
    model = _two_outputs()
    y_second, y_first = RNG.normal(size=(6, 2)).astype("f4"), RNG.normal(size=(6, 1)).astype("f4")
    w_second, w_first = np.linspace(0, 1, 6).astype("f4"), np.full(6, 3.0, "f4")
    pred_second, pred_first = (t.numpy() for t in model(X))
    expected = _mse(y_second, pred_second, w_second) + _mse(y_first, pred_first, w_first)
    r = gm.weight_gradients(
        model,
        X,
        {"first": y_first, "second": y_second},
        loss="mse",
        sample_weight={"first": w_first, "second": w_second},
    )
    assert r.loss == pytest.approx(expected, rel=1e-5)
    model.compile(loss=["mse", "mse"])
    compiled = gm.weight_gradients(model, X, [y_second, y_first], sample_weight={"first": w_first, "second": w_second})
    assert compiled.loss == pytest.approx(expected, rel=1e-5)


def test_dict_output_models_are_addressed_by_their_keys():
    model = _two_outputs(dict_outputs=True)
    out = model(X)
    y = {"z": np.zeros((6, 2), "f4"), "a": np.ones((6, 1), "f4")}
    r = gm.weight_gradients(model, X, y, loss={"z": "mse", "a": "mae"})
    expected = _mse(y["z"], out["z"].numpy()) + float(np.mean(np.abs(out["a"].numpy() - 1.0)))
    assert r.loss == pytest.approx(expected, rel=1e-5)
    with pytest.raises(
        gm.GradmagicError, match=r"y\['a'\] of shape \(6, 2\), but the model's output 'a' .*\(batch, 1\)"
    ):
        gm.weight_gradients(model, X, {"z": np.zeros((6, 1)), "a": np.zeros((6, 2))}, loss="mse")


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
    pred = model(X)
    keras_loss = float(model.compute_loss(x=X, y=y, y_pred=pred))
    assert gm.weight_gradients(model, X, y).loss == pytest.approx(keras_loss, rel=1e-6)
    explicit = gm.weight_gradients(model, X, y, loss="mse")
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


def test_lambda_and_inline_losses():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    y = np.zeros((6, 1), "float32")
    r = gm.weight_gradients(model, X, y, loss=lambda t, p: keras.ops.mean((p - t) ** 2, axis=-1))
    assert r.loss == pytest.approx(_mse(y, model(X).numpy()), rel=1e-5)
    from gradmagic.core.questions import compute

    for _ in range(3):  # an inline Loss object each call is the same question, traced once
        gm.weight_gradients(model, X, y, loss=keras.losses.Huber(delta=0.5))
    assert sum(1 for key in compute._cache[model] if key[0] == "weights") == 2


def test_recompiling_with_other_loss_weights_is_seen():
    model = _two_outputs()
    optimizer = keras.optimizers.SGD()
    y = [np.ones((6, 2), "f4"), np.ones((6, 1), "f4")]
    model.compile(optimizer=optimizer, loss=["mse", "mse"], loss_weights=[1.0, 1.0])
    both = gm.weight_gradients(model, X, y).loss
    model.compile(optimizer=optimizer, loss=["mse", "mse"], loss_weights=[1.0, 0.0])
    first_only = gm.weight_gradients(model, X, y).loss
    assert first_only == pytest.approx(_mse(y[0], model(X)[0].numpy()), rel=1e-5) and first_only < both


def test_freezing_batchnorm_changes_output_and_input_questions():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(name="bn")])
    model.compile(loss="mse")
    y = np.zeros((6, 4), "float32")
    before = gm.output_gradients(model, X, y, layer=0, training=True).loss
    model.get_layer("bn").trainable = False  # Keras 3 then runs BN in inference mode
    frozen = gm.output_gradients(model, X, y, layer=0, training=True).loss
    assert frozen == pytest.approx(float(model.compute_loss(x=X, y=y, y_pred=model(X, training=True))), rel=1e-5)
    assert frozen != pytest.approx(before)
    jac = gm.input_gradients(model, X[:1], training=True).array
    with tf.GradientTape() as tape:
        point = tf.constant(X[:1])
        tape.watch(point)
        out = model(point, training=True)
    np.testing.assert_allclose(jac[0], tape.jacobian(out, point).numpy()[0, :, 0, :], rtol=1e-5)


def test_sequential_pop_and_add_are_seen():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d1"), keras.layers.Dense(2, name="d2")])
    model.compile(loss="mse")
    gm.weight_gradients(model, X, np.zeros((6, 2)))
    model.pop()
    model.add(keras.layers.Dense(5, name="d3"))
    before = fingerprint(model)
    o = gm.output_gradients(model, X, np.zeros((6, 5)), layer=1)
    assert o.layer_name == "d3" and o.array.shape == (6, 5)
    kernel = model.get_layer("d3").kernel.numpy()
    expected = (model.layers[0].kernel.numpy() @ kernel).T
    np.testing.assert_allclose(gm.input_gradients(model, X[:1]).array[0], expected, rtol=1e-5)
    assert_unchanged(model, before)


def test_signatures_keep_structure_and_rank():
    class Two(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, inputs):
            return self.dense(keras.ops.concatenate(list(inputs), axis=-1))

    model = Two()
    u, v = X[:, :1], X[:, 1:]
    as_list = gm.input_gradients(model, [u, v]).array
    as_tuple = gm.input_gradients(model, (u, v)).array
    np.testing.assert_allclose(as_list[0], as_tuple[0], rtol=1e-6)  # maybe two compiled graphs: a tolerance
    sparse = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    sparse.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    labels = np.array([0, 1, 2, 3, 0, 1])
    flat = gm.weight_gradients(sparse, X, labels).loss
    column = gm.weight_gradients(sparse, X, labels[:, None]).loss
    assert flat == pytest.approx(column, rel=1e-5)  # two label shapes, two compiled graphs: float32 rounding
