"""The explorer's plane and sequence views and the choice of view, driven by setting control values."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_unchanged, fingerprint

import gradmagic as gm
from gradmagic.errors import InputError
from gradmagic.widgets import sequence as sequence_view
from gradmagic.widgets.plane import PlaneExplorer, compute_grid
from gradmagic.widgets.sequence import SequenceExplorer, compute_path, view_at


@pytest.fixture(scope="module")
def three_features():
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)], name="three"
    )
    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    return model, x


@pytest.fixture(scope="module")
def lstm():
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((6, 4)), keras.layers.LSTM(5), keras.layers.Dense(2)], name="lstm")
    x = np.random.default_rng(1).normal(size=(3, 6, 4)).astype("float32")
    return model, x


@pytest.fixture(scope="module")
def tokens():
    keras.utils.set_random_seed(7)
    ids = keras.Input((5,), dtype="int32")
    hidden = keras.layers.Dense(3, activation="tanh")(keras.layers.Embedding(12, 4, name="embed")(ids))
    model = keras.Model(ids, keras.layers.Dense(2)(keras.layers.Flatten()(hidden)), name="tokens")
    x = np.array([[1, 2, 3, 4, 5], [0, 11, 8, 7, 6]], "int32")
    return model, x


def _unit(model, points, unit):
    return model(points).numpy().reshape(len(points), -1)[:, unit].astype(np.float64)


def test_plane_arrows_match_finite_differences_of_the_output(three_features):
    model, x = three_features
    before = fingerprint(model)
    panel = gm.explore(model, x, view="plane", use_ipympl=False)
    assert isinstance(panel, PlaneExplorer)
    panel.y_select.value = 2
    panel.unit_select.value = 1
    grid = panel.view.grid
    assert (grid.fx, grid.fy) == (0, 2)
    gx, gy = np.meshgrid(grid.xs, grid.ys)
    points = np.repeat(x[:1], gx.size, axis=0)
    points[:, 0], points[:, 2] = gx.ravel(), gy.ravel()
    # The model's own output on the grid, the other feature held at sample 0's value.
    np.testing.assert_allclose(grid.values.ravel(), _unit(model, points, 1), rtol=1e-5, atol=1e-6)
    h = 1e-2  # central differences in float32: truncation ~h^2 * f''', rounding ~1e-7 / h; both far below atol
    for feature, arrows in ((0, grid.grad_x), (2, grid.grad_y)):
        step = np.zeros(3, "float32")
        step[feature] = h
        slope = (_unit(model, points + step, 1) - _unit(model, points - step, 1)) / (2 * h)
        np.testing.assert_allclose(arrows.ravel(), slope, rtol=1e-2, atol=1e-3)
    # The drawn arrows are those gradients with one common scale factor.
    u, v = panel.figure.arrows.U, panel.figure.arrows.V
    np.testing.assert_allclose(u, grid.grad_x.ravel() * panel.figure.scale, rtol=1e-6)
    np.testing.assert_allclose(v, grid.grad_y.ravel() * panel.figure.scale, rtol=1e-6)
    assert_unchanged(model, before)


def test_plane_slider_moves_the_point_and_its_readout_without_a_new_grid(three_features):
    model, x = three_features
    panel = gm.explore(model, x, view="plane", feature_names=["a", "b", "c"], use_ipympl=False)
    grid = panel.view.grid
    draws = panel.figure_view.full_draws
    panel.set_point(0.5, -0.25)
    point = np.array([0.5, -0.25, x[0, 2]], "float32")
    np.testing.assert_allclose(panel.view.point, point, rtol=1e-6)
    expected = gm.input_gradients(model, point[None], output=0).array[0]
    np.testing.assert_allclose(panel.view.gradient, expected, rtol=1e-5, atol=1e-7)
    assert panel.view.value == pytest.approx(float(model(point[None])[0, 0]), rel=1e-5)
    assert panel.figure.point.get_data()[0][0] == pytest.approx(0.5)
    assert panel.figure.point.get_data()[1][0] == pytest.approx(-0.25)
    assert "a=0.5, b=-0.25" in panel.readout.value and f"{panel.view.gradient[1]:.6g}" in panel.readout.value
    assert panel.view.grid is grid and panel.figure_view.full_draws == draws  # a repaint over the background
    panel.reset_to_sample(3)
    np.testing.assert_array_equal(panel.view.point, x[3])
    assert panel.view.grid is not grid and panel.figure_view.full_draws == draws + 1


def test_a_click_on_the_plane_moves_the_point_there(three_features):
    from matplotlib.backend_bases import MouseEvent

    model, x = three_features
    panel = gm.explore(model, x, view="plane", use_ipympl=False)
    canvas = panel.figure_view.canvas
    pixel_x, pixel_y = panel.figure.ax.transData.transform((0.25, -0.5))
    canvas.callbacks.process("button_press_event", MouseEvent("button_press_event", canvas, pixel_x, pixel_y, 1))
    assert panel.view.point[0] == pytest.approx(0.25, abs=1e-3) and panel.view.point[1] == pytest.approx(-0.5, abs=1e-3)
    assert panel.x_slider.value == pytest.approx(0.25, abs=1e-3)
    expected = gm.input_gradients(model, panel.view.point[None], output=0).array[0]
    np.testing.assert_allclose(panel.view.gradient, expected, rtol=1e-5, atol=1e-7)
    outside = MouseEvent("button_press_event", canvas, 1.0, 1.0, 1)  # the figure's corner, off the axes
    canvas.callbacks.process("button_press_event", outside)
    assert panel.view.point[0] == pytest.approx(0.25, abs=1e-3)


def test_plane_same_feature_on_both_axes_is_refused_in_the_panel(three_features):
    model, x = three_features
    panel = gm.explore(model, x, view="plane", use_ipympl=False)
    panel.y_select.value = 0
    assert "same feature on both axes" in panel.error.value and panel.view.grid.fy == 1


def test_compute_grid_is_a_plain_function(three_features):
    model, x = three_features
    xs, ys = np.array([0.0, 1.0], "float32"), np.array([-1.0, 0.0, 1.0], "float32")
    grid = compute_grid(model, x[0], 1, 0, xs, ys, unit=0)
    assert grid.values.shape == grid.grad_x.shape == (3, 2)
    points = np.repeat(x[:1], 6, axis=0)
    gx, gy = np.meshgrid(xs, ys)
    points[:, 1], points[:, 0] = gx.ravel(), gy.ravel()
    np.testing.assert_allclose(grid.values.ravel(), _unit(model, points, 0), rtol=1e-5, atol=1e-6)


def test_sequence_view_matches_a_hand_written_tape(lstm):
    model, x = lstm
    before = fingerprint(model)
    panel = gm.explore(model, x, labels=list("abcdef"), use_ipympl=False)
    assert isinstance(panel, SequenceExplorer)
    panel.sample_select.value = 2
    panel.unit_select.value = 1
    sample = tf.constant(x[2:3])
    with tf.GradientTape() as tape:
        tape.watch(sample)
        out = model(sample)[:, 1]
    grad = tape.gradient(out, sample).numpy()[0].astype(np.float64)
    view = panel.view
    np.testing.assert_allclose(view.norms, np.linalg.norm(grad, axis=1), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(view.grad_x_input, (grad * x[2]).sum(axis=1), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose([b.get_height() for b in panel.figure.norm_bars], view.norms, rtol=1e-6)
    assert [t.get_text() for t in panel.figure.ax_ig.get_xticklabels()] == list("abcdef")
    assert view.value == pytest.approx(float(out[0]), rel=1e-5)
    assert_unchanged(model, before)


def test_token_view_differentiates_at_the_embedding_output(tokens):
    model, x = tokens
    before = fingerprint(model)
    words = [["the", "cat", "sat", "on", "it"], ["a", "dog", "ran", "to", "me"]]
    panel = gm.explore(model, x, labels=words, use_ipympl=False)
    panel.sample_select.value = 1
    embed = model.get_layer("embed")
    with tf.GradientTape() as tape:
        vectors = embed(x[1:2])
        tape.watch(vectors)
        out = vectors
        for layer in model.layers[2:]:
            out = layer(out)
        unit = out[:, 0]
    grad = tape.gradient(unit, vectors).numpy()[0].astype(np.float64)
    view = panel.view
    assert view.tokens
    np.testing.assert_allclose(view.norms, np.linalg.norm(grad, axis=1), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(view.grad_x_input, (grad * vectors.numpy()[0]).sum(axis=1), rtol=1e-5, atol=1e-9)
    assert [t.get_text() for t in panel.figure.ax_ig.get_xticklabels()] == words[1]
    assert "the Embedding" in panel.readout.value
    assert_unchanged(model, before)


def test_compute_path_and_view_at_are_plain_functions(lstm):
    model, x = lstm
    path = compute_path(model, x[:1], unit=0, steps=5)
    view = view_at(path, 4)
    assert view.alpha == 1.0 and view.norms.shape == view.grad_x_input.shape == view.integrated.shape == (6,)
    # The integrated gradients up to a = 1 are the core's integrated gradients.
    whole = gm.integrated_gradients(model, x[:1], output=0, steps=5)
    np.testing.assert_allclose(view.integrated, whole.array[0].sum(-1), rtol=1e-5, atol=1e-8)


def test_the_path_slider_moves_along_the_precomputed_path(lstm, monkeypatch):
    model, x = lstm
    panel = gm.explore(model, x, steps=9, use_ipympl=False)

    def no_compute(*args, **kwargs):
        raise AssertionError("the path slider asked the core")

    monkeypatch.setattr(sequence_view, "integrated_gradients", no_compute)
    monkeypatch.setattr(sequence_view, "token_integrated_gradients", no_compute)
    panel.alpha_slider.value = 0.25
    assert panel.error.value == "" and panel.view.index == 2
    point = tf.constant(0.25 * x[:1])
    with tf.GradientTape() as tape:
        tape.watch(point)
        out = model(point)[:, 0]
    grad = tape.gradient(out, point).numpy()[0].astype(np.float64)
    np.testing.assert_allclose(panel.view.norms, np.linalg.norm(grad, axis=1), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(panel.view.grad_x_input, (grad * 0.25 * x[0]).sum(axis=1), rtol=1e-4, atol=1e-8)
    assert panel.view.value == pytest.approx(float(out[0]), rel=1e-5)
    assert "a</td><td><code>0.25" in panel.readout.value


def test_token_path_runs_in_embedding_space(tokens):
    model, x = tokens
    steps = 6
    result = gm.token_integrated_gradients(model, x[1:2], output=1, steps=steps)
    embed = model.get_layer("embed")
    alphas = np.linspace(0.0, 1.0, steps)
    vectors = embed(x[1:2]).numpy()
    with tf.GradientTape() as tape:
        scaled = tf.constant(alphas[:, None, None].astype("float32") * vectors)
        tape.watch(scaled)
        out = scaled
        for layer in model.layers[2:]:
            out = layer(out)
        unit = out[:, 1]
    grads = tape.gradient(unit, scaled).numpy().astype(np.float64)
    # The trapezoid rule by hand over the hand-written tape's gradients, times the embeddings.
    integral = (grads[:-1] + grads[1:]).sum(axis=0) / 2 / (steps - 1)
    np.testing.assert_allclose(result.array[0], vectors[0] * integral, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(result.path_outputs[0], unit.numpy(), rtol=1e-5, atol=1e-7)
    gap = result.array.astype(np.float64).sum() - (unit.numpy()[-1] - unit.numpy()[0])
    assert result.completeness_gap[0] == pytest.approx(gap, abs=1e-6)
    # The panel shows the same path: at a = 0.4 the integrated gradients so far.
    panel = gm.explore(model, x, steps=steps, use_ipympl=False)
    panel.sample_select.value, panel.unit_select.value = 1, 1
    panel.alpha_slider.value = 0.4
    so_far = vectors[0] * (grads[:2] + grads[1:3]).sum(axis=0) / 2 / (steps - 1)
    np.testing.assert_allclose(panel.view.integrated, so_far.sum(-1), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose([b.get_height() for b in panel.figure.ig_bars], so_far.sum(-1), rtol=1e-4, atol=1e-8)


def _two_inputs():
    a, b = keras.Input((2,), name="a"), keras.Input((2,), name="b")
    return keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])), name="two")


@pytest.mark.parametrize(
    ("model", "x", "kwargs", "message"),
    [
        (_two_inputs(), np.zeros((2, 2)), {}, r"model 'two', which takes \(batch, 2\) float32, \(batch, 2\) float32"),
        (
            keras.Sequential([keras.Input((2, 3, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(1)], name="vid"),
            np.zeros((1, 2, 3, 4, 1)),
            {},
            r"model 'vid', which takes \(batch, 2, 3, 4, 1\) float32. Expected a model whose single input is",
        ),
        (
            keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Dense(1)], name="ints"),
            np.zeros((2, 3)),
            {},
            r"model 'ints', which takes \(batch, 3\) int32",
        ),
        (None, None, {"view": "sequence"}, r"view='sequence' for model 'three'.*Expected a view that fits.*'vector'"),
        (None, None, {"view": "plan"}, r"view='plan'. Expected None .* or one of 'vector', 'plane'"),
        ("lstm", None, {"training": True}, r"training=True with view='sequence'"),
        ("lstm", None, {"steps": 1}, r"steps=1. Expected an int from 2 to 512"),
        ("lstm", None, {"baseline": "blur"}, r"baseline=... for the 'sequence' view. Expected baseline only"),
        (None, None, {"labels": ["a", "b", "c"]}, r"labels=... for the 'vector' view"),
        (None, None, {"view": "plane", "steps": 8}, r"steps=... for the 'plane' view.*'sequence' and 'image' views"),
        (None, None, {"view": "plane", "y": np.zeros(16)}, r"y=... with view='plane'"),
        ("lstm", None, {"labels": ["a"]}, r"labels=\['a'\]. Expected one string per position \(6\)"),
        ("lstm", np.zeros((2, 5, 4)), {}, r"x of shape \(2, 5, 4\) and dtype float64 for model 'lstm'"),
        ("lstm", "abc", {}, r"x='abc' for model 'lstm'"),
    ],
)
def test_inputs_no_view_serves_get_a_clear_message(three_features, lstm, model, x, kwargs, message):
    fixtures = {None: three_features, "lstm": lstm}
    if model in fixtures:
        model, default_x = fixtures[model]
        x = default_x if x is None else x
    before = fingerprint(model)
    with pytest.raises(gm.GradmagicError, match=message) as raised:
        gm.explore(model, x, **kwargs)
    assert "Expected" in str(raised.value) and "Fix" in str(raised.value)
    assert_unchanged(model, before)


def test_one_feature_has_no_plane():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    with pytest.raises(InputError, match="Expected two features or more"):
        gm.explore(model, np.zeros((4, 1)), view="plane")


def test_magic_picks_the_view(three_features, lstm):
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "gradmagic")
    shell.user_ns.update(model=three_features[0], x=three_features[1], rnn=lstm[0], seqs=lstm[1], two=_two_inputs())
    assert isinstance(shell.run_line_magic("gradients_explore", "model x --view plane"), PlaneExplorer)
    assert isinstance(shell.run_line_magic("gradients_explore", "rnn seqs"), SequenceExplorer)
    with pytest.raises(UsageError, match=r"model 'two', which takes .*Expected a model whose single input is"):
        shell.run_line_magic("gradients_explore", "two x")
