"""A tf.data.Dataset, a PyDataset or a generator as x: the first batch is used, as fit reads it, and said so."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_matches_tape, mlp, mse_tape

import gradmagic as gm
from gradmagic.errors import InputError

RNG = np.random.default_rng(3)
X = RNG.normal(size=(6, 3)).astype("float32")
Y = RNG.normal(size=(6, 2)).astype("float32")
W = np.array([1.0, 0.0, 2.0, 1.0], "float32")


def test_dataset_of_x_y_gives_its_first_batch():
    model = mlp()
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(4)
    result = gm.weight_gradients(model, data, None)
    assert_matches_tape(result, mse_tape(model, X[:4], Y[:4]))
    assert result.source == "x, y: the first batch of a tf.data.Dataset"
    assert "first batch of a tf.data.Dataset" in repr(result) and "first batch" in result._repr_html_()


def test_dataset_needs_no_y_argument_as_in_fit():
    # weight_gradients(model, ds) is written as fit(ds) is: y defaults to None.
    model = mlp()
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(4)
    assert_matches_tape(gm.weight_gradients(model, data), mse_tape(model, X[:4], Y[:4]))


def test_dataset_with_sample_weights():
    model = mlp()
    data = tf.data.Dataset.from_tensor_slices((X, Y, np.r_[W, W[:2]])).batch(4)
    assert_matches_tape(gm.weight_gradients(model, data, None), mse_tape(model, X[:4], Y[:4], W))


def test_dataset_for_input_gradients_and_output_gradients():
    model = mlp()
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(2)
    j = gm.input_gradients(model, data, output=0)
    with tf.GradientTape() as tape:
        xt = tf.constant(X[:2])
        tape.watch(xt)
        out = model(xt)[:, 0]
    np.testing.assert_allclose(j.array, tape.gradient(out, xt).numpy(), rtol=1e-5, atol=1e-6)
    assert j.source.startswith("x, y: the first batch")
    o = gm.output_gradients(model, data, None, layer=-1)
    assert o.array.shape == (2, 2) and o.source is not None


def test_generator_is_advanced_by_one_batch_and_says_so():
    model = mlp()

    def batches():
        for start in (0, 3):
            yield X[start : start + 3], Y[start : start + 3]

    stream = batches()
    first = gm.weight_gradients(model, stream, None)
    assert_matches_tape(first, mse_tape(model, X[:3], Y[:3]))
    assert "advanced by one batch" in first.source
    second = gm.weight_gradients(model, stream, None)  # the side effect: the next call sees batch 2
    assert_matches_tape(second, mse_tape(model, X[3:], Y[3:]))
    with pytest.raises(InputError, match=r"a generator with no elements left"):
        gm.weight_gradients(model, stream, None)


def test_py_dataset_batch_zero():
    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return X[index * 3 : index * 3 + 3], Y[index * 3 : index * 3 + 3]

    model = mlp()
    result = gm.weight_gradients(model, Batches(), None)
    assert_matches_tape(result, mse_tape(model, X[:3], Y[:3]))
    assert "batch 0 of a PyDataset" in result.source


def test_y_beside_a_dataset_is_an_error_that_says_so():
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(2)
    with pytest.raises(InputError, match=r"x as a tf.data.Dataset and y as well.*drop y="):
        gm.weight_gradients(mlp(), data, Y)
    with pytest.raises(InputError, match=r"and sample_weight as well"):
        gm.output_gradients(mlp(), data, None, layer=0, sample_weight=W)


def test_dataset_of_x_alone_needs_targets_from_somewhere():
    data = tf.data.Dataset.from_tensor_slices(X).batch(2)
    with pytest.raises(gm.GradmagicError, match=r"Received: y=None"):
        gm.weight_gradients(mlp(), data, None)
    assert gm.input_gradients(mlp(), data).array.shape == (2, 2, 3)


def test_check_gradients_and_explain_take_a_dataset():
    model = mlp()
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(2)
    check = gm.check_gradients(model, data)  # y comes from the dataset, as in fit(data)
    assert check.passed and any("first batch" in note for note in check.notes)
    explanation = gm.explain(model, data)
    assert any("first batch" in note for note in explanation.notes)


def test_elements_fit_cannot_read_are_refused():
    data = tf.data.Dataset.from_tensor_slices((X, Y, W[:1].repeat(6), W[:1].repeat(6))).batch(2)
    with pytest.raises(InputError, match=r"tuples of 4 items. Expected \(x,\), \(x, y\) or \(x, y, sample_weight\)"):
        gm.weight_gradients(mlp(), data, None)
