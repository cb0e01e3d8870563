"""Grad-CAM against the paper's formula computed by hand from a tape; all three maps on a real architecture."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_unchanged, fingerprint

import gradmagic as gm
from gradmagic.core.questions import compute
from gradmagic.errors import GradmagicWarning


def conv_net() -> keras.Model:
    inp = keras.Input((8, 8, 2))
    c1 = keras.layers.Conv2D(3, 3, activation="relu", name="c1")(inp)
    c2 = keras.layers.Conv2D(4, 3, activation="tanh", name="c2")(c1)
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(c2))
    return keras.Model(inp, out)


def tape_gradcam(model: keras.Model, layer: str, x: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Selvaraju et al.'s formula by hand: weights = spatial mean of dy_k/dA, map = ReLU(sum_c w_c A_c)."""
    probe = keras.Model(model.input, [model.get_layer(layer).output, model.output])
    with tf.GradientTape() as tape:
        activations, y = probe(x)
        target = tf.gather(y, units, axis=1, batch_dims=1)
    grads = tape.gradient(target, activations).numpy()
    weights = grads.mean(axis=tuple(range(1, grads.ndim - 1)))
    lifted = weights.reshape(weights.shape[0], *([1] * (grads.ndim - 2)), weights.shape[1])
    return np.maximum((activations.numpy() * lifted).sum(axis=-1), 0)


def test_gradcam_matches_the_formula_on_a_hand_written_tape():
    model = conv_net()
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 2)).astype("float32")
    for layer in ("c1", "c2"):
        for output in (0, 2):
            g = gm.gradcam(model, x, layer, output=output)
            want = tape_gradcam(model, layer, x, np.full(3, output))
            # Compiled graph vs eager tape: float32 rounding.
            np.testing.assert_allclose(g.array, want, rtol=1e-4, atol=1e-6)
            assert g.layer_name == layer and g.output.tolist() == [output] * 3
    g = gm.gradcam(model, x, 2)  # by index: model.layers[2] is 'c2' (the InputLayer is 0)
    predicted = np.argmax(model(x).numpy(), axis=1)
    assert g.layer_name == "c2" and g.output.tolist() == predicted.tolist()
    np.testing.assert_allclose(g.array, tape_gradcam(model, "c2", x, predicted), rtol=1e-4, atol=1e-6)
    assert g.array.shape == (3, 4, 4) and g.weights.shape == (3, 4)


def test_array_at_input_is_a_bilinear_resize_to_the_image():
    model = conv_net()
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 2)).astype("float32")
    g = gm.gradcam(model, x, "c2")
    want = tf.image.resize(g.array[..., None], (8, 8), method="bilinear").numpy()[..., 0]
    np.testing.assert_allclose(g.array_at_input, want, rtol=1e-6)
    assert g.upsampled((16, 12)).shape == (2, 16, 12)


def test_gradcam_of_a_1d_convolution_is_a_map_over_steps():
    inp = keras.Input((10, 3))
    conv = keras.layers.Conv1D(5, 3, activation="relu", name="conv")(inp)
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalMaxPooling1D()(conv)))
    x = np.random.default_rng(2).normal(size=(2, 10, 3)).astype("float32")
    g = gm.gradcam(model, x, "conv", output=1)
    np.testing.assert_allclose(g.array, tape_gradcam(model, "conv", x, np.array([1, 1])), rtol=1e-4, atol=1e-6)
    assert g.array.shape == (2, 8) and g.array_at_input.shape == (2, 10)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(3, 3, activation="relu")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(2)

    def call(self, x):
        return self.head(self.pool(self.conv(x)))


