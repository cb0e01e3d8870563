"""Bad input gets the same one-paragraph GradmagicError on every backend, and leaves the model as it was."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import gradmagic as gm
from gradmagic.errors import GradmagicError, InputError, LayerError, LossError, NoWeightsError

from .backend_truths import fingerprint, no_grad_left

X = np.linspace(-1, 1, 12, dtype="float32").reshape(4, 3)
Y = np.ones((4, 2), "float32")


def _model(compiled: bool = True) -> keras.Model:
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="hidden"), keras.layers.Dropout(0.2), keras.layers.Dense(2)]
    )
    if compiled:
        model.compile(optimizer="sgd", loss="mse")
    return model


def _refused(error: type, match: str, call, model: keras.Model) -> GradmagicError:
    before = fingerprint(model)
    with pytest.raises(error, match=match) as info:
        call()
    assert fingerprint(model) == before and no_grad_left(model)
    message = str(info.value)
    # The house form: one paragraph saying what was wrong and what to do (a fix or what was expected).
    assert "\n" not in message and ("Fix" in message or "Expected" in message)
    return info.value


def test_a_layer_index_out_of_range_names_the_valid_range():
    model = _model()
    error = _refused(LayerError, r"layer=7", lambda: gm.weight_gradients(model, X, Y, layer=7), model)
    assert "[0, 2]" in str(error)
    _refused(LayerError, r"layer=-9", lambda: gm.output_gradients(model, X, Y, layer=-9), model)


def test_an_unknown_layer_name_suggests_the_close_one():
    model = _model()
    error = _refused(LayerError, "hiden", lambda: gm.weight_gradients(model, X, Y, layer="hiden"), model)
    assert "'hidden'" in str(error)


def test_weight_gradients_of_a_layer_without_weights_is_refused():
    model = _model()
    with pytest.raises(NoWeightsError, match="no weights") as info:
        gm.weight_gradients(model, X, Y, layer=1)
    assert "output_gradients(model, x, y, layer=1)" in str(info.value)


def test_x_of_the_wrong_shape_says_what_the_model_expects():
    model = _model()
    error = _refused(InputError, r"shape \(4, 5\)", lambda: gm.weight_gradients(model, np.ones((4, 5)), Y), model)
    assert "(batch, 3)" in str(error)
    _refused(InputError, r"shape \(4, 5\)", lambda: gm.input_gradients(model, np.ones((4, 5))), model)


def test_no_loss_anywhere_is_refused_with_the_fix():
    model = _model(compiled=False)
    error = _refused(LossError, "no compiled loss", lambda: gm.weight_gradients(model, X, Y), model)
    assert "loss='mse'" in str(error)
    _refused(LossError, "not a Keras loss", lambda: gm.output_gradients(model, X, Y, 0, loss="msee"), model)


def _foreign_tensor(backend: str):
    """A tensor of a framework other than the backend's (PyTorch on JAX, JAX on TensorFlow and PyTorch)."""
    if backend == "jax":
        torch = pytest.importorskip("torch")
        return torch.ones((4, 3)), "PyTorch"
    jnp = pytest.importorskip("jax.numpy")
    return jnp.ones((4, 3)), "JAX"


@pytest.mark.parametrize("question", ["weights", "output", "input", "targets"])
def test_a_tensor_of_another_framework_is_refused_by_name(backend, question):
    model = _model()
    tensor, framework = _foreign_tensor(backend)
    calls = {
        "weights": lambda: gm.weight_gradients(model, tensor, Y),
        "output": lambda: gm.output_gradients(model, [tensor], Y, layer=0),
        "input": lambda: gm.input_gradients(model, {"x": tensor}),
        "targets": lambda: gm.weight_gradients(model, X, tensor[:, :2]),
    }
    error = _refused(InputError, f"{framework} tensor", calls[question], model)
    assert repr(backend) in str(error) and "np.asarray" in str(error)


def test_the_backends_own_tensors_are_taken(backend):
    model = _model()
    x = keras.ops.convert_to_tensor(X)  # a tf.Tensor, a JAX array or a torch.Tensor
    got = gm.weight_gradients(model, x, Y).arrays()
    want = gm.weight_gradients(model, X, Y).arrays()
    for a, b in zip(got, want):
        # The same question on the same numbers; on PyTorch the first call runs eagerly and the second its
        # traced graph (the same operations): equal up to float32 round-off.
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_python_control_flow_on_a_tensor_names_the_layer_and_the_fix():
    # Under tracing (TensorFlow, JAX) or vmap (PyTorch's per-sample Jacobian) a tensor has no Python truth value.
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Lambda(lambda t: t if keras.ops.sum(t) > 0 else -t, name="flip")]
    )
    error = _refused(GradmagicError, "Python control flow", lambda: gm.input_gradients(model, X), model)
    assert "Layer 0 'flip'" in str(error) and "where" in str(error)
