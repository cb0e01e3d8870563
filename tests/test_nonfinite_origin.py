"""Where NaN/Inf is made: probing a traced pass op by op, and explain() naming that op (against check_numerics)."""

from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_unchanged, fingerprint

import gradmagic as gm
from gradmagic.core.diagnose.nonfinite_origin import nonfinite_origins, probed_ops

X = np.array([[1.0, 2.0], [0.0, 1.0], [3.0, 0.5]], "float32")  # the first column is 0 in sample 2
Y = np.zeros((3, 1), "float32")


def _guarded_divide(t):
    hidden, inputs = t
    return tf.where(inputs[:, :1] == 0.0, 0.0, hidden / inputs[:, :1])


def _guarded_log(t):
    return tf.where(t > 0.0, tf.math.log(t), 0.0)


def _model(fn, activation=None):
    """Dense 'hidden' -> Lambda 'suspect' (fed the raw inputs too) -> Dense 'head'."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2,), name="x")
    hidden = keras.layers.Dense(3, activation=activation, name="hidden")(inputs)
    args = [hidden, inputs] if fn is _guarded_divide else hidden
    suspect = keras.layers.Lambda(fn, name="suspect")(args)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(suspect), name="net")
    model.compile(loss="mse")
    return model


def _line_of(fn, text: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def _check_numerics_op(model, x, y) -> str:
    """The op type TensorFlow's check_numerics stops at in one forward and backward pass."""
    tf.debugging.enable_check_numerics()
    try:

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(x) - y) ** 2)
            return tape.gradient(loss, model.trainable_weights)

        step(x, y)
    except tf.errors.InvalidArgumentError as error:
        return str(error).split('graph op "')[1].split('"')[0]
    finally:
        tf.debugging.disable_check_numerics()
    return "none"


@pytest.mark.parametrize(
    ("fn", "activation", "op", "code"),
    [(_guarded_divide, None, "RealDiv", "hidden / inputs"), (_guarded_log, "relu", "Log", "tf.math.log(t)")],
)
def test_the_op_a_where_hides_from_the_loss_is_named_with_its_line(fn, activation, op, code):
    model = _model(fn, activation)
    x = X if fn is _guarded_divide else np.array([[1.0, -2.0], [-1.0, -1.0], [2.0, 1.0]], "float32")
    before = fingerprint(model)
    explanation = gm.explain(model, x, Y)
    assert np.isfinite(explanation.value)  # the loss is finite: only the gradient goes wrong
    forward = [o for o in explanation.nonfinite if not o.backward]
    backward = [o for o in explanation.nonfinite if o.backward]
    # TensorFlow's check_numerics stops at the same op, in the forward pass.
    assert forward[0].op_type == op == _check_numerics_op(model, x, Y)
    assert (forward[0].layer, forward[0].layer_index) == ("suspect", 2)
    assert forward[0].source.startswith(f"test_nonfinite_origin.py:{_line_of(fn, code)} ({fn.__name__}): ")
    # The NaN of the gradient is made in the backward pass of the same layer, from that line too.
    assert backward and all(o.layer == "suspect" and o.source == forward[0].source for o in backward)
    assert f"NaN/Inf first appears in {forward[0].describe()}." in explanation.notes
    assert f"NaN/Inf first appears in {backward[0].describe()}." in explanation.notes
    assert_unchanged(model, before)


def test_a_weight_that_is_already_nan_is_named_at_its_read():
    model = _model(_guarded_divide)
    kernel = model.get_layer("head").kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))  # as after a step with a NaN gradient
    x = np.abs(X) + 1.0  # no zero divisor this time
    origins = gm.explain(model, x, Y).nonfinite
    assert [(o.op_type, o.layer, o.backward) for o in origins if not o.backward] == [("ReadVariableOp", "head", False)]


def test_finite_values_report_no_origin():
    model = _model(_guarded_divide)
    explanation = gm.explain(model, np.abs(X) + 1.0, Y)
    assert explanation.nonfinite == [] and not any("NaN/Inf" in note for note in explanation.notes)
    assert _check_numerics_op(model, np.abs(X) + 1.0, Y) == "none"


class _RootNorm(keras.layers.Layer):
    """A custom layer computing sqrt(2 h) in two lines: the gradient's NaN comes from the second."""

    def call(self, h):
        scaled = h * 2.0
        return tf.sqrt(scaled)


