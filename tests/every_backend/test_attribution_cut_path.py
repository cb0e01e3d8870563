"""A cut gradient path gets the same warning on every backend; a gradient that is genuinely zero gets none.

TensorFlow's tape gives ``None`` where no gradient path joins x (or a layer's
output) to the output unit: through ``stop_gradient``, integer values (a cast
to int, argmax) and round, floor and ceil. JAX passes back zeros there and
PyTorch zeros through round: the attribution functions tell a cut path from a
zero gradient by reading the framework's own graph, so every backend warns
with the same words. A dead ReLU or a zero weight gives a map that is exactly
zero too, with no warning: the truth there is the analytic gradient, 0.
"""

from __future__ import annotations

import re
import warnings

import keras
import numpy as np
import pytest

import gradmagic as gm
from gradmagic.errors import GradmagicWarning

from .backend_truths import fingerprint, no_grad_left

IMAGES = np.random.default_rng(1).normal(size=(2, 6, 6, 1)).astype("float32")
IDS = np.array([[1, 2, 3, 4, 5], [9, 8, 7, 0, 0]], "int32")
FRAMEWORK = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}

CUTS = {
    "stop_gradient": lambda t: keras.ops.stop_gradient(t),
    "integer cast": lambda t: keras.ops.cast(keras.ops.cast(t * 10, "int32"), "float32"),
    "round": lambda t: keras.ops.round(t * 10),
}


def _conv_then(fn: object) -> keras.Model:
    """Conv2D 'conv' -> Lambda(fn) -> Flatten -> Dense(2): the output moves with x, through the conv."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((6, 6, 1))
    conv = keras.layers.Conv2D(2, 3, name="conv")(inp)
    cut = keras.layers.Lambda(fn, name="between")(conv)
    return keras.Model(inp, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(cut)))


def _tokens_then(fn: object) -> keras.Model:
    keras.utils.set_random_seed(4)
    return keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(10, 4, name="embed"),
            keras.layers.Lambda(fn, name="between"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )


def _one_warning(call: object) -> tuple[object, str]:
    """The result of ``call()`` and the text of the one GradmagicWarning it gave, pointing at this file."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    found = [w for w in caught if issubclass(w.category, GradmagicWarning)]
    assert len(found) == 1, [str(w.message) for w in caught]
    assert found[0].filename == __file__  # the warning names the caller's line
    return result, str(found[0].message)


def _no_cut_warning(call: object) -> object:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    assert not [str(w.message) for w in caught if "no gradient path" in str(w.message)]
    return result


def _cut_message(kind: str, source: str, framework: str, ending: str) -> str:
    return (
        f"{kind}: the output has no gradient path from {source} ({framework} has no gradient for some op between "
        f"them, e.g. round, argmax{ending}"
    )


@pytest.mark.parametrize("cut", CUTS)
def test_a_cut_path_from_x_gives_zero_maps_and_the_same_warning_on_every_backend(cut, backend):
    model = _conv_then(CUTS[cut])
    before = fingerprint(model)
    framework = FRAMEWORK[backend]
    start = _cut_message("{kind}", "x", framework, ", a cast to int, or float token ids into an Embedding), so the map")
    calls = {
        "Integrated gradients": lambda: gm.integrated_gradients(model, IMAGES, output=0, steps=4),
        "Saliency": lambda: gm.saliency(model, IMAGES, output=0),
        "SmoothGrad (3 noisy copies, noise 0.1 of the range)": lambda: gm.saliency(
            model, IMAGES, output=0, smooth=0.1, samples=3
        ),
    }
    results = {}
    for kind, call in calls.items():
        results[kind], message = _one_warning(call)
        assert message.startswith(start.format(kind=kind)), message
        assert message == results[kind].notes[-1] + "."  # the result keeps what the warning said
        assert results[kind].array.shape == IMAGES.shape and not np.any(results[kind].array)
    # Not a constant model: the output moves with x (through the conv, forward only).
    ig = results["Integrated gradients"]
    assert np.all(np.abs(ig.value_at_x - ig.value_at_baseline) > 1e-3)

    g, message = _one_warning(lambda: gm.gradcam(model, IMAGES, "conv", output=0))
    expected = _cut_message("Grad-CAM", "layer 'conv'", framework, " or a cast to int), so every channel weight")
    assert message.startswith(expected), message
    assert g.array.shape == (2, 4, 4) and not np.any(g.array) and not np.any(g.weights)
    assert fingerprint(model) == before and no_grad_left(model)


