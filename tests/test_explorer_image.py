"""The explorer's image view: the integrated-gradients path, driven by setting control values (no browser)."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_unchanged, fingerprint

import gradmagic as gm
from gradmagic.errors import GradmagicWarning
from gradmagic.widgets import image as image_view
from gradmagic.widgets.image import ImageExplorer

STEPS = 11


@pytest.fixture(scope="module")
def cnn():
    keras.utils.set_random_seed(8)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(4, 3, activation="tanh"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ],
        name="cnn",
    )
    x = np.random.default_rng(2).uniform(size=(3, 6, 6, 3)).astype("float32")
    return model, x


def _tape(model, points, unit):
    """The output unit and its gradient at each point, by a hand-written tape."""
    points = tf.constant(points)
    with tf.GradientTape() as tape:
        tape.watch(points)
        out = model(points)[:, unit]
    return out.numpy().astype(np.float64), tape.gradient(out, points).numpy().astype(np.float64)


def test_the_path_slider_shows_the_point_its_gradient_and_the_attribution_so_far(cnn):
    model, x = cnn
    before = fingerprint(model)
    panel = gm.explore(model, x, steps=STEPS, use_ipympl=False)
    assert isinstance(panel, ImageExplorer)
    panel.unit_select.value = 2
    panel.alpha_slider.value = 0.6
    view = panel.view
    alphas = np.linspace(0.0, 1.0, STEPS)  # the zeros baseline: the point at a is a * x
    k = 6
    assert view.index == k and view.alpha == pytest.approx(alphas[k])
    points = (alphas[:, None, None, None] * x[0]).astype("float32")
    outputs, grads = _tape(model, points, 2)
    # Float32 graphs of different batch sizes agree to rounding, not bit for bit.
    np.testing.assert_allclose(view.path.outputs, outputs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(view.gradient, grads[k], rtol=1e-4, atol=1e-7)
    # The attribution up to a: x times the trapezoid rule over the gradients from 0 to a, by hand.
    integral = sum((grads[i] + grads[i + 1]) / 2 * (alphas[1] - alphas[0]) for i in range(k))
    np.testing.assert_allclose(view.path.accumulated[k], x[0] * integral, rtol=1e-4, atol=1e-7)
    # What the plots hold: the input at a (scaled by x's range), the maps summed over channels, the marker.
    low, high = x[0].min(), x[0].max()
    np.testing.assert_allclose(panel.figure.input_image.get_array(), np.clip((points[k] - low) / (high - low), 0, 1),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(panel.figure.grad_image.get_array(), grads[k].sum(-1), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(panel.figure.attr_image.get_array(), (x[0] * integral).sum(-1), rtol=1e-4, atol=1e-7)
    assert panel.figure.path_point.get_data()[1][0] == pytest.approx(outputs[k], rel=1e-5)
    assert f"{outputs[k]:.6g}"[:5] in panel.readout.value
    assert_unchanged(model, before)


def test_a_path_slider_move_computes_nothing(cnn, monkeypatch):
    model, x = cnn
    panel = gm.explore(model, x, steps=STEPS, use_ipympl=False)
    frame = panel.figure_view.widget.value
    draws = panel.figure_view.full_draws

    def no_compute(*args, **kwargs):
        raise AssertionError("the path slider asked the core")

    monkeypatch.setattr(image_view, "integrated_gradients", no_compute)
    monkeypatch.setattr(image_view, "saliency", no_compute)
    for value in (0.0, 0.3, 0.9):
        panel.alpha_slider.value = value
        assert panel.error.value == ""
    assert panel.view.alpha == pytest.approx(0.9)
    assert panel.figure_view.widget.value != frame  # new pixels
    assert panel.figure_view.full_draws == draws  # repainted over the cached background


def test_the_noise_slider_asks_for_the_whole_path_once(cnn, monkeypatch):
    model, x = cnn
    panel = gm.explore(model, x, steps=STEPS, use_ipympl=False)
    calls = []
    real = image_view.saliency

    def counted(model, points, **kwargs):
        calls.append(len(points))
        return real(model, points, **kwargs)

    monkeypatch.setattr(image_view, "saliency", counted)
    plain = panel.view.gradient
    panel.noise_slider.value = 0.2
    assert calls == [STEPS] and panel.error.value == ""
    assert not np.allclose(panel.view.gradient, plain)
    for value in (0.1, 0.5):
        panel.alpha_slider.value = value
    assert calls == [STEPS]  # moves along the path reuse the smoothed maps
    # The map shown is SmoothGrad's at that point of the path (the same seeded call over the whole path).
    path = panel.view.path
    points = np.stack([path.point(i) for i in range(STEPS)]).astype("float32")
    expected = real(model, points, output=path.unit, smooth=0.2, samples=8).array[panel.view.index]
    np.testing.assert_allclose(panel.view.gradient, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(panel.figure.grad_image.get_array(), expected.sum(-1), rtol=1e-5, atol=1e-8)


def test_sample_and_output_choosers(cnn):
    model, x = cnn
    panel = gm.explore(model, x, steps=STEPS, use_ipympl=False)
    predicted = int(np.argmax(model(x[:1]).numpy()[0]))
    assert panel.view.path.unit == predicted
    panel.sample_select.value = 1
    panel.unit_select.value = 0
    path = panel.view.path
    np.testing.assert_array_equal(path.x, x[1])
    assert path.unit == 0
    outputs, _ = _tape(model, (np.linspace(0, 1, STEPS)[:, None, None, None] * x[1]).astype("float32"), 0)
    np.testing.assert_allclose(path.outputs, outputs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(panel.figure.path_line.get_data()[1], outputs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 1}, "steps=1. Expected an int from 2 to 512"),
        ({"steps": 2.5}, "steps=2.5"),
        ({"view": "plane"}, r"view='plane' for model 'cnn'.*Expected a view that fits that input: 'image'"),
        ({"x": np.zeros((2, 5, 6, 3))}, r"x of shape \(2, 5, 6, 3\) and dtype float64 for model 'cnn'"),
        ({"x": np.full((1, 6, 6, 3), np.nan)}, "108 NaN or Inf"),
        ({"labels": ["a"]}, r"labels=... for the 'image' view. Expected labels only with the 'sequence' view"),
        ({"gradcam_layer": "nope"}, r"nope"),
    ],
)
def test_bad_arguments_get_a_clear_message(cnn, kwargs, message):
    model, x = cnn
    before = fingerprint(model)
    x = kwargs.pop("x", x)
    with pytest.raises(gm.GradmagicError, match=message) as raised:
        gm.explore(model, x, **kwargs)
    assert "Expected" in str(raised.value) and "Fix" in str(raised.value)
    assert_unchanged(model, before)


def test_one_image_without_batch_axis(cnn):
    model, x = cnn
    panel = gm.explore(model, x[0], steps=STEPS, use_ipympl=False)
    assert panel.data.shape == (1, 6, 6, 3)


def test_the_completeness_check_is_shown_in_the_panel_not_warned(cnn):
    model, x = cnn
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradmagicWarning)
        panel = gm.explore(model, x, steps=2, use_ipympl=False)  # a two-point path: too coarse to be complete
    with pytest.warns(GradmagicWarning, match="too coarse"):
        result = gm.integrated_gradients(model, x[:1], output=panel.view.path.unit, steps=2)
    assert panel.view.path.completeness_gap == pytest.approx(float(result.completeness_gap[0]), rel=1e-4, abs=1e-7)
    assert "too coarse" in panel.readout.value and "completeness gap" in panel.readout.value


def test_gradcam_beside_the_path_is_the_cores(cnn):
    model, x = cnn
    panel = gm.explore(model, x, steps=STEPS, gradcam_layer=0, use_ipympl=False)
    expected = gm.gradcam(model, x[:1], 0, output=panel.view.path.unit).array_at_input[0]
    np.testing.assert_allclose(panel.figure.cam_image.get_array(), expected, rtol=1e-5, atol=1e-8)
    panel.sample_select.value = 2
    expected = gm.gradcam(model, x[2:3], 0, output=panel.view.path.unit).array_at_input[0]
    np.testing.assert_allclose(panel.figure.cam_image.get_array(), expected, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_image_view_on_mobilenet_v2(monkeypatch):
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None)
    x = np.random.default_rng(0).uniform(-1, 1, size=(1, 32, 32, 3)).astype("float32")
    before = fingerprint(model)
    panel = gm.explore(model, x, steps=5, use_ipympl=False)
    monkeypatch.setattr(image_view, "integrated_gradients", None)  # a path-slider move must not compute
    panel.alpha_slider.value = 0.5
    assert panel.error.value == "" and panel.view.index == 2
    outputs, grads = _tape(model, (0.5 * x).astype("float32"), panel.view.path.unit)
    # BatchNorm in inference mode, depthwise convolutions: still the tape's gradient, to float32 rounding.
    np.testing.assert_allclose(panel.view.gradient, grads[0], rtol=1e-3, atol=1e-6 * np.abs(grads).max())
    assert panel.view.path.outputs[2] == pytest.approx(outputs[0], rel=1e-4)
    assert_unchanged(model, before)