def _sqrt_net(custom: bool) -> keras.Model:
    """x -> Dense 'hidden' (zero kernel: its output is 0) -> sqrt -> Dense 'head'; sqrt'(0) is infinite."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2,), name="x")
    hidden = keras.layers.Dense(3, kernel_initializer="zeros", name="hidden")(inputs)
    rooted = _RootNorm(name="root")(hidden) if custom else keras.ops.sqrt(hidden)  # a layer, or an op between layers
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(rooted), name="net")
    model.compile(loss="mse")
    return model


def test_a_gradient_op_is_traced_to_the_op_it_differentiates_and_its_line():
    ones = np.ones((3, 1), "float32")
    (origin,) = gm.explain(_sqrt_net(custom=True), X, ones).nonfinite  # sqrt(0) = 0: the forward pass is finite
    assert (origin.op_type, origin.backward, origin.layer, origin.layer_index) == ("SqrtGrad", True, "root", 2)
    # The line of the sqrt, not the layer's first line (h * 2.0).
    assert origin.source.startswith(f"test_nonfinite_origin.py:{_line_of(_RootNorm.call, 'tf.sqrt(scaled)')} (call)")
    # Between layers, Keras replays the op itself: the model is named, and no line of user code.
    (origin,) = gm.explain(_sqrt_net(custom=False), X, ones).nonfinite
    assert (origin.op_type, origin.layer, origin.layer_index, origin.source) == ("SqrtGrad", "net", None, None)


def test_inputs_and_built_in_layers_are_described_without_a_line_of_user_code():
    model = _model(_guarded_divide)
    x = X.copy()
    x[0, 1] = np.nan  # the second column only feeds 'hidden'
    origins = gm.explain(model, x, Y).nonfinite
    assert origins[0].op_type == "Placeholder" and origins[0].describe().startswith("the input ")
    kernel = model.get_layer("hidden").kernel
    kernel.assign(np.full(kernel.shape, np.inf, "float32"))
    origins = gm.explain(model, np.abs(X) + 1.0, Y).nonfinite
    first = origins[0]
    assert (first.op_type, first.layer, first.source) == ("ReadVariableOp", "hidden", None)
    assert first.describe().startswith("a weight of layer 'hidden' (it holds NaN/Inf already")


def _masked_then_divided(t):
    masked = tf.where(t > 100.0, float("-inf"), t)  # a -inf mask, written on purpose
    weights = tf.nn.softmax(masked, axis=-1)
    return weights / (t[:, :1] - t[:, :1])  # a real division by zero


def test_a_deliberate_infinite_constant_is_not_an_origin():
    model = _model(_masked_then_divided)
    origins = gm.explain(model, X, Y).nonfinite
    assert origins and all(o.op_type != "Const" for o in origins)
    assert origins[0].op_type == "RealDiv" and origins[0].layer == "suspect"
    assert origins[0].source.startswith(f"test_nonfinite_origin.py:{_line_of(_masked_then_divided, 'weights / (')}")


def _probed_pass(x: tf.Tensor):
    """sqrt and log of x under name scope 'a', differentiated; every op probed. Returns origins and the gradient."""
    graph_info = {}

    @tf.function
    def run(x):
        graph = tf.compat.v1.get_default_graph()
        with tf.GradientTape() as tape:
            tape.watch(x)
            with tf.name_scope("a"):
                root = tf.sqrt(x, name="b")
                logged = tf.math.log(x + 1.0, name="c")
            loss = tf.reduce_sum(root) + tf.reduce_sum(logged)
        graph_info["forward"] = list(graph.get_operations())
        grad = tape.gradient(loss, x)
        graph_info["probed"], flags = probed_ops(graph.get_operations())
        return grad, flags

    grad, flags = run(x)
    forward = graph_info["forward"]
    # Each forward op "owns" itself, so an origin's layer names the forward op it was traced back to.
    owners = [(i, op.name) for i, op in enumerate(forward)]
    return nonfinite_origins(graph_info["probed"], flags.numpy(), forward, owners), grad.numpy()


def test_a_nan_made_in_the_gradient_of_op_a_b_is_traced_back_to_a_b_and_its_line():
    origins, grad = _probed_pass(tf.constant([0.0, 4.0]))
    assert np.isinf(grad[0]) and np.isfinite(grad[1])  # TensorFlow's own gradient: sqrt'(0) is infinite
    (origin,) = origins  # sqrt(0) = 0 and log(1) = 0: the forward pass is finite
    assert (origin.op_type, origin.backward, origin.layer) == ("SqrtGrad", True, "a/b")
    line = _line_of(_probed_pass, 'tf.sqrt(x, name="b")')
    assert origin.source.startswith(f"test_nonfinite_origin.py:{line} (run): root = tf.sqrt")


def test_an_infinity_made_in_the_forward_pass_is_its_first_origin():
    origins, _ = _probed_pass(tf.constant([4.0, -1.0]))  # log(0) = -inf, sqrt(-1) = NaN
    forward = [o for o in origins if not o.backward]
    assert {(o.op_type, o.layer) for o in forward} == {("Sqrt", "a/b"), ("Log", "a/c")}
    assert all(o.layer_index is not None for o in origins if o.backward)