@pytest.mark.parametrize("cut", ["stop_gradient", "integer cast"])
def test_a_cut_path_from_the_embedding_gives_zero_gradients_and_the_same_warning(cut, backend):
    model = _tokens_then(CUTS[cut])
    before = fingerprint(model)
    source, tail = "the output of Embedding 'embed'", " or a cast to int), so every gradient is 0"
    t, message = _one_warning(lambda: gm.token_gradients(model, IDS, output=1))
    assert message.startswith(_cut_message("Token gradients", source, FRAMEWORK[backend], tail))
    assert message == t.notes[-1] + "." and t.array.shape == (2, 5, 4) and not np.any(t.array)
    a, message = _one_warning(lambda: gm.token_integrated_gradients(model, IDS, output=1, steps=4))
    assert message.startswith(_cut_message("Integrated gradients", source, FRAMEWORK[backend], tail))
    assert message == a.notes[-1] + "." and not np.any(a.array)
    assert fingerprint(model) == before and no_grad_left(model)


def _dead_relu() -> keras.Model:
    """Conv2D 'conv' -> ReLU(t - 1000) -> Dense: at these inputs every ReLU is off, so d output / d x is exactly 0."""
    return _conv_then(lambda t: keras.ops.relu(t - 1000.0))


def _zero_weight() -> keras.Model:
    """Conv2D 'conv' -> Flatten -> Dense with a zero kernel: the output is the bias, its gradient exactly 0."""
    model = _conv_then(lambda t: t)
    head = model.get_layer("head")
    head.set_weights([np.zeros_like(head.get_weights()[0]), np.array([0.5, -0.25], "float32")])
    return model


@pytest.mark.parametrize("make", [_dead_relu, _zero_weight])
def test_a_gradient_that_is_genuinely_zero_gives_the_zero_map_without_the_warning(make):
    model = make()
    # The truth, analytic: every path from x to the output is multiplied by 0 (a ReLU's slope off, or a zero
    # kernel), so each map is 0 exactly; autodiff multiplies by those exact zeros, so no tolerance is needed.
    assert not np.any(_no_cut_warning(lambda: gm.saliency(model, IMAGES, output=1)).array)
    assert not np.any(_no_cut_warning(lambda: gm.saliency(model, IMAGES, output=1, smooth=0.1, samples=3)).array)
    ig = _no_cut_warning(lambda: gm.integrated_gradients(model, IMAGES, output=1, steps=4))
    assert not np.any(ig.array)
    assert not any("no gradient path" in note for note in ig.notes)
    g = _no_cut_warning(lambda: gm.gradcam(model, IMAGES, "conv", output=1))
    assert not np.any(g.weights) and not np.any(g.array)
    assert not any("no gradient path" in note for note in g.notes)


def test_a_zero_weight_after_the_embedding_gives_zero_token_gradients_without_the_warning():
    model = _tokens_then(lambda t: t)
    head = model.layers[-1]
    head.set_weights([np.zeros_like(head.get_weights()[0]), head.get_weights()[1]])
    t = _no_cut_warning(lambda: gm.token_gradients(model, IDS, output=1))
    assert not np.any(t.array) and not t.notes  # the analytic gradient through a zero kernel: exactly 0


def test_one_cut_branch_beside_a_live_one_gives_the_live_branchs_gradient_without_the_warning():
    keras.utils.set_random_seed(5)
    inp = keras.Input((3,))
    live = keras.layers.Dense(1, name="live")(inp)
    rounded = keras.layers.Dense(1, name="rounded")(keras.layers.Lambda(lambda t: keras.ops.round(t * 10))(inp))
    model = keras.Model(inp, keras.layers.Add()([live, rounded]))
    x = np.random.default_rng(6).normal(size=(4, 3)).astype("float32")
    s = _no_cut_warning(lambda: gm.saliency(model, x))
    # The truth: only the live Dense carries a gradient, its kernel column for every sample.
    kernel = model.get_layer("live").get_weights()[0][:, 0]
    np.testing.assert_allclose(s.array, np.tile(kernel, (4, 1)), rtol=1e-6)  # one float32 product each
    assert not any(re.search("no gradient path", n) for n in s.notes)
