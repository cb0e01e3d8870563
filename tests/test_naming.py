"""How inputs and outputs are named: after the model's own InputLayers and outputs, else by position."""

from __future__ import annotations

import keras
import numpy as np

import gradmagic as gm
from gradmagic.core import model_spec
from gradmagic.core.questions.naming import (
    declared_input_names,
    input_labels,
    output_labels,
    output_names,
    positional_names,
)


def _two_in_two_out() -> keras.Model:
    pixels, extra = keras.Input((3,), name="pixels"), keras.Input((2,), name="extra")
    joined = keras.layers.Concatenate()([pixels, extra])
    outputs = [keras.layers.Dense(1, name="score")(joined), keras.layers.Dense(2, name="aux")(joined)]
    return keras.Model([pixels, extra], outputs)


def test_positional_names_drop_the_index_for_a_single_leaf():
    assert positional_names(1) == ["x"]
    assert positional_names(3) == ["x[0]", "x[1]", "x[2]"]
    assert positional_names(2, "y") == ["y[0]", "y[1]"]


def test_declared_inputs_are_named_after_their_input_layers():
    model = _two_in_two_out()
    assert declared_input_names(model, model.inputs) == ["pixels", "extra"]
    assert model_spec(model).inputs[1].name == "extra"


def test_input_labels_prefer_declared_names_then_dict_keys_then_positions():
    x = [np.zeros((1, 3)), np.zeros((1, 2))]
    assert input_labels(["pixels", "extra"], x) == ["pixels", "extra"]
    assert input_labels(["only_one"], x) == ["x[0]", "x[1]"]  # does not match the leaves: by position
    assert input_labels(None, {"b": np.zeros(1), "a": np.zeros(1)}) == ["a", "b"]  # flatten order
    assert input_labels(None, np.zeros((1, 3))) == ["x"]


def test_outputs_are_named_by_dict_keys_in_flatten_order_else_by_output_layer():
    model = _two_in_two_out()
    assert output_names(model) == ["score", "aux"]
    inp = keras.Input((2,))
    as_dict = keras.Model(inp, {"zeta": keras.layers.Dense(1)(inp), "alpha": keras.layers.Dense(1)(inp)})
    assert output_names(as_dict, as_dict.output) == ["alpha", "zeta"]
    assert keras.tree.flatten({"zeta": "z", "alpha": "a"}) == ["a", "z"]  # the order a dict output flattens in


def test_output_labels_fall_back_to_positions_when_names_do_not_fit():
    assert output_labels(["score", "aux"], 2) == ["score", "aux"]
    assert output_labels(["score"], 2) == ["output 0", "output 1"]


def test_input_gradient_rows_carry_the_same_names():
    model = _two_in_two_out()
    x = [np.ones((2, 3), "float32"), np.ones((2, 2), "float32")]
    rows = gm.input_gradients(model, x).rows
    assert [(r.labels["output"], r.labels["input"]) for r in rows] == [
        ("score", "pixels"),
        ("score", "extra"),
        ("aux", "pixels"),
        ("aux", "extra"),
    ]
