"""The explorer panel, driven by setting control values (no browser)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_unchanged, fingerprint

import gradmagic as gm
from gradmagic import examples
from gradmagic.widgets.explorer import Explorer, compute_view


@pytest.fixture(scope="module")
def fitted():
    keras.utils.set_random_seed(3)
    model = examples.regression_net()
    x, y = examples.regression_data(128)
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    return model, x, y


@pytest.mark.parametrize("use_ipympl", [True, False])
def test_slider_moves_the_point_and_curves_match_the_model(fitted, use_ipympl):
    model, x, y = fitted
    panel = gm.explore(
        model, x, y, examples.regression_target, examples.regression_slope, use_ipympl=use_ipympl, points=50
    )
    before = fingerprint(model)
    panel.set_point([0.5])
    view = panel.view
    # The marked point: the model's own output and a central difference of it.
    value = model(np.array([[0.5]], "float32")).numpy().item()
    h = 1e-2
    slope = (model(np.array([[0.5 + h]])) - model(np.array([[0.5 - h]]))).numpy().item() / (2 * h)
    assert panel.figure.value_point.get_data()[1][0] == pytest.approx(value, rel=1e-5)
    assert panel.figure.grad_point.get_data()[1][0] == pytest.approx(slope, rel=2e-3, abs=1e-4)
    assert view.point_grad == pytest.approx(slope, rel=2e-3, abs=1e-4)
    # The curves: model outputs along the slider's range, and their derivative.
    line_x, line_y = panel.figure.value_line.get_data()
    np.testing.assert_allclose(line_y, model(line_x[:, None]).numpy().ravel(), rtol=1e-5, atol=1e-6)
    # The panel differentiates the curve and the point in one batch (points + 1 rows), this call the curve alone:
    # two compiled graphs whose float32 sums may run in another order, so they agree to a few ulps, not bit for bit
    # (a 2e-6 relative difference was seen on another machine).
    np.testing.assert_allclose(
        panel.figure.grad_line.get_data()[1], gm.input_gradients(model, line_x).array.ravel(), rtol=1e-5, atol=1e-6
    )
    # The same NumPy function on the same float32 points: exact.
    np.testing.assert_array_equal(panel.figure.value_ref.get_data()[1], examples.regression_target(line_x).ravel())
    # The bars: dLoss/dW per layer at the point, with the first sample's target.
    weights = gm.weight_gradients(model, [[0.5]], y[:1])
    expected = [np.sqrt(sum(np.sum(a.astype(float) ** 2) for a in weights[i].arrays())) for i in range(4)]
    np.testing.assert_allclose([b.get_height() for b in panel.figure.bars], expected, rtol=1e-5)
    assert f"{slope:.3g}"[:4] in panel.readout.value or f"{view.point_grad:.6g}" in panel.readout.value
    assert_unchanged(model, before)


def test_reset_to_sample_uses_that_row_and_its_target(fitted):
    model, x, y = fitted
    panel = gm.explore(model, x, y, use_ipympl=False, points=20)
    panel.set_point([9.0])
    panel.reset_to_sample(7)
    step = panel.sliders[0].step
    # The point lands on the slider grid next to the sample (a browser would snap it there anyway).
    assert panel.view.point[0] == pytest.approx(float(x[7, 0]), abs=step / 2 + 1e-6)
    assert panel.sliders[0].value == pytest.approx(float(panel.view.point[0]))
    # The same question with the same shapes: the panel's own compiled function, so a tight tolerance holds.
    assert panel.view.loss == pytest.approx(gm.weight_gradients(model, panel.view.point[None], y[7:8]).loss, rel=1e-6)


def test_many_features_get_one_slider_and_a_feature_choice():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    x = np.random.default_rng(0).normal(size=(30, 8)).astype("float32")
    panel = gm.explore(model, x, use_ipympl=False, points=10, max_sliders=6)
    assert len(panel.sliders) == 1 and len(panel.units) == 2
    panel.feature_select.value = 5
    panel.sliders[0].value = 0.25
    panel.unit_select.value = 1
    point = panel.view.point
    assert point[5] == pytest.approx(0.25) and panel.view.feature == 5 and panel.view.unit == 1
    # One point here, the panel's whole curve batch there: two compiled graphs, equal to float32 rounding.
    jac = gm.input_gradients(model, point[None], output=1).array[0]
    np.testing.assert_allclose(panel.view.gradient, jac, rtol=1e-5, atol=1e-6)
    assert panel.view.point_grad == pytest.approx(float(jac[5]), rel=1e-5, abs=1e-6)
    # Without targets the bars are d(output unit)/dW.
    bars = gm.weight_gradients(model, point[None], None, output=1)
    assert panel.figure.bars[0].get_height() == pytest.approx(
        np.sqrt(sum(np.sum(a.astype(float) ** 2) for a in bars[0].arrays())), rel=1e-5
    )


def test_functional_and_subclassed_models():
    inputs = keras.Input((2,), name="features")
    functional = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Dense(3, activation="tanh")(inputs)))

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(3, activation="tanh")
            self.out = keras.layers.Dense(1)

        def call(self, x):
            return self.out(self.hidden(x))

    x = np.random.default_rng(1).normal(size=(10, 2)).astype("float32")
    for model in (functional, Sub()):
        panel = gm.explore(model, x, use_ipympl=False, points=10)
        panel.set_point([0.3, -0.2])
        expected = gm.input_gradients(model, [[0.3, -0.2]]).array[0, 0]
        # Another batch size, so another compiled graph: equal to float32 rounding, not bit for bit.
        np.testing.assert_allclose(panel.view.gradient, expected, rtol=1e-5, atol=1e-6)


def test_models_without_a_view_get_a_clear_message():
    # Image and sequence models get their own views (tests/test_explorer_views.py); a video does not.
    model = keras.Sequential([keras.Input((2, 4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(1)], name="video")
    with pytest.raises(
        gm.GradmagicError,
        match=r"model 'video', which takes \(batch, 2, 4, 4, 1\) float32. Expected a model whose single input is a "
        r"flat float vector",
    ):
        gm.explore(model, np.zeros((2, 2, 4, 4, 1), "float32"))


def test_reference_errors_show_in_the_panel(fitted):
    model, x, _ = fitted
    calls = []

    def flaky(points):
        calls.append(len(calls))
        if len(calls) > 1:
            raise ValueError("reference broke")
        return points[:, 0]

    panel = gm.explore(model, x, reference=flaky, use_ipympl=False, points=10)
    panel.set_point([2.0])
    assert "ValueError: reference broke" in panel.error.value
    assert panel.view.point[0] != pytest.approx(2.0)  # the last good view stays


def test_panel_events_are_coalesced(fitted):
    model, x, _ = fitted
    scheduled = []
    panel = Explorer(model, x, use_ipympl=False, points=10, scheduler=lambda d, f: scheduled.append(f))
    for value in (1.0, 2.0, 3.0, 4.0):
        panel.sliders[0].value = value
    assert len(scheduled) == 1
    scheduled.pop()()
    assert panel.view.point[0] == pytest.approx(4.0) and panel.updates.renders == 1  # one render for four events


def test_compute_view_is_a_plain_function(fitted):
    model, _, _ = fitted
    line = np.linspace(0, 10, 5, dtype="float32")
    view = compute_view(model, np.array([2.0], "float32"), 0, line)
    np.testing.assert_allclose(view.values, model(line[:, None]).numpy().ravel(), rtol=1e-5)
    assert view.loss == pytest.approx(model(np.array([[2.0]])).numpy().item(), rel=1e-5)


def test_magic_opens_the_same_panel(fitted):
    from IPython.core.interactiveshell import InteractiveShell

    model, x, y = fitted
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "gradmagic")
    shell.user_ns.update(model=model, x=x, y=y, tf=tf)
    panel = shell.run_line_magic("gradients_explore", 'model x y --reference "lambda p: (p - 5) ** 2 / 25"')
    assert isinstance(panel, Explorer) and panel.reference is not None
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="flat float vector"):
        shell.user_ns["videos"] = np.zeros((2, 1, 3, 3, 1), "float32")
        shell.user_ns["cnn"] = keras.Sequential(
            [keras.Input((1, 3, 3, 1)), keras.layers.Flatten(), keras.layers.Dense(1)]
        )
        shell.run_line_magic("gradients_explore", "cnn videos")


def test_slider_steps_are_round_so_round_points_are_reachable(fitted):
    model, x, y = fitted
    panel = gm.explore(model, x, y, use_ipympl=False, points=10)
    slider = panel.sliders[0]
    assert slider.step in (0.05, 0.1)
    assert round((0.5 - slider.min) / slider.step, 6).is_integer()
    panel.set_point([0.5])
    assert panel.view.point[0] == pytest.approx(0.5, abs=1e-9)
    panel.set_point([0.5123])
    assert panel.view.point[0] == pytest.approx(0.5, abs=1e-9) or panel.view.point[0] == pytest.approx(0.55)
