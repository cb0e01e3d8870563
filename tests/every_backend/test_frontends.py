"""The front-ends on every backend: ``%gradients`` in a real IPython shell, ``gm.explore`` driven by its sliders.

The truth is written out in NumPy: the forward pass of a small tanh network with
fixed weights, its analytic input derivative, and the analytic dLoss/dW of its
linear last layer under the mean squared error; for the image, sequence and
token views (integrated gradients along a path), the framework's own autodiff
written out in ``backend_truths.hand_unit_gradient``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from IPython.core.interactiveshell import InteractiveShell

import gradmagic as gm

from .backend_truths import fingerprint, hand_unit_gradient, no_grad_left


def _net(n_in: int, hidden: int, n_out: int, seed: int) -> tuple[keras.Model, list[np.ndarray]]:
    """Dense(tanh) -> Dropout (layer 1: no weights) -> Dense, with fixed weights; and those weights in float64."""
    model = keras.Sequential(
        [
            keras.Input((n_in,)),
            keras.layers.Dense(hidden, activation="tanh", name="hidden"),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(n_out, name="head"),
        ],
        name="net",
    )
    rng = np.random.default_rng(seed)
    weights = [rng.normal(scale=0.7, size=w.shape).astype("float32") for w in model.get_weights()]
    model.set_weights(weights)
    model.compile(optimizer="sgd", loss="mse")
    return model, [w.astype("float64") for w in weights]


def _hidden(x: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    return np.tanh(np.asarray(x, "float64") @ weights[0] + weights[1])


@pytest.fixture(scope="module")
def shell():
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "gradmagic")
    yield ip
    ip.run_line_magic("unload_ext", "gradmagic")


def test_gradients_magic_for_one_layer_matches_the_analytic_derivative(shell):
    model, weights = _net(3, 4, 2, seed=1)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 3)).astype("float32"), rng.normal(size=(5, 2)).astype("float32")
    shell.user_ns.update(model=model, x=x, y=y)
    result = shell.run_line_magic("gradients", "model x y --layer 2")
    # dLoss/dW of the linear head under mean((h W + b - y)^2): 2/size * h^T r and 2/size * sum(r).
    h = _hidden(x, weights)
    residual = h @ weights[2] + weights[3] - y
    scale = 2.0 / residual.size
    assert result.loss == pytest.approx(float(np.mean(residual**2)), rel=1e-5)
    kernel, bias = result.arrays()
    # float32 on the backend against float64 here: a few float32 ulps.
    np.testing.assert_allclose(kernel, scale * h.T @ residual, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bias, scale * residual.sum(axis=0), rtol=1e-4, atol=1e-6)
    # What the magic returns is what the function returns.
    direct = gm.weight_gradients(model, x, y, layer=2)
    for got, want in zip(result.arrays(), direct.arrays(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # same question, same compiled function
    with pytest.raises(Exception, match="layer"):
        shell.run_line_magic("gradients", "model x y --layer 1")  # Dropout has no weights: a clear refusal


def test_explorer_slider_moves_update_the_values(shell):
    model, weights = _net(1, 6, 1, seed=3)
    x = np.linspace(0.0, 10.0, 41, dtype="float32")[:, None]
    panel = gm.explore(model, x, use_ipympl=False, points=25)
    slider = panel.sliders[0]
    seen = []
    for target in (0.5, 3.0, 7.5):
        slider.value = target  # as a user drags it: the panel recomputes at once (no event loop here)
        point = float(panel.view.point[0])
        assert point == pytest.approx(target, abs=slider.step / 2 + 1e-9)
        h = _hidden([[point]], weights)
        value = float((h @ weights[2] + weights[3]).item())
        # d/dx of W2^T tanh(W1 x + b1) + b2 = sum_j W2_j (1 - h_j^2) W1_j.
        slope = float((((1 - h**2) * weights[0]) @ weights[2]).item())
        assert panel.view.point_value == pytest.approx(value, rel=1e-5, abs=1e-6)
        assert panel.view.point_grad == pytest.approx(slope, rel=1e-4, abs=1e-6)
        assert panel.figure.grad_point.get_data()[1][0] == pytest.approx(slope, rel=1e-4, abs=1e-6)
        seen.append(panel.view.point_grad)
    # The curve drawn along the slider's range is the analytic derivative too.
    line_x, line_grad = panel.figure.grad_line.get_data()
    h = _hidden(np.asarray(line_x)[:, None], weights)
    np.testing.assert_allclose(line_grad, ((1 - h**2) * weights[0]) @ weights[2][:, 0], rtol=1e-4, atol=1e-6)
    assert len(set(seen)) == 3, "each slider move should show a new point"


def test_plane_view_slider_moves_update_the_gradient(shell):
    model, weights = _net(2, 5, 1, seed=4)
    x = np.random.default_rng(5).uniform(-1.0, 1.0, size=(30, 2)).astype("float32")
    panel = gm.explore(model, x, view="plane", use_ipympl=False)
    for target in ((0.5, -0.25), (-0.75, 0.5)):
        panel.x_slider.value, panel.y_slider.value = target  # as a user drags the two sliders
        point = np.asarray(panel.view.point, "float64")
        np.testing.assert_allclose(point, target, atol=max(panel.x_slider.step, panel.y_slider.step))
        h = _hidden(point[None], weights)
        # The gradient of W2^T tanh(W1^T p + b1) + b2 with respect to p: W1 diag(1 - h^2) W2.
        expected = (weights[0] * (1 - h**2)) @ weights[2][:, 0]
        assert panel.view.value == pytest.approx(float((h @ weights[2] + weights[3]).item()), rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(panel.view.gradient, expected, rtol=1e-4, atol=1e-6)


def test_image_view_path_slider_shows_the_gradient_and_attribution_so_far(shell):
    keras.utils.set_random_seed(8)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(4, 3, activation="tanh", name="conv"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ],
        name="cnn",
    )
    x = np.random.default_rng(2).uniform(size=(3, 6, 6, 3)).astype("float32")
    before = fingerprint(model)
    steps = 11
    panel = gm.explore(model, x, steps=steps, gradcam_layer="conv", use_ipympl=False)
    panel.unit_select.value = 2
    panel.alpha_slider.value = 0.6  # as a user drags it
    view = panel.view
    alphas = np.linspace(0.0, 1.0, steps)  # the zeros baseline: the point at a is a * x
    k = 6
    assert view.index == k and panel.error.value == ""
    points = (alphas[:, None, None, None] * x[0]).astype("float32")
    grads = hand_unit_gradient(model, points, 2).astype(np.float64)
    outputs = keras.ops.convert_to_numpy(model(points))[:, 2]
    # float32 programs of different batch sizes agree to rounding, not bit for bit.
    np.testing.assert_allclose(view.path.outputs, outputs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(view.gradient, grads[k], rtol=1e-4, atol=1e-7)
    # The attribution up to a: x times the trapezoid rule over the gradients from 0 to a.
    integral = sum((grads[i] + grads[i + 1]) / 2 * (alphas[1] - alphas[0]) for i in range(k))
    np.testing.assert_allclose(view.path.accumulated[k], x[0] * integral, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(panel.figure.grad_image.get_array(), grads[k].sum(-1), rtol=1e-4, atol=1e-7)
    # Grad-CAM at x: a global-average-pooled conv's channel weights are the head's weights over 16 places.
    activations = keras.ops.convert_to_numpy(model.get_layer("conv")(x[:1])).astype(np.float64)
    head = model.layers[-1].get_weights()[0].astype(np.float64)
    cam = np.maximum(activations @ (head[:, 2] / 16), 0)[0]
    np.testing.assert_allclose(gm.gradcam(model, x[:1], "conv", output=2).array[0], cam, rtol=1e-4, atol=1e-6)
    assert panel.view.path.gradcam.shape == (6, 6) and np.all(panel.view.path.gradcam >= 0)
    # The magic opens the same view, on the same path.
    shell.user_ns.update(cnn=model, images=x)
    opened = shell.run_line_magic("gradients_explore", "cnn images")
    assert type(opened) is type(panel)
    np.testing.assert_allclose(
        opened.view.path.outputs[-1],
        float(keras.ops.convert_to_numpy(model(x[:1]))[0, opened.view.path.unit]),
        rtol=1e-5,
    )
    assert fingerprint(model) == before and no_grad_left(model)


def test_sequence_view_matches_the_frameworks_own_autodiff(shell):
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((6, 4)), keras.layers.LSTM(5), keras.layers.Dense(2)], name="lstm")
    x = np.random.default_rng(1).normal(size=(3, 6, 4)).astype("float32")
    before = fingerprint(model)
    panel = gm.explore(model, x, labels=list("abcdef"), use_ipympl=False)
    panel.sample_select.value = 2
    panel.unit_select.value = 1
    grad = hand_unit_gradient(model, x[2:3], 1)[0].astype(np.float64)
    view = panel.view
    assert panel.error.value == ""
    np.testing.assert_allclose(view.norms, np.linalg.norm(grad, axis=1), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(view.grad_x_input, (grad * x[2]).sum(axis=1), rtol=1e-5, atol=1e-8)
    assert view.value == pytest.approx(float(keras.ops.convert_to_numpy(model(x[2:3]))[0, 1]), rel=1e-5)
    assert [t.get_text() for t in panel.figure.ax_ig.get_xticklabels()] == list("abcdef")
    assert fingerprint(model) == before and no_grad_left(model)


def test_token_view_differentiates_at_the_embedding_output(shell):
    keras.utils.set_random_seed(9)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(12, 4, name="embed"),
            keras.layers.LSTM(3),
            keras.layers.Dense(2),
        ]
    )
    ids = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    panel = gm.explore(model, ids, labels=[list("abcde"), list("vwxyz")], use_ipympl=False)
    panel.sample_select.value = 1
    vectors = keras.ops.convert_to_numpy(model.get_layer("embed")(ids[1:2]))

    def rest(v):
        return model.layers[2](model.layers[1](v))

    grad = hand_unit_gradient(rest, vectors, 0)[0].astype(np.float64)
    view = panel.view
    assert view.tokens and panel.error.value == ""
    np.testing.assert_allclose(view.norms, np.linalg.norm(grad, axis=1), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(view.grad_x_input, (grad * vectors[0]).sum(axis=1), rtol=1e-5, atol=1e-9)
    assert "the Embedding" in panel.readout.value
