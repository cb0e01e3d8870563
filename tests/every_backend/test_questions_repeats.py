"""A question asked again is answered quickly, and never from a stale function: every change is seen.

Each case asks the same question a few times (on JAX and PyTorch the later
calls take the short way, see ``gradmagic.core.questions.repeats``), changes
one thing between calls, and checks the next answer against the computation
as it is *now*: the framework's own autodiff written out by hand, or NumPy.
Those are other programs than gradmagic's compiled function, so results are
compared with float32 tolerances (relative 1e-5 to 1e-4), never exactly.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

import gradmagic as gm
from gradmagic.errors import GradmagicWarning

from .backend_truths import hand_mse_gradients

RNG = np.random.default_rng(5)
X = RNG.normal(size=(6, 3)).astype("float32")
Y = RNG.normal(size=(6, 2)).astype("float32")
_SCALE = 1.0  # read as a global by _global_loss


def _mlp(regularizer: keras.regularizers.Regularizer | None = None) -> keras.Model:
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh", kernel_regularizer=regularizer),
            keras.layers.Dense(3, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def _asked(model: keras.Model, times: int = 3, **kwargs: object) -> gm.WeightGradients:
    result = None
    for _ in range(times):
        result = gm.weight_gradients(model, X, Y, **kwargs)
    return result


def _mse(model: keras.Model) -> float:
    return float(np.mean((np.asarray(model.predict(X, verbose=0)) - Y) ** 2))


def _assert_close(got: list, want: list, scale: float = 1.0) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, scale * np.asarray(w), rtol=1e-4, atol=1e-6)


def _global_loss(y_true, y_pred):
    return _SCALE * keras.ops.mean(keras.ops.square(y_pred - y_true), axis=-1)


class Scaled(keras.losses.Loss):
    """A user loss whose computation reads an attribute."""

    def __init__(self, scale):
        super().__init__(name="scaled")
        self.scale = scale

    def call(self, y_true, y_pred):
        return self.scale * keras.ops.mean(keras.ops.square(y_pred - y_true), axis=-1)


def test_a_repeated_question_follows_new_data_and_new_weight_values():
    model = _mlp()
    _asked(model)
    x2, y2 = X[::-1].copy(), Y * 2.0
    model.set_weights([w * 0.5 for w in model.get_weights()])
    result = gm.weight_gradients(model, x2, y2)
    _assert_close(result.arrays(), hand_mse_gradients(model, x2, y2))
    pred = np.asarray(model.predict(x2, verbose=0))
    assert result.loss == pytest.approx(float(np.mean((pred - y2) ** 2)), rel=1e-5)


def test_a_module_global_read_by_the_loss_is_seen(monkeypatch):
    model = _mlp()
    first = _asked(model, loss=_global_loss)
    monkeypatch.setattr(f"{__name__}._SCALE", 3.0)
    second = gm.weight_gradients(model, X, Y, loss=_global_loss)
    assert second.loss == pytest.approx(3.0 * first.loss, rel=1e-5)
    _assert_close(second.arrays(), hand_mse_gradients(model, X, Y), scale=3.0)


def test_a_closure_and_a_loss_objects_attribute_changed_in_place_are_seen():
    model = _mlp()
    scale = 1.0

    def closure_loss(y_true, y_pred):
        return scale * keras.ops.mean(keras.ops.square(y_pred - y_true), axis=-1)

    _asked(model, loss=closure_loss)
    scale = 2.0
    _assert_close(gm.weight_gradients(model, X, Y, loss=closure_loss).arrays(), hand_mse_gradients(model, X, Y), 2.0)

    scaled = Scaled(1.0)
    first = _asked(model, loss=scaled)
    scaled.scale = 4.0
    second = gm.weight_gradients(model, X, Y, loss=scaled)
    assert second.loss == pytest.approx(4.0 * first.loss, rel=1e-5)
    _assert_close(second.arrays(), hand_mse_gradients(model, X, Y), 4.0)


def test_layer_settings_changed_between_calls_are_seen():
    model = _mlp()
    _asked(model)
    model.layers[0].activation = keras.activations.relu
    _assert_close(gm.weight_gradients(model, X, Y).arrays(), hand_mse_gradients(model, X, Y))
    model.layers[1].trainable = False
    result = _asked(model, times=1)
    assert len(result.arrays()) == 4
    _assert_close(result.arrays(), hand_mse_gradients(model, X, Y))


def test_a_regularizer_factor_changed_in_place_is_seen():
    model = _mlp(keras.regularizers.L2(0.1))
    kernel = np.asarray(model.layers[0].kernel.numpy(), "float64")
    first = _asked(model)
    assert first.loss == pytest.approx(_mse(model) + 0.1 * np.sum(kernel**2), rel=1e-5)
    model.layers[0].kernel_regularizer.l2 = 0.5
    second = gm.weight_gradients(model, X, Y)
    assert second.loss == pytest.approx(_mse(model) + 0.5 * np.sum(kernel**2), rel=1e-5)


def test_compile_and_layers_popped_and_added_are_seen():
    model = _mlp()
    _asked(model)
    model.compile(optimizer="sgd", loss="mae")
    mae = float(np.mean(np.abs(np.asarray(model.predict(X, verbose=0)) - Y)))
    assert gm.weight_gradients(model, X, Y).loss == pytest.approx(mae, rel=1e-5)
    model.compile(optimizer="sgd", loss="mse")
    _asked(model)
    model.pop()
    model.add(keras.layers.Dense(2, name="new_head"))
    result = gm.weight_gradients(model, X, Y)
    assert "new_head" in result.paths[-1]
    _assert_close(result.arrays(), hand_mse_gradients(model, X, Y))


def test_one_layer_then_another_and_a_new_loss_object_each_call():
    model = _mlp()
    _asked(model, layer=0)
    whole = hand_mse_gradients(model, X, Y)
    _assert_close(gm.weight_gradients(model, X, Y, layer=1).arrays(), whole[2:4])
    _assert_close(gm.weight_gradients(model, X, Y, layer=model.layers[2]).arrays(), whole[4:6])
    for _ in range(3):  # a loss object made anew on every call is the same question
        result = gm.weight_gradients(model, X, Y, loss=keras.losses.MeanSquaredError())
    _assert_close(result.arrays(), whole)


def test_non_finite_data_still_warns_and_other_data_types_still_convert():
    model = _mlp()
    _asked(model)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.warns(GradmagicWarning, match="NaN"):
        gm.weight_gradients(model, bad, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = gm.weight_gradients(model, X.astype("float64").tolist(), Y.astype("float64"))
    _assert_close(result.arrays(), hand_mse_gradients(model, X, Y))


def test_the_repeated_call_skips_the_cache_key(monkeypatch):
    if keras.backend.backend() == "tensorflow":
        pytest.skip("TensorFlow's questions build their key on every call")
    from gradmagic.core.questions import stateless

    model = _mlp()
    gm.weight_gradients(model, X, Y)
    built = []
    original = stateless.question_key
    monkeypatch.setattr(stateless, "question_key", lambda *a, **k: built.append(1) or original(*a, **k))
    _assert_close(gm.weight_gradients(model, X * 2, Y).arrays(), hand_mse_gradients(model, X * 2, Y))
    assert built == []
    gm.clear_cache(model)
    gm.weight_gradients(model, X, Y)
    assert built == [1]


class Shifted(keras.layers.Layer):
    """A dense map moved by every weight of a holder layer, which is never called (so never built or locked)."""

    def __init__(self):
        super().__init__()
        self.shifts = keras.layers.Layer(name="shifts")

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 2), initializer="glorot_uniform")

    def call(self, x):
        out = keras.ops.matmul(x, self.kernel)
        for shift in self.shifts.weights:
            out = out + shift
        return out


def test_a_non_trainable_weight_added_after_the_first_question_is_seen():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((3,)), Shifted()])
    model.compile(optimizer="sgd", loss="mse")
    first = _asked(model)
    # Keras locks a layer's weights once it is built; the holder was never built, so it takes one now.
    model.layers[0].shifts.add_weight(shape=(2,), initializer="ones", trainable=False, name="shift")
    pred = X.astype("float64") @ np.asarray(model.layers[0].kernel.numpy(), "float64") + 1.0
    for _ in range(2):  # the full way, then the short way
        result = gm.weight_gradients(model, X, Y)
        assert result.loss == pytest.approx(float(np.mean((pred - Y) ** 2)), rel=1e-5)
        # d mean((xK + 1 - y)^2) / dK = 2 x^T (xK + 1 - y) / (n * 2), in float64 NumPy.
        want = 2.0 * X.astype("float64").T @ (pred - Y) / pred.size
        np.testing.assert_allclose(result.arrays()[0], want, rtol=1e-4, atol=1e-6)
    assert result.loss != pytest.approx(first.loss, rel=1e-3)


# --- d(output)/d(input) and dLoss/d(layer output) asked again: the same checks, against NumPy in float64 ----------


def _forward(model: keras.Model, x: np.ndarray) -> list[np.ndarray]:
    """The outputs of the three Dense layers of an _mlp-shaped model, in float64 NumPy (activations read live)."""
    outs, h = [], x.astype("float64")
    for layer in model.layers:
        kernel, bias = (np.asarray(w, "float64") for w in layer.get_weights())
        z = h @ kernel + bias
        h = np.tanh(z) if layer.activation is keras.activations.tanh else z
        if layer.activation not in (keras.activations.tanh, keras.activations.linear):
            raise AssertionError("the NumPy truth knows tanh and linear only")
        outs.append(h)
    return outs


def _jacobians(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Per-sample d(output)/d(input), shape (samples, outputs, inputs): the chain rule through each Dense layer."""
    outs = _forward(model, x)
    jac = np.broadcast_to(np.eye(x.shape[1]), (len(x), x.shape[1], x.shape[1]))
    for layer, out in zip(model.layers, outs):
        kernel = np.asarray(layer.get_weights()[0], "float64")
        local = np.broadcast_to(kernel.T, (len(x), *kernel.T.shape))  # d z / d h, the same for every sample
        if layer.activation is keras.activations.tanh:
            local = local * (1.0 - out**2)[:, :, None]
        jac = local @ jac
    return jac


