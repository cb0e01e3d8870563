"""The explorer's plane and sequence views and the choice of view, driven by setting control values."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_unchanged, fingerprint, token_model

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
    return token_model()


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


def test_the_plane_is_the_slice_through_the_point_after_the_axes_change(three_features):
    model, x = three_features
    panel = gm.explore(model, x, view="plane", use_ipympl=False)
    panel.x_slider.value = 1.5  # feature 0 moves away from sample 0's value
    panel.x_select.value = 2  # then leaves the axes: the plane must hold it at 1.5, where the point is
    grid, point = panel.view.grid, panel.view.point
    assert point[0] == pytest.approx(1.5)
    gx, gy = np.meshgrid(grid.xs, grid.ys)
    points = np.repeat(point[None], gx.size, axis=0)
    points[:, 2], points[:, 1] = gx.ravel(), gy.ravel()
    np.testing.assert_allclose(grid.values.ravel(), _unit(model, points, 0), rtol=1e-5, atol=1e-6)
    # A move along an axis keeps the slice (no new grid); the point's value is the plane's there.
    panel.set_point(float(grid.xs[3]), float(grid.ys[4]))
    assert panel.view.grid is grid
    assert panel.view.value == pytest.approx(float(grid.values[4, 3]), rel=1e-5, abs=1e-6)


def test_each_pixel_of_the_plane_is_centred_on_its_grid_point(three_features):
    model, x = three_features
    panel = gm.explore(model, x, view="plane", use_ipympl=False)
    grid, image = panel.view.grid, panel.figure.image
    left, right, bottom, top = image.get_extent()
    rows, columns = grid.values.shape
    # The pixel imshow paints at a data coordinate: its column and row within the extent.
    column = np.floor((grid.xs - left) / (right - left) * columns).astype(int)
    row = np.floor((grid.ys - bottom) / (top - bottom) * rows).astype(int)
    np.testing.assert_array_equal(column, np.arange(columns))
    np.testing.assert_array_equal(row, np.arange(rows))
    # ... half a pixel from its edges, so the contour lines (drawn at the grid points) meet the colours.
    assert grid.xs[0] - left == pytest.approx((right - left) / columns / 2, rel=1e-5)


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


def test_a_subclassed_model_asked_for_the_image_view_is_told_how_to_wrap_it():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(2, 3)
            self.head = keras.layers.Dense(2)

        def call(self, x):
            return self.head(keras.ops.mean(self.conv(x), axis=(1, 2)))

    keras.utils.set_random_seed(3)
    net = Net()
    images = np.random.default_rng(4).uniform(size=(2, 6, 6, 1)).astype("float32")
    with pytest.raises(InputError, match=r"declares no input.*Fix: wrap the model, e\.g\. inputs = keras\.Input\(\(H"):
        gm.explore(net, images, view="image", use_ipympl=False)
    inputs = keras.Input((6, 6, 1))  # the fix, as the message gives it
    panel = gm.explore(keras.Model(inputs, net(inputs)), images, view="image", steps=4, use_ipympl=False)
    assert panel.view.path.x.shape == (6, 6, 1) and panel.error.value == ""


def test_a_bad_path_length_for_a_sequence_speaks_of_the_sequence_path(lstm):
    model, x = lstm
    with pytest.raises(gm.GradmagicError, match=r"steps=1\. .*from zeros .* to the sample") as raised:
        gm.explore(model, x, steps=1, use_ipympl=False)
    assert "image" not in str(raised.value)


def test_a_plane_partly_nan_keeps_its_colour_scale_and_arrows():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: keras.ops.sqrt(t[:, :1]) + t[:, 1:])(inputs))
    x = np.array([[0.01, 0.0], [2.0, 1.0]], "float32")  # the padded range reaches x0 < 0, where sqrt is NaN
    panel = gm.explore(model, x, view="plane", use_ipympl=False)
    grid = panel.view.grid
    bad = ~np.isfinite(grid.values)
    assert bad.any() and not bad.all()
    # Independent truth: the function itself, sqrt(x0) + x1, on the finite part of the grid.
    gx, gy = np.meshgrid(grid.xs.astype(np.float64), grid.ys.astype(np.float64))
    ok = gx > 0
    truth = np.sqrt(gx[ok]) + gy[ok]
    assert panel.figure.image.get_clim() == pytest.approx((truth.min(), truth.max()), rel=1e-5)
    assert np.isfinite(panel.figure.scale) and panel.figure.scale > 0
    assert np.all(np.isfinite(panel.figure.arrows.U.reshape(gx.shape)[ok]))
    assert f"{int(bad.sum())} of {bad.size} grid points give NaN or Inf" in panel.readout.value


def test_token_ids_with_the_embedding_hidden_in_a_custom_layer_get_a_message_that_says_so():
    class TokenAndPosition(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.tokens = keras.layers.Embedding(20, 4)
            self.positions = keras.layers.Embedding(6, 4)

        def call(self, ids):
            return self.tokens(ids) + self.positions(keras.ops.arange(keras.ops.shape(ids)[-1]))

    ids = keras.Input((6,), dtype="int32")
    hidden = keras.layers.GlobalAveragePooling1D()(TokenAndPosition()(ids))
    model = keras.Model(ids, keras.layers.Dense(2)(hidden), name="hidden_embedding")
    with pytest.raises(InputError, match=r"token ids\?\) but has no keras\.layers\.Embedding among model\.layers"):
        gm.explore(model, np.array([[1, 2, 3, 4, 5, 6]]), use_ipympl=False)


def test_a_sequence_path_with_a_nan_gradient_is_noted_not_a_traceback():
    inputs = keras.Input((4, 3))
    rooted = keras.layers.Lambda(lambda t: keras.ops.sqrt(keras.ops.abs(t)))(inputs)  # NaN gradient at 0
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(rooted)))
    x = np.random.default_rng(0).uniform(0.1, 1.0, size=(2, 4, 3)).astype("float32")
    panel = gm.explore(model, x, steps=5, use_ipympl=False)
    panel.alpha_slider.value = 0.0  # the point where the gradient is not finite
    assert panel.error.value == ""
    assert "NaN or Inf at 1 of 5 points on the path" in panel.readout.value
    assert np.isfinite(panel.figure.ax_norm.get_ylim()).all()
