"""Tracing a model once with its ops attributed to layers: which layer made which op, and which feeds which."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmagic as gm
from gradmagic.core.diagnose.tracing import (
    OWNER_GLUE,
    OWNER_LOSS,
    OpRecorder,
    TracingFailed,
    concrete_function,
    layer_ancestors,
    tracing_error,
)

X = np.random.default_rng(0).normal(size=(2, 3)).astype("float32")


def _traced(model: keras.Model, x=X, loss: bool = False) -> OpRecorder:
    """Trace ``model`` (and a sum of squares as its loss) once with every layer's call recorded."""
    recorder = OpRecorder(model.layers)

    @tf.function
    def run(x):
        with recorder.recording():
            out = model(x)
        recorder.flush(OWNER_GLUE)
        total = tf.reduce_sum(tf.square(out)) if loss else out
        recorder.flush(OWNER_LOSS)
        return total

    concrete_function(run, recorder, tf.constant(x))
    return recorder


def _op_types(recorder: OpRecorder, owner: int) -> set[str]:
    ops = recorder.graph.get_operations()
    return {op.type for op, who in zip(ops, recorder.owner) if who == owner}


def test_each_op_goes_to_the_layer_whose_call_made_it():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="dense"),
            keras.layers.Lambda(tf.sin, name="sine"),
            keras.layers.Dense(1, name="head"),
        ]
    )
    recorder = _traced(model, loss=True)
    assert [call.layer_index for call in recorder.calls] == [0, 1, 2]  # Sequential's layers: no InputLayer
    assert {"MatMul", "BiasAdd"} <= _op_types(recorder, 0) and "Sin" not in _op_types(recorder, 0)
    assert "Sin" in _op_types(recorder, 1) and "MatMul" not in _op_types(recorder, 1)
    assert "MatMul" in _op_types(recorder, 2)
    assert {"Square", "Sum"} <= _op_types(recorder, OWNER_LOSS)  # the loss belongs to no layer
    # Each call's tensors are the layer's real input and output: its slice holds the op that made the output.
    ops = recorder.graph.get_operations()
    for call in recorder.calls:
        (output,) = call.outputs
        assert output.op in ops[call.start : call.end]
        assert call.inputs[0].op not in ops[call.start : call.end]
    assert recorder.calls[1].inputs[0] is recorder.calls[0].outputs[0]


def test_a_shared_layer_has_one_call_per_use_and_a_failed_trace_names_its_layer():
    shared = keras.layers.Dense(3, name="shared")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, shared(shared(inputs)))
    recorder = _traced(model)
    index = model.layers.index(shared)
    assert [call.layer_index for call in recorder.calls] == [index, index]

    def branchy(t):
        if t > 0:  # Python control flow on a symbolic tensor
            return t
        return -t

    broken = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3), keras.layers.Lambda(branchy, name="lam")])
    with pytest.raises(TracingFailed) as info:
        _traced(broken)
    assert info.value.layer_index == 1
    error = tracing_error(info.value, broken, "for a test")
    assert isinstance(error, gm.GradmagicError)
    assert str(error).startswith(f"Layer 1 'lam' (Lambda, function 'branchy') of model '{broken.name}'")


def test_an_unrecognised_failure_is_one_line_naming_the_model_and_the_purpose():
    def boom(t):
        raise RuntimeError("custom failure\nwith a second line")

    model = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(boom, output_shape=(3,), name="boom")])
    with pytest.raises(TracingFailed) as info:
        _traced(model)
    message = str(tracing_error(info.value, model, "for a test"))
    assert message.startswith(f"Tracing model '{model.name}' for a test failed in layer 0 'boom' (Lambda, ")
    assert "custom failure with a second line" in message
    assert "\n" not in message and message.endswith("The model was left unchanged.")


@tf.function
def _reshaped(t):
    return tf.reshape(t, (5, 7))  # 6 values (x is 2 by 3) cannot fill 35: fails while tracing


@pytest.mark.parametrize("diagnosis", [gm.explain, gm.check_gradients])
def test_an_error_inside_a_function_the_layer_calls_is_said_in_full_not_its_traceback(diagnosis):
    # Keras wraps the error in its own text, and TensorFlow's "in user code:" frames of the
    # helper come before the error itself: the one-line message must say the error.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(_reshaped, output_shape=(35,), name="shape")])
    model.compile(loss="mse")
    with pytest.raises(gm.GradmagicError) as info:
        diagnosis(model, X, np.zeros((2, 35), "float32"))
    message = str(info.value)
    assert message.startswith(f"Tracing model '{model.name}' ")
    assert "in layer 0 'shape' (Lambda, function '_reshaped')" in message
    assert "ValueError: Cannot reshape a tensor with 6 elements to shape [5,7]" in message
    assert "in user code" not in message and "File " not in message and "\x1b" not in message
    assert "\n" not in message


def test_layer_ancestors_follow_raw_ops_between_layers():
    inputs = keras.Input((3,), name="inp")
    a = keras.layers.Dense(3, name="a")(inputs)
    b = keras.layers.Dense(3, name="b")(a)
    c = keras.layers.Dense(2, name="c")(a + b)  # a raw op between layers: a residual
    side = keras.layers.Dense(2, name="side")(inputs)
    model = keras.Model(inputs, keras.layers.Concatenate(name="cat")([c, side]))
    names = [layer.name for layer in model.layers]

    ancestors = {names[i]: {names[j] for j in up} for i, up in layer_ancestors(_traced(model)).items()}

    # The graph as written above, by hand; the InputLayer is never called, so it is nobody's ancestor.
    assert ancestors == {"a": set(), "b": {"a"}, "c": {"a", "b"}, "side": set(), "cat": {"a", "b", "c", "side"}}
