"""Layer and loss resolution: every user mistake gets a clear GradmagicError."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import assert_unchanged, fingerprint, mlp

import gradmagic as gm
from gradmagic.core.questions.targets import has_custom_compute_loss, resolve_layer, weight_slots
from gradmagic.errors import LayerError, LossError, NoWeightsError


def _functional():
    inputs = keras.Input((3,), name="features")
    hidden = keras.layers.Dense(4, name="dense")(inputs)
    dropped = keras.layers.Dropout(0.1, name="dropout")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(1, name="dense_1")(dropped), name="func")
    model.compile(optimizer="sgd", loss="mse")
    return model


X = np.ones((2, 3), "float32")
Y = np.zeros((2, 1), "float32")


def test_functional_indices_include_the_input_layer():
    model = _functional()
    assert resolve_layer(model, 0)[1].name == "features"
    assert resolve_layer(model, 1)[1].name == "dense"
    assert resolve_layer(model, -1)[1].name == "dense_1"
    assert resolve_layer(model, "dropout")[0] == 2
    assert resolve_layer(model, np.int64(1))[1].name == "dense"
    assert [(s.layer_index, s.layer_name, s.name) for s in weight_slots(model)] == [
        (1, "dense", "kernel"),
        (1, "dense", "bias"),
        (3, "dense_1", "kernel"),
        (3, "dense_1", "bias"),
    ]


def test_index_out_of_range_names_the_valid_range():
    model = _functional()
    with pytest.raises(LayerError, match=r"layer=7\. Expected an index in \[0, 3\].*'features', 'dense'"):
        gm.weight_gradients(model, X, Y, layer=7)


def test_unknown_name_suggests_the_closest():
    model = _functional()
    with pytest.raises(LayerError, match=r"layer='dens_1'.*Did you mean 'dense_1', 'dense'"):
        gm.output_gradients(model, X, Y, layer="dens_1")


def test_layer_without_weights_is_an_error_not_a_shift():
    model = _functional()
    with pytest.raises(
        NoWeightsError, match=r"layer 2 'dropout' \(Dropout\).*it has no weights.*1 \(dense\), 3 \(dense_1\)"
    ):
        gm.weight_gradients(model, X, Y, layer="dropout")
    with pytest.raises(NoWeightsError, match="InputLayer"):
        gm.weight_gradients(model, X, Y, layer=0)


def test_frozen_layer_says_it_is_frozen():
    model = _functional()
    model.get_layer("dense").trainable = False
    with pytest.raises(NoWeightsError, match=r"frozen \(trainable=False\)"):
        gm.weight_gradients(model, X, Y, layer="dense")


def test_layer_of_wrong_type():
    with pytest.raises(LayerError, match=r"layer=1\.5 of type float"):
        gm.weight_gradients(_functional(), X, Y, layer=1.5)


def test_no_compiled_loss_and_no_loss_given():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)], name="plain")
    with pytest.raises(LossError, match=r"'plain' has no compiled loss.*loss='mse'.*model\.compile"):
        gm.weight_gradients(model, X, Y)
    # The same model works with an explicit loss, and for input gradients.
    assert gm.weight_gradients(model, X, Y, loss="mse").loss >= 0
    assert gm.input_gradients(model, X).array.shape == (2, 1, 3)


def test_unknown_loss_name_suggests_keras_names():
    with pytest.raises(LossError, match=r"loss='mean_squared_eror'.*Did you mean 'mean_squared_error'"):
        gm.weight_gradients(_functional(), X, Y, loss="mean_squared_eror")


def test_missing_targets_say_why_they_are_needed():
    with pytest.raises(LossError, match=r"y=None.*input_gradients"):
        gm.weight_gradients(_functional(), X, None)


def test_errors_leave_the_model_unchanged():
    model = mlp()
    before = fingerprint(model)
    for layer in (10, "nope"):
        with pytest.raises(gm.GradmagicError):
            gm.weight_gradients(model, np.ones((2, 3)), np.zeros((2, 2)), layer=layer)
    assert_unchanged(model, before)


class OwnLoss(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return 3.0 * keras.ops.mean(keras.ops.square(y_pred - y))


class KerasLoss(OwnLoss):
    compute_loss = keras.Model.compute_loss  # back to Keras's own: the compiled loss


def test_a_custom_compute_loss_is_told_from_keras_own():
    assert not has_custom_compute_loss(mlp())
    assert has_custom_compute_loss(OwnLoss())
    assert not has_custom_compute_loss(KerasLoss())
    # What it decides: the model's own loss is used (3 x MSE), where Keras's would need compile().
    model, x, y = OwnLoss(), np.ones((2, 3), "float32"), np.zeros((2, 1), "float32")
    r = gm.weight_gradients(model, x, y)
    np.testing.assert_allclose(r.loss, 3.0 * float(np.mean(np.square(model(x).numpy()))), rtol=1e-5)
    with pytest.raises(LossError, match="no compiled loss"):
        gm.weight_gradients(KerasLoss(), x, y)
