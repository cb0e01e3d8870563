"""Canaries: every function of the TensorFlow door run against the installed TensorFlow and Keras.

An upgrade that moves or renames an internal gradmagic relies on fails here
first, with the function's name, rather than deep inside a gradient call.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradmagic.core.backends import tensorflow as door

# --- The gradient questions (core/questions) ---------------------------------


# --- The training monitor (core/monitor) -------------------------------------


# --- The diagnosis (core/diagnose) -------------------------------------------


def _traced_ops(fn, *args) -> list:
    """The ops of one trace of ``fn`` (a plain TensorFlow function of tensors)."""
    graph = tf.function(fn).get_concrete_function(*args).graph
    return graph.get_operations()


def _op_of_type(ops: list, op_type: str):
    (op,) = [op for op in ops if op.type == op_type]
    return op


def test_registered_gradient_finds_matmuls_and_knows_stop_gradient_and_unique():
    ops = _traced_ops(lambda a: tf.unique(tf.reshape(tf.stop_gradient(a) @ a, [-1])).y, tf.ones((2, 2)))
    assert callable(door.registered_gradient(_op_of_type(ops, "MatMul")))
    assert door.registered_gradient(_op_of_type(ops, "StopGradient")) is None  # tf.no_gradient
    with pytest.raises(LookupError):  # no gradient registered at all
        door.registered_gradient(_op_of_type(ops, "Unique"))


def test_is_custom_gradient_recognises_tf_custom_gradient_only():
    @tf.custom_gradient
    def square(t):
        return t * t, lambda upstream: upstream * 2.0 * t

    ops = _traced_ops(lambda a: tf.identity(square(a)), tf.ones((2,)))
    assert door.is_custom_gradient(_op_of_type(ops, "IdentityN"))  # the op tf.custom_gradient creates
    others = [op for op in ops if op.type != "IdentityN"]
    assert {"Mul", "Identity"} <= {op.type for op in others}
    assert not any(door.is_custom_gradient(op) for op in others)


def test_differentiated_scope_leads_from_a_gradient_op_back_to_its_forward_op():
    def f(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            with tf.name_scope("a"):
                root = tf.sqrt(x, name="b")
            loss = tf.reduce_sum(root)
        return tape.gradient(loss, x)

    ops = _traced_ops(f, tf.constant([0.0, 4.0]))
    forward, backward = _op_of_type(ops, "Sqrt"), _op_of_type(ops, "SqrtGrad")
    assert forward.name == "a/b"
    scope = door.differentiated_scope(backward.name)
    assert scope is not None and (forward.name == scope or forward.name.startswith(scope + "/"))
    assert forward.outputs[0].name in {t.name for t in backward.inputs}  # and it reads that op's output
    assert door.differentiated_scope(forward.name) is None  # a forward op differentiates nothing
    # At 0 the square root's derivative is infinite: the NaN/Inf of the gradient is made in that op.
    assert np.isinf(tf.function(f)(tf.constant([0.0, 4.0])).numpy()[0])


def test_lambda_output_shape_is_the_argument_as_given():
    def shape_of(input_shape):
        return input_shape

    by_function = keras.layers.Lambda(tf.sin, output_shape=shape_of)
    assert door.lambda_output_shape(by_function) is shape_of
    assert isinstance(by_function.get_config()["output_shape"], dict)  # why the door is needed
    assert door.lambda_output_shape(keras.layers.Lambda(tf.sin, output_shape=(3,))) == (3,)
    assert door.lambda_output_shape(keras.layers.Lambda(tf.sin)) is None


def test_variable_placeholders_are_what_the_variables_reads_consume():
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    found = {}

    @tf.function
    def f(x):
        graph = tf.compat.v1.get_default_graph()
        out = dense(x)
        found.update(door.variable_placeholders(graph, dense.weights))
        return out

    f(tf.ones((1, 3)))
    assert set(found) == {id(dense.kernel), id(dense.bias)}
    for variable in (dense.kernel, dense.bias):
        (placeholder,) = found[id(variable)]
        # The captured handle is read once, by the op that gives the variable's value to the layer.
        assert placeholder.dtype == tf.resource
        assert [op.type for op in placeholder.consumers()] == ["ReadVariableOp"]
