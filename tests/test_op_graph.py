"""Classifying graph ops and finding where a gradient path is cut, against what tf.GradientTape computes."""

from __future__ import annotations

import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmagic as gm
from gradmagic.core.diagnose.op_graph import FLOWS, NONE, UNCHECKED, ZERO, diagnose, op_gradient, path_ops

X = tf.constant([[0.3, -1.2, 2.6], [1.7, 0.4, -0.8]])


def _graph(fn, *args):
    """The ops of one trace of ``fn``, its first input placeholder and its output tensor."""
    graph = tf.function(fn).get_concrete_function(*args).graph
    return graph.get_operations(), graph.inputs, graph.outputs


def _tape_level(fn, x=X) -> int:
    """The truth: what tf.GradientTape gives for d sum(fn(x)) / dx (None, all zero, or something)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        target = tf.reduce_sum(tf.cast(fn(x), tf.float32))
    grad = tape.gradient(target, x)
    if grad is None:
        return NONE
    return FLOWS if np.any(grad.numpy() != 0) else ZERO


@tf.custom_gradient
def _custom_square(t):
    return t * t, lambda upstream: upstream * 2.0 * t


CASES = [
    pytest.param(tf.round, "Round", NONE, "piecewise constant", id="round"),
    pytest.param(tf.sign, "Sign", ZERO, "zeros", id="sign"),
    pytest.param(tf.stop_gradient, "StopGradient", NONE, "tf.stop_gradient", id="stop_gradient"),
    pytest.param(lambda t: tf.argmax(t, axis=-1), "ArgMax", NONE, "piecewise constant", id="argmax"),
    pytest.param(lambda t: tf.cast(t * 3.0, tf.int32), "Cast", NONE, "cast to int32", id="cast-to-int"),
    pytest.param(lambda t: tf.numpy_function(np.sin, [t], tf.float32), "PyFunc", NONE, "numpy_function", id="numpy"),
    pytest.param(tf.sin, "Sin", FLOWS, "", id="sin"),
    pytest.param(_custom_square, "IdentityN", FLOWS, "custom gradient", id="custom_gradient"),
]


@pytest.mark.parametrize(("fn", "op_type", "level", "reason"), CASES)
def test_each_op_is_classified_as_the_tape_differentiates_it(fn, op_type, level, reason):
    ops, _, _ = _graph(fn, X)
    (op,) = [op for op in ops if op.type == op_type]
    got_level, got_reason = op_gradient(op)
    assert got_level == level == _tape_level(fn)
    assert reason in got_reason and (reason or got_reason == "")


def test_an_op_without_a_registered_gradient_is_named():
    ops, _, _ = _graph(lambda t: tf.unique(tf.reshape(t, [-1])).y, X)
    (unique,) = [op for op in ops if op.type == "Unique"]
    with pytest.raises(LookupError):  # TensorFlow's own answer when asked for its gradient
        with tf.GradientTape() as tape:
            tape.watch(X)
            out = tf.unique(tf.reshape(X, [-1])).y
        tape.gradient(out, X)
    assert op_gradient(unique) == (NONE, "no gradient is registered for op type Unique")


def test_a_round_cuts_the_path_and_is_blamed():
    def fn(t):
        return tf.sin(tf.round(t * 3.0)) * 2.0

    ops, (source,), (sink,) = _graph(fn, X)
    level, op, reason = diagnose(ops, [source], [sink])
    assert level == NONE == _tape_level(fn)
    assert op.type == "Round" and "piecewise constant" in reason


def test_a_where_with_one_differentiable_branch_keeps_the_path():
    def fn(t):
        return tf.where(t > 0, tf.round(t), t)

    ops, (source,), (sink,) = _graph(fn, X)
    assert diagnose(ops, [source], [sink]) == (FLOWS, None, "") and _tape_level(fn) == FLOWS
    # The Round lies on a path from x to the output all the same; the shape-only ops do not.
    on_path = {op.type for op in path_ops(ops, [source], [sink])}
    assert {"Round", "SelectV2", "Greater"} <= on_path


def test_sign_makes_the_gradient_zero_and_a_round_beside_it_none():
    ops, (source,), (sink,) = _graph(lambda t: tf.sign(t) * 2.0, X)
    level, op, _ = diagnose(ops, [source], [sink])
    assert (level, op.type) == (ZERO, "Sign")
    ops, (source,), (sink,) = _graph(lambda t: tf.round(tf.sign(t)), X)
    level, op, _ = diagnose(ops, [source], [sink])
    assert (level, op.type) == (NONE, "Round")  # the op of the kind that decided "none"


def test_integer_sources_beside_float_ones_block_nothing():
    ids = tf.constant([2, 0])

    def fn(t, i):
        return tf.gather(t, i, axis=1) * 2.0

    ops, (source, index), (sink,) = _graph(fn, X, ids)
    assert diagnose(ops, [source, index], [sink]) == (FLOWS, None, "")
    level, op, reason = diagnose(ops, [index], [sink])  # only the ids: nothing to pass a gradient to
    assert (level, op) == (NONE, None) and "no float inputs" in reason


def test_a_tensorflow_without_the_gradient_registry_weakens_explain_with_a_note(monkeypatch):
    # As a release that moved the internal would: the door then cannot import it.
    monkeypatch.delattr(importlib.import_module("tensorflow.python.framework.ops"), "get_gradient_function")
    ops, _, _ = _graph(lambda t: tf.round(tf.unique(tf.reshape(t, [-1])).y), X)
    (unique,) = [op for op in ops if op.type == "Unique"]
    level, reason = op_gradient(unique)
    assert level == FLOWS and reason.startswith(UNCHECKED) and "get_gradient_function" in reason
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3), keras.layers.Lambda(tf.round, name="lam")])
    explanation = gm.explain(model, X.numpy())
    # Round is known without the registry; the note says what could not be checked.
    assert (explanation["lam"].verdict, explanation["lam"].op) == ("no gradient", "Round")
    assert any("get_gradient_function" in note for note in explanation.notes)
