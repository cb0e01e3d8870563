"""Bad arguments to the attribution functions: one clear GradmagicError, before anything runs, model unchanged."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import assert_unchanged, fingerprint, mlp

import gradmagic as gm
from gradmagic.errors import GradmagicError, InputError, LayerError

X = np.random.default_rng(0).normal(size=(2, 3)).astype("float32")


def conv_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(2, 3, name="conv"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(2, name="head"),
        ]
    )


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda m: gm.integrated_gradients(m, X, output=2), r"Received: output=2.*index in \[0, 1\]"),
        (lambda m: gm.integrated_gradients(m, X, output=-3), r"Received: output=-3"),
        (lambda m: gm.integrated_gradients(m, X, output="1"), r"Received: output='1'.*int index"),
        (lambda m: gm.saliency(m, X, output=5), r"Received: output=5"),
        (lambda m: gm.integrated_gradients(m, X, baseline=np.zeros(4)), r"shape \(4,\).*does not broadcast.*\(2, 3\)"),
        (lambda m: gm.integrated_gradients(m, X, baseline="black"), r"Received: baseline='black'.*'zeros', 'blur'"),
        (lambda m: gm.integrated_gradients(m, X, baseline="blur"), r"baseline='blur'.*\(batch, height, width"),
        (lambda m: gm.integrated_gradients(m, X, baseline=object()), r"baseline of type object"),
        (lambda m: gm.integrated_gradients(m, X, steps=0), r"Received: steps=0.*int >= 2"),
        (lambda m: gm.integrated_gradients(m, X, steps=1), r"Received: steps=1.*int >= 2.*'trapezoid'"),
        (lambda m: gm.integrated_gradients(m, X, steps=0, method="midpoint"), r"steps=0.*int >= 1"),
        (lambda m: gm.integrated_gradients(m, X, steps=2.5), r"Received: steps=2.5"),
        (lambda m: gm.integrated_gradients(m, X, method="simpson"), r"Received: method='simpson'"),
        (lambda m: gm.integrated_gradients(m, X, baseline="uniform", seed=-1), r"Received: seed=-1"),
        (lambda m: gm.integrated_gradients(m, X, batch_size=0), r"Received: batch_size=0"),
        (lambda m: gm.saliency(m, X, smooth=-0.1), r"Received: smooth=-0.1.*>= 0"),
        (lambda m: gm.saliency(m, X, smooth=float("nan")), r"Received: smooth=nan"),
        (lambda m: gm.saliency(m, X, smooth=0.1, samples=0), r"Received: samples=0"),
        (lambda m: gm.saliency(m, X, smooth=float("inf")), r"Received: smooth=inf.*finite"),
        (lambda m: gm.integrated_gradients(m, X, seed="a"), r"Received: seed='a'"),
        (lambda m: gm.integrated_gradients(m, np.zeros((2, 5), "float32")), r"shape \(2, 5\).*expects \(batch, 3\)"),
    ],
)
def test_bad_arguments_are_refused_in_the_house_form(call, pattern):
    model = mlp((3, 4, 2))
    before = fingerprint(model)
    with pytest.raises(InputError, match=pattern):
        call(model)
    assert_unchanged(model, before)


def test_several_outputs_need_an_explicit_unit():
    inp = keras.Input((3,))
    model = keras.Model(inp, [keras.layers.Dense(2)(inp), keras.layers.Dense(1)(inp)])
    with pytest.raises(InputError, match=r"output=None.*2 outputs.*Fix: pass output=k"):
        gm.integrated_gradients(model, X)
    # Unit 2 is the second output's only unit: f = x @ w2 + b2, so IG is w2 * x.
    a = gm.integrated_gradients(model, X, output=2, steps=3)
    w = model.layers[2].get_weights()[0][:, 0]
    np.testing.assert_allclose(a.array, X * w, rtol=1e-5, atol=1e-6)


def test_several_inputs_are_refused():
    a, b = keras.Input((3,)), keras.Input((2,))
    model = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    with pytest.raises(InputError, match=r"2 inputs.*single input"):
        gm.saliency(model, [X, X[:, :2]])


def test_gradcam_refuses_layers_without_a_feature_map():
    model = conv_model()
    x = np.ones((1, 6, 6, 1), "float32")
    before = fingerprint(model)
    with pytest.raises(InputError, match=r"layer=2 'head'.*rank 2.*spatial output"):
        gm.gradcam(model, x, "head")
    with pytest.raises(LayerError, match=r"Received: layer='cnov'.*Did you mean 'conv'"):
        gm.gradcam(model, x, "cnov")
    with pytest.raises(LayerError, match=r"Received: layer=7"):
        gm.gradcam(model, x, 7)
    with pytest.raises(InputError, match=r"Received: output=4"):
        gm.gradcam(model, x, "conv", output=4)
    assert_unchanged(model, before)


def test_token_inputs_have_no_input_gradient_but_a_grad_cam():
    tokens = keras.Input((6,), dtype="int32")
    embedded = keras.layers.Embedding(10, 4, name="embed")(tokens)
    model = keras.Model(tokens, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(embedded)))
    ids = np.array([[1, 2, 3, 4, 5, 6], [9, 8, 7, 0, 0, 0]], "int32")
    with pytest.raises(InputError, match=r"dtype int32.*float inputs.*gradcam"):
        gm.saliency(model, ids)
    with pytest.raises(InputError, match=r"dtype int32.*float inputs"):
        gm.integrated_gradients(model, ids)
    g = gm.gradcam(model, ids, "embed")  # a map over the 6 positions
    assert g.array.shape == (2, 6) and g.array_at_input.shape == (2, 6)


def test_not_a_model_is_refused():
    with pytest.raises(GradmagicError, match="Expected a Keras 3 model"):
        gm.saliency("model", X)


def test_a_nan_attribution_is_named_as_such_not_as_an_unchanged_output():
    from gradmagic.errors import GradmagicWarning

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: keras.ops.sum(keras.ops.sqrt(t), axis=1))(inputs))
    x = np.array([[1.0, 4.0, 9.0]], "float32")  # f(x) - f(0) = 6; the slope of sqrt is infinite at the baseline
    with pytest.warns(GradmagicWarning, match=r"not finite .*NaN or Inf somewhere on the path") as caught:
        result = gm.integrated_gradients(model, x, output=0, steps=8)
    assert not np.isfinite(result.completeness_gap[0])
    assert not any("barely changes" in str(w.message) for w in caught)