def test_gradcam_on_a_subclassed_model_finds_the_rank_when_it_runs():
    model = Subclassed()
    x = np.random.default_rng(3).normal(size=(2, 6, 6, 1)).astype("float32")
    model(x)
    g = gm.gradcam(model, x, 0, output=1)
    with tf.GradientTape() as tape:
        a = model.conv(x)
        y = model.head(model.pool(a))[:, 1]
    grads = tape.gradient(y, a).numpy()
    want = np.maximum((a.numpy() * grads.mean(axis=(1, 2))[:, None, None, :]).sum(-1), 0)
    np.testing.assert_allclose(g.array, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(gm.GradmagicError, match=r"rank 2.*spatial output"):
        gm.gradcam(model, x, 2)


def test_gradcam_reuses_one_trace_per_layer():
    model = conv_net()
    rng = np.random.default_rng(4)
    for batch in (1, 3, 2):
        gm.gradcam(model, rng.normal(size=(batch, 8, 8, 2)).astype("float32"), "c2")
    ((fn, _),) = [q for k, q in compute._cache[model].items() if k[0] == "gradcam"]
    assert fn.fn.experimental_get_tracing_count() == 1
    g = gm.gradcam(model, rng.normal(size=(2, 8, 8, 2)).astype("float32"), "c2")
    assert {len(v) for v in g.to_dict().values()} == {2} and "<table" in g._repr_html_()


def test_mobilenetv2_runs_all_three_and_stays_bit_identical():
    # Logits: untrained, the network's outputs are ~1e-11 apart, which a softmax rounds to exactly 0.1 each.
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10, classifier_activation=None
    )
    x = np.random.default_rng(5).uniform(-1, 1, size=(2, 32, 32, 3)).astype("float32")
    before = fingerprint(model)
    a = gm.integrated_gradients(model, x, steps=64, baseline="blur")
    s = gm.saliency(model, x, smooth=0.1, samples=8)
    g = gm.gradcam(model, x, "block_6_expand_relu")
    assert_unchanged(model, before)
    assert a.array.shape == s.array.shape == x.shape and g.array.shape == (2, 4, 4)
    predicted = np.argmax(model(x).numpy(), axis=1)
    assert a.output.tolist() == s.output.tolist() == predicted.tolist()
    assert np.all(np.isfinite(a.array)) and np.all(np.isfinite(s.array))
    # The path integral on a ReLU6 net with 64 trapezoid steps closes f(x) - f(baseline) to within 5%.
    assert a.complete, a.relative_gap
    ends = model(np.concatenate([x, a.baseline])).numpy()[:, predicted]
    change = np.diag(ends[:2]) - np.diag(ends[2:])
    # The gap is measured against an eager f(x) - f(baseline): float32 rounding of a ~1e-11 difference.
    np.testing.assert_allclose(a.completeness_gap, a.attribution_sum - change, rtol=1e-3, atol=1e-3 * abs(change).max())
    plain = gm.saliency(model, x)
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        y = tf.gather(model(xt), predicted, axis=1, batch_dims=1)
    # Compiled graph vs eager tape through 50 layers: float32 rounding.
    np.testing.assert_allclose(plain.array, tape.gradient(y, xt).numpy(), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(g.array, tape_gradcam(model, "block_6_expand_relu", x, predicted), rtol=1e-3, atol=1e-6)
    assert g.array_at_input.shape == (2, 32, 32)


def test_gradcam_at_a_nested_base_model_as_in_transfer_learning():
    base = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(3, 3, activation="relu")], name="base")
    pool, head = keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)
    model = keras.Sequential([keras.Input((8, 8, 2)), base, pool, head])
    x = np.random.default_rng(6).normal(size=(2, 8, 8, 2)).astype("float32")
    g = gm.gradcam(model, x, "base", output=1)
    with tf.GradientTape() as tape:
        a = base(x)
        y = head(pool(a))[:, 1]
    grads = tape.gradient(y, a).numpy()
    want = np.maximum((a.numpy() * grads.mean(axis=(1, 2))[:, None, None, :]).sum(-1), 0)
    # Compiled graph vs eager tape: float32 rounding.
    np.testing.assert_allclose(g.array, want, rtol=1e-4, atol=1e-6)


def test_a_layer_with_no_gradient_path_to_the_output_is_named_in_a_warning():
    inp = keras.Input((6, 6, 1))
    conv = keras.layers.Conv2D(2, 3, name="conv")(inp)
    rounded = keras.layers.Lambda(lambda t: keras.ops.round(t))(conv)  # TensorFlow has no gradient for round
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(rounded)))
    x = np.random.default_rng(7).normal(size=(2, 6, 6, 1)).astype("float32")
    with tf.GradientTape() as tape:
        a = model.get_layer("conv")(x)
        y = model.layers[-1](model.layers[-2](model.layers[-3](a)))[:, 0]
    assert tape.gradient(y, a) is None  # disconnected, by a hand-written tape
    with pytest.warns(GradmagicWarning, match=r"no gradient path from layer 'conv'"):
        g = gm.gradcam(model, x, "conv", output=0)
    np.testing.assert_array_equal(g.array, 0.0)
    assert any("no gradient path" in n for n in g.notes)


@pytest.mark.parametrize("shape", [(0, 5), (-1, 4), "ab", 7, (5,), (5, 5, 5), (2.5, 3)])
def test_a_bad_size_to_resize_to_is_refused_in_the_house_form(shape):
    model = conv_net()
    g = gm.gradcam(model, np.random.default_rng(8).normal(size=(1, 8, 8, 2)).astype("float32"), "c2")
    with pytest.raises(gm.GradmagicError, match=r"Received: shape=.*Expected 2 positive int"):
        g.upsampled(shape)