def _input_asked(model: keras.Model, x: np.ndarray, times: int = 3, **kwargs: object) -> gm.InputGradients:
    result = None
    for _ in range(times):
        result = gm.input_gradients(model, x, **kwargs)
    return result


def test_a_repeated_input_question_follows_new_points_weights_settings_and_layers():
    model = _mlp()
    # float32 Jacobians from the compiled function against the float64 chain rule: round-off only.
    np.testing.assert_allclose(_input_asked(model, X).array, _jacobians(model, X), rtol=1e-4, atol=1e-6)
    points = X * 3.0  # new points of the same shape: the short way
    np.testing.assert_allclose(gm.input_gradients(model, points).array, _jacobians(model, points), rtol=1e-4, atol=1e-6)
    model.set_weights([w * 0.5 for w in model.get_weights()])
    result = gm.input_gradients(model, points)
    np.testing.assert_allclose(result.array, _jacobians(model, points), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.values, _forward(model, points)[-1], rtol=1e-5, atol=1e-6)
    _input_asked(model, X)
    model.layers[1].activation = keras.activations.linear
    np.testing.assert_allclose(gm.input_gradients(model, X).array, _jacobians(model, X), rtol=1e-4, atol=1e-6)
    _input_asked(model, X, output=1)
    jac = _jacobians(model, X)
    np.testing.assert_allclose(gm.input_gradients(model, X, output=0).array, jac[:, 0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gm.input_gradients(model, X, output=-1).array, jac[:, 1], rtol=1e-4, atol=1e-6)
    _input_asked(model, X)
    model.pop()
    model.add(keras.layers.Dense(3, name="wider_head"))
    result = gm.input_gradients(model, X)
    assert result.array.shape == (len(X), 3, 3)
    np.testing.assert_allclose(result.array, _jacobians(model, X), rtol=1e-4, atol=1e-6)
    smaller = X[:2]  # another batch size: another signature, the full way
    np.testing.assert_allclose(
        gm.input_gradients(model, smaller).array, _jacobians(model, smaller), rtol=1e-4, atol=1e-6
    )


def test_a_repeated_input_question_still_warns_on_non_finite_points():
    model = _mlp()
    _input_asked(model, X)
    bad = X.copy()
    bad[1, 2] = np.inf
    with pytest.warns(GradmagicWarning, match="Inf"):
        gm.input_gradients(model, bad)


def _output_asked(model: keras.Model, layer: int, times: int = 3, **kwargs: object) -> gm.OutputGradients:
    result = None
    for _ in range(times):
        result = gm.output_gradients(model, X, Y, layer=layer, **kwargs)
    return result


def _output_truth(model: keras.Model, x: np.ndarray, y: np.ndarray, layer: int, loss: str = "mse") -> np.ndarray:
    """dLoss/d(output of ``layer``) in float64: the loss's derivative at the model output, carried back by hand."""
    outs = _forward(model, x)
    diff = outs[-1] - y
    grad = 2.0 * diff / diff.size if loss == "mse" else np.sign(diff) / diff.size
    for later in reversed(model.layers[layer + 1 :]):
        index = model.layers.index(later)
        if later.activation is keras.activations.tanh:
            grad = grad * (1.0 - outs[index] ** 2)
        grad = grad @ np.asarray(later.get_weights()[0], "float64").T
    return grad


def test_a_repeated_output_question_follows_new_data_weights_loss_and_layer():
    model = _mlp()
    np.testing.assert_allclose(_output_asked(model, 1).array, _output_truth(model, X, Y, 1), rtol=1e-4, atol=1e-7)
    y2 = Y * -2.0
    result = gm.output_gradients(model, X, y2, layer=1)
    np.testing.assert_allclose(result.array, _output_truth(model, X, y2, 1), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.output, _forward(model, X)[1], rtol=1e-5, atol=1e-6)
    model.set_weights([w * 1.5 for w in model.get_weights()])
    np.testing.assert_allclose(
        gm.output_gradients(model, X, Y, layer=1).array, _output_truth(model, X, Y, 1), rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(
        gm.output_gradients(model, X, Y, layer=0).array, _output_truth(model, X, Y, 0), rtol=1e-4, atol=1e-7
    )
    _output_asked(model, 0)
    model.layers[1].activation = keras.activations.linear
    np.testing.assert_allclose(
        gm.output_gradients(model, X, Y, layer=0).array, _output_truth(model, X, Y, 0), rtol=1e-4, atol=1e-7
    )
    _output_asked(model, 0)
    model.compile(optimizer="sgd", loss="mae")
    result = gm.output_gradients(model, X, Y, layer=0)
    np.testing.assert_allclose(result.array, _output_truth(model, X, Y, 0, loss="mae"), rtol=1e-4, atol=1e-7)
    assert result.loss == pytest.approx(float(np.mean(np.abs(_forward(model, X)[-1] - Y))), rel=1e-5)
    _output_asked(model, 0, loss="mse")
    np.testing.assert_allclose(
        gm.output_gradients(model, X, Y, layer=0).array, _output_truth(model, X, Y, 0, loss="mae"), rtol=1e-4, atol=1e-7
    )


@pytest.mark.parametrize("kind", ["input", "output"])
def test_a_repeated_input_or_output_question_skips_the_cache_key(monkeypatch, kind):
    if keras.backend.backend() == "tensorflow":
        pytest.skip("TensorFlow's questions build their key on every call")
    from gradmagic.core.questions import stateless

    model = _mlp()

    def ask(x: np.ndarray) -> np.ndarray:
        if kind == "input":
            return gm.input_gradients(model, x).array
        return gm.output_gradients(model, x, Y, layer=1).array

    ask(X)
    built = []
    original = stateless.question_key
    monkeypatch.setattr(stateless, "question_key", lambda *a, **k: built.append(1) or original(*a, **k))
    want = _jacobians(model, X * 2) if kind == "input" else _output_truth(model, X * 2, Y, 1)
    np.testing.assert_allclose(ask(X * 2), want, rtol=1e-4, atol=1e-7)
    assert built == []
    gm.clear_cache(model)
    ask(X)
    assert built == [1]
