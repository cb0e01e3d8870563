"""Input and target conversion: shapes, structures and dtypes, with clear errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import X6, mlp, numpy_mse, two_outputs

import gradmagic as gm
from gradmagic.core.questions.inputs import model_spec, prepare_inputs, prepare_targets
from gradmagic.errors import InputError, LossError, ModelBuildError


def test_single_sample_and_scalars_get_a_batch_axis():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    spec = model_spec(model)
    for value, shape in [(0.5, (1, 1)), ([0.5], (1, 1)), ([0.1, 0.2, 0.3], (3, 1)), (np.zeros((4, 1)), (4, 1))]:
        prepared, batch = prepare_inputs(model, value, spec)
        assert prepared.shape == shape and batch == shape[0]
        assert prepared.dtype == np.float32


def test_integer_lists_become_floats_for_float_inputs():
    model = mlp((2, 3, 1))
    prepared, _ = prepare_inputs(model, [[1, 2], [3, 4]], model_spec(model))
    assert prepared.dtype == np.float32


def test_wrong_feature_count_names_the_expected_shape():
    model = mlp((3, 4, 2), name="mlp3")
    with pytest.raises(InputError, match=r"x of shape \(5, 4\), but model 'mlp3' expects \(batch, 3\)"):
        gm.weight_gradients(model, np.ones((5, 4)), np.zeros((5, 2)))


def test_target_count_must_match_samples():
    model = mlp()
    with pytest.raises(InputError, match=r"y with 3 samples, but x has 5"):
        gm.weight_gradients(model, np.ones((5, 3)), np.zeros((3, 2)))


def test_target_shape_must_match_the_output():
    model = mlp((3, 4, 2))
    with pytest.raises(InputError, match=r"y of shape \(5, 3\), but the model's output .* \(batch, 2\)"):
        gm.weight_gradients(model, np.ones((5, 3)), np.zeros((5, 3)))
    # One class id per sample is fine for a sparse loss.
    r = gm.weight_gradients(model, np.ones((5, 3)), np.ones((5, 1), "int32"), loss="sparse_categorical_crossentropy")
    assert np.isfinite(r.loss)


def test_empty_batch_is_refused():
    with pytest.raises(InputError, match="empty batch"):
        gm.input_gradients(mlp(), np.zeros((0, 3)))


def test_targets_get_a_unit_axis_only_for_unit_outputs():
    model = mlp((2, 3, 1))
    spec = model_spec(model)
    assert prepare_targets(model, [1.0, 2.0], 2, spec).shape == (2, 1)
    sparse = mlp((2, 3, 4))
    assert prepare_targets(sparse, np.array([1, 3]), 2, model_spec(sparse)).shape == (2,)
    with pytest.raises(LossError):
        prepare_targets(model, None, 2, spec)


def test_multi_input_structure_errors():
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    model = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    with pytest.raises(InputError, match=r"single array, but model .* has 2 inputs 'a', 'b'"):
        gm.input_gradients(model, np.ones((2, 2)))
    with pytest.raises(InputError, match=r"list of 3 arrays.*2 inputs"):
        gm.input_gradients(model, [np.ones((2, 2))] * 3)
    with pytest.raises(InputError, match=r"missing 'b'"):
        gm.input_gradients(model, {"a": np.ones((2, 2))})
    by_name = gm.input_gradients(model, {"b": np.ones((2, 3)), "a": np.ones((2, 2))}).array
    by_order = gm.input_gradients(model, [np.ones((2, 2)), np.ones((2, 3))]).array
    # A dict and a list may reach two compiled graphs: equal to float32 rounding.
    np.testing.assert_allclose(by_name[0], by_order[0], rtol=1e-6)


def test_integer_inputs_explain_the_embedding_case():
    ids = keras.Input((4,), dtype="int32", name="token_ids")
    embedded = keras.layers.Embedding(10, 3, name="embedding")(ids)
    model = keras.Model(ids, keras.layers.Dense(1)(keras.layers.Flatten()(embedded)))
    with pytest.raises(InputError, match=r"'token_ids' of dtype int32.*Embedding.*layer='embedding'"):
        gm.input_gradients(model, np.array([[1, 2, 3, 4]]))
    # What the message suggests works: the gradient at the embedding's output.
    o = gm.output_gradients(model, np.array([[1, 2, 3, 4]]), np.zeros((1, 1)), layer="embedding", loss="mse")
    assert o.array.shape == (1, 4, 3)


def test_model_that_cannot_be_built_from_x():
    class NeedsPairs(keras.Model):
        def call(self, x):
            return tf.reshape(x, (-1, 2))[:, :1] * 2.0

    with pytest.raises(ModelBuildError, match=r"Received: x of shape \(1, 3\) .* not built, and building it .* failed"):
        gm.input_gradients(NeedsPairs(), np.ones((1, 3), "float32"))


def test_output_index_out_of_range():
    with pytest.raises(InputError, match=r"output=5.*2 output unit\(s\).*\[0, 1\]"):
        gm.input_gradients(mlp(), np.ones((1, 3)), output=5)


def test_not_a_keras_model():
    with pytest.raises(gm.GradmagicError, match="Expected a Keras 3 model"):
        gm.input_gradients(object(), np.ones((1, 3)))


@pytest.mark.parametrize("x", [[[1.0, 2.0], [3.0]], [[1.0, 2.0], 3.0], [[[1.0], [2.0]], [[1.0], [2.0, 3.0]]]])
def test_ragged_nested_lists_are_named_as_ragged(x):
    with pytest.raises(InputError, match="nested lists of different lengths"):
        gm.input_gradients(mlp((2, 3, 1)), x)


# --- several inputs and outputs: targets, weights and losses follow the model's names and structure ---


def test_dict_targets_and_weights_follow_output_names_not_sorted_keys():
    model = two_outputs()
    rng = np.random.default_rng(8)
    y_second, y_first = rng.normal(size=(6, 2)).astype("f4"), rng.normal(size=(6, 1)).astype("f4")
    w_second, w_first = np.linspace(0, 1, 6).astype("f4"), np.full(6, 3.0, "f4")
    pred_second, pred_first = (t.numpy() for t in model(X6))
    expected = numpy_mse(y_second, pred_second, w_second) + numpy_mse(y_first, pred_first, w_first)
    r = gm.weight_gradients(
        model,
        X6,
        {"first": y_first, "second": y_second},
        loss="mse",
        sample_weight={"first": w_first, "second": w_second},
    )
    assert r.loss == pytest.approx(expected, rel=1e-5)
    model.compile(loss=["mse", "mse"])
    compiled = gm.weight_gradients(model, X6, [y_second, y_first], sample_weight={"first": w_first, "second": w_second})
    assert compiled.loss == pytest.approx(expected, rel=1e-5)


def test_dict_output_models_are_addressed_by_their_keys():
    model = two_outputs(dict_outputs=True)
    out = model(X6)
    y = {"z": np.zeros((6, 2), "f4"), "a": np.ones((6, 1), "f4")}
    r = gm.weight_gradients(model, X6, y, loss={"z": "mse", "a": "mae"})
    expected = numpy_mse(y["z"], out["z"].numpy()) + float(np.mean(np.abs(out["a"].numpy() - 1.0)))
    assert r.loss == pytest.approx(expected, rel=1e-5)
    with pytest.raises(
        gm.GradmagicError, match=r"y\['a'\] of shape \(6, 2\), but the model's output 'a' .*\(batch, 1\)"
    ):
        gm.weight_gradients(model, X6, {"z": np.zeros((6, 1)), "a": np.zeros((6, 2))}, loss="mse")


def test_list_and_tuple_inputs_and_flat_and_column_labels_agree():
    class Two(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, inputs):
            return self.dense(keras.ops.concatenate(list(inputs), axis=-1))

    model = Two()
    u, v = X6[:, :1], X6[:, 1:]
    as_list = gm.input_gradients(model, [u, v]).array
    as_tuple = gm.input_gradients(model, (u, v)).array
    np.testing.assert_allclose(as_list[0], as_tuple[0], rtol=1e-6)  # maybe two compiled graphs: a tolerance
    sparse = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    sparse.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    labels = np.array([0, 1, 2, 3, 0, 1])
    flat = gm.weight_gradients(sparse, X6, labels).loss
    column = gm.weight_gradients(sparse, X6, labels[:, None]).loss
    assert flat == pytest.approx(column, rel=1e-5)  # two label shapes, two compiled graphs: float32 rounding
