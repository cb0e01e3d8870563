"""PyTorch: a repeated question runs as a graph traced once per input signature, with the same numbers as eager.

The first call of a signature runs eagerly, the second traces the function into
a graph of PyTorch operations (``make_fx`` on fake tensors) and runs it, later
calls run the graph. A function that reads a tensor's value in Python cannot be
traced and stays eager. ``question.traces`` counts runs of the Python body: an
eager call, or a trace. The truth is the analytic gradient of a linear model.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import gradmagic as gm
from gradmagic.core.questions import stateless_functions

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's traced questions")

RNG = np.random.default_rng(11)
W = np.array([[0.5], [-1.0], [2.0]], dtype="float32")


def _linear(before: keras.Layer | None = None) -> keras.Model:
    """y = x @ W (with ``before`` applied to x first), mean squared error: dLoss/dW = 2/n x^T (y_pred - y)."""
    dense = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")
    model = keras.Sequential([keras.Input((3,)), *([before] if before is not None else []), dense])
    dense.kernel.assign(W)
    model.compile(optimizer="sgd", loss="mse")
    return model


def _analytic(x: np.ndarray, y: np.ndarray, factor: float = 1.0) -> np.ndarray:
    """The gradient for the model on ``factor * x``."""
    x64, y64 = factor * x.astype("float64"), y.astype("float64")
    return 2.0 / len(x) * x64.T @ (x64 @ W - y64)


def _data(batch: int, sign: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    x = sign * np.abs(RNG.normal(size=(batch, 3))).astype("float32")
    return x, RNG.normal(size=(batch, 1)).astype("float32")


def _body_runs(model: keras.Model) -> int:
    (question, _key), *_ = stateless_functions._cache[model].values()
    return question.traces[0]


@pytest.fixture
def trace_from_call(monkeypatch: pytest.MonkeyPatch):
    """Set when questions are traced (read as each question is compiled), restored after the test."""
    from gradmagic.core.backends import torch as torch_backend

    def set_to(call: int) -> None:
        monkeypatch.setattr(torch_backend, "TRACE_FROM_CALL", call)

    return set_to


def test_the_second_call_traces_and_later_calls_run_the_graph(trace_from_call):
    trace_from_call(2)
    model = _linear()
    for call in range(1, 5):
        x, y = _data(6)  # new values of the same shapes: one signature
        got = gm.weight_gradients(model, x, y).arrays()[0]
        # float32 against the float64 analytic gradient.
        np.testing.assert_allclose(got, _analytic(x, y), rtol=1e-5, atol=1e-6)
        # The body runs eagerly at call 1 and once more to trace at call 2; calls 3 and 4 run only the graph.
        assert _body_runs(model) == min(call, 2)


def test_a_python_branch_on_a_tensor_value_keeps_the_question_eager(trace_from_call):
    trace_from_call(2)

    class SignScale(keras.layers.Layer):
        """Twice its input where any entry is positive, else three times: Python reads a value."""

        def compute_output_shape(self, input_shape):
            return input_shape

        def call(self, inputs):
            return inputs * (2.0 if float(keras.ops.max(keras.ops.stop_gradient(inputs))) > 0 else 3.0)

    model = _linear(SignScale())
    # A graph traced on the positive batches would keep the factor 2 for the negative ones; eager sees each.
    for sign in [1.0, 1.0, -1.0, -1.0]:
        x, y = _data(6, sign)
        factor = 2.0 if sign > 0 else 3.0
        got = gm.weight_gradients(model, x, y).arrays()[0]
        np.testing.assert_allclose(got, _analytic(x, y, factor), rtol=1e-5, atol=1e-6)
    # Four eager runs and one trace that failed on the value read.
    assert _body_runs(model) == 5


def test_each_batch_size_is_traced_on_its_own_and_eight_are_kept(trace_from_call):
    from gradmagic.core.backends.torch import MAX_TRACED_SIGNATURES

    trace_from_call(1)
    model = _linear()
    for batch in range(1, MAX_TRACED_SIGNATURES + 3):
        for _ in range(2):
            x, y = _data(batch)
            np.testing.assert_allclose(
                gm.weight_gradients(model, x, y).arrays()[0], _analytic(x, y), rtol=1e-5, atol=1e-6
            )
    assert _body_runs(model) == MAX_TRACED_SIGNATURES + 2  # one trace per batch size, none per repeat
    x, y = _data(1)  # the oldest signature was dropped: traced again, still right
    np.testing.assert_allclose(gm.weight_gradients(model, x, y).arrays()[0], _analytic(x, y), rtol=1e-5, atol=1e-6)
    assert _body_runs(model) == MAX_TRACED_SIGNATURES + 3


def test_trace_from_call_zero_never_traces(trace_from_call):
    trace_from_call(0)
    model = _linear()
    for call in range(1, 4):
        x, y = _data(5)
        np.testing.assert_allclose(gm.weight_gradients(model, x, y).arrays()[0], _analytic(x, y), rtol=1e-5, atol=1e-6)
        assert _body_runs(model) == call


def test_an_input_that_requires_grad_is_answered_by_the_graph_and_left_alone(trace_from_call):
    import torch

    trace_from_call(1)
    model = _linear()
    x, y = _data(4)
    tensor = torch.tensor(x, requires_grad=True)
    for _ in range(3):
        np.testing.assert_allclose(
            gm.weight_gradients(model, tensor, y).arrays()[0], _analytic(x, y), rtol=1e-5, atol=1e-6
        )
        jac = gm.input_gradients(model, tensor).array  # d(x @ W)/dx = W^T for every sample
        np.testing.assert_allclose(jac.reshape(4, 3), np.tile(W.T, (4, 1)), rtol=1e-6)
    assert tensor.grad is None and model.layers[-1].kernel.value.grad is None


def test_a_value_read_from_a_tensor_that_is_not_an_argument_keeps_the_question_eager(trace_from_call):
    import torch

    trace_from_call(2)

    class OwnScale(keras.layers.Layer):
        """Multiplies by a number read from its own tensor (not a Keras variable): the read is a value read."""

        def __init__(self):
            super().__init__()
            self.factor = torch.tensor(2.0)

        def call(self, inputs):
            return inputs * self.factor.item()

        def compute_output_shape(self, input_shape):
            return input_shape

    scale = OwnScale()
    model = _linear(scale)
    # A graph traced at the second call would keep the factor read then for the later calls.
    for factor in (2.0, 3.0, 5.0, 7.0):
        scale.factor.fill_(factor)
        x, y = _data(6)
        got = gm.weight_gradients(model, x, y).arrays()[0]
        np.testing.assert_allclose(got, _analytic(x, y, factor), rtol=1e-5, atol=1e-6)


def test_a_graph_traced_on_c_ordered_data_is_not_used_for_other_strides(trace_from_call):
    trace_from_call(1)
    dense = keras.layers.Dense(1, use_bias=False)
    model = keras.Sequential([keras.Input((2, 3)), keras.layers.Flatten(), dense])
    dense.kernel.assign(np.arange(6, dtype="float32").reshape(6, 1) / 6.0)
    model.compile(optimizer="sgd", loss="mse")
    w = dense.kernel.numpy().astype("float64")
    y = RNG.normal(size=(4, 1)).astype("float32")
    c_ordered = RNG.normal(size=(4, 2, 3)).astype("float32")
    others = [np.asfortranarray(c_ordered), RNG.normal(size=(4, 3, 2)).astype("float32").transpose(0, 2, 1)]
    for x in [c_ordered, c_ordered, *others, *others]:
        flat = x.reshape(4, 6).astype("float64")
        want = 2.0 / 4 * flat.T @ (flat @ w - y)  # dMSE/dW of y = flatten(x) @ W
        np.testing.assert_allclose(gm.weight_gradients(model, x, y).arrays()[0], want, rtol=1e-5, atol=1e-6)
    assert _body_runs(model) == 3  # one graph per layout, each run again (not an eager rescue per call)


def test_an_error_inside_a_traced_graph_names_the_layer(trace_from_call):
    from gradmagic.errors import GradmagicError

    trace_from_call(1)
    model = keras.Sequential(
        [keras.Input((3,), dtype="int32"), keras.layers.Embedding(5, 2, name="ids"), keras.layers.Flatten()]
    )
    model.compile(optimizer="sgd", loss="mse")
    ids, y = np.array([[0, 1, 2], [3, 4, 0]]), np.zeros((2, 6), "float32")
    for _ in range(2):
        gm.weight_gradients(model, ids, y)  # traced, and run
    with pytest.raises(GradmagicError, match="Layer 0 'ids' \\(Embedding\\)"):
        gm.weight_gradients(model, np.array([[0, 1, 2], [3, 4, 9]]), y)  # id 9 of 5: the graph fails
