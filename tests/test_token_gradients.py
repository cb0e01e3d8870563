"""Token models: what kind of input a model takes, and gradients at the Embedding's output."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import token_model

import gradmagic as gm
from gradmagic.core import input_kind
from gradmagic.errors import InputError


@pytest.fixture(scope="module")
def tokens():
    return token_model()


@pytest.fixture(scope="module")
def three_features():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="three")
    return model, np.zeros((4, 3), "float32")


def test_input_kind_reads_the_declared_input(tokens):
    def on(*shape, dtype="float32"):
        return keras.Sequential([keras.Input(shape, dtype=dtype), keras.layers.Flatten(), keras.layers.Dense(1)])

    assert input_kind(tokens[0]) == "tokens"
    assert [input_kind(on(3)), input_kind(on(4, 2)), input_kind(on(8, 8, 3))] == ["vector", "sequence", "image"]
    assert input_kind(on(3, dtype="int32")) is None  # integers with no Embedding to read them
    assert input_kind(on(2, 3, 4, 1)) is None
    assert input_kind(keras.Sequential([keras.layers.Dense(1)])) == "undeclared"


def test_token_gradients_with_a_scale_are_the_gradients_at_the_scaled_embeddings(tokens):
    model, x = tokens
    scale = np.array([0.3, 2.0], "float32")
    result = gm.token_gradients(model, x, output=1, scale=scale)
    embed = model.get_layer("embed")
    with tf.GradientTape() as tape:
        vectors = embed(x) * scale[:, None, None]
        tape.watch(vectors)
        out = vectors
        for layer in model.layers[2:]:
            out = layer(out)
        unit = out[:, 1]
    np.testing.assert_allclose(result.embeddings, vectors.numpy(), rtol=1e-6)
    np.testing.assert_allclose(result.array, tape.gradient(unit, vectors).numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(result.values, unit.numpy(), rtol=1e-5)


def test_token_gradients_refuses_a_scale_of_the_wrong_shape(tokens):
    model, x = tokens
    with pytest.raises(InputError, match=r"scale of shape \(3,\). Expected one finite factor per sample \(2,\)"):
        gm.token_gradients(model, x, scale=[1.0, 1.0, 1.0])


def test_token_gradients_refuses_models_without_an_embedding(three_features):
    model, x = three_features
    with pytest.raises(InputError, match=r"which has no keras\.layers\.Embedding"):
        gm.token_gradients(model, x)


def test_token_gradients_refuses_an_output_out_of_range(tokens):
    model, x = tokens
    with pytest.raises(InputError, match=r"output=2. Expected an int from 0 to 1"):
        gm.token_gradients(model, x, output=2)


def test_token_gradients_keep_the_embeddings_mask():
    keras.utils.set_random_seed(1)
    ids = keras.Input((6,), dtype="int32")
    embedded = keras.layers.Embedding(10, 4, mask_zero=True)(ids)
    model = keras.Model(ids, keras.layers.Dense(1)(keras.layers.LSTM(3)(embedded)))
    x = np.array([[3, 4, 5, 0, 0, 0]])
    result = gm.token_gradients(model, x)
    embed, rnn, dense = model.layers[1:4]
    with tf.GradientTape() as tape:
        vectors = embed(x)
        tape.watch(vectors)
        out = dense(rnn(vectors, mask=embed.compute_mask(x)))[:, 0]
    np.testing.assert_allclose(result.array, tape.gradient(out, vectors).numpy(), rtol=1e-5, atol=1e-9)
    assert np.all(result.array[0, 3:] == 0)  # padding is masked out: the LSTM never reads it


@pytest.mark.parametrize(
    "bad",
    [
        np.array([[1, 2, 3, 4, 12]], "int32"),  # input_dim is 12: TensorFlow's lookup fails on it (zeros on a GPU)
        np.array([[1, 2, -1, 4, 5]], "int32"),
        np.array([[1.5, 2, 3, 4, 5]], "float32"),  # not a whole number: the lookup would truncate it silently
    ],
)
def test_values_that_are_not_token_ids_are_refused_before_the_model_runs(tokens, bad):
    model, _ = tokens
    with pytest.raises(InputError, match=r"not token ids of 'embed'.*Expected whole numbers from 0 to 11"):
        gm.token_gradients(model, bad)
    with pytest.raises(InputError, match=r"not token ids of 'embed'"):
        gm.explore(model, bad, use_ipympl=False)
