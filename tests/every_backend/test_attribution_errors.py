"""Attribution's bad input gets the same one-paragraph GradmagicError on every backend; the model stays as it was.

Plus the shapes of model the checks depend on (subclassed, nested, masked, token
inputs), each against a truth written out here.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import gradmagic as gm
from gradmagic.errors import GradmagicError, InputError, LayerError

from .backend_truths import fingerprint, no_grad_left

X = np.random.default_rng(0).normal(size=(2, 3)).astype("float32")
IMAGES = np.random.default_rng(1).normal(size=(2, 6, 6, 1)).astype("float32")
IDS = np.array([[1, 2, 3, 4, 5], [9, 8, 7, 0, 0]], "int32")


def _mlp() -> keras.Model:
    keras.utils.set_random_seed(2)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])


def _conv() -> keras.Model:
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(2, 3, name="conv"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(2, name="head"),
        ]
    )


def _tokens() -> keras.Model:
    keras.utils.set_random_seed(4)
    return keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(10, 4, name="embed"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )


CASES = [
    (_mlp, lambda m: gm.integrated_gradients(m, X, output=2), InputError, r"Received: output=2.*index in \[0, 1\]"),
    (_mlp, lambda m: gm.saliency(m, X, output=5), InputError, r"Received: output=5"),
    (_mlp, lambda m: gm.integrated_gradients(m, X, baseline=np.zeros(4)), InputError, r"does not broadcast"),
    (_mlp, lambda m: gm.integrated_gradients(m, X, baseline="blur"), InputError, r"baseline='blur'.*\(batch, height"),
    (_mlp, lambda m: gm.integrated_gradients(m, X, steps=1), InputError, r"Received: steps=1.*int >= 2"),
    (_mlp, lambda m: gm.saliency(m, X, smooth=-0.1), InputError, r"Received: smooth=-0.1"),
    (_mlp, lambda m: gm.integrated_gradients(m, np.zeros((2, 5), "float32")), InputError, r"shape \(2, 5\)"),
    (_conv, lambda m: gm.gradcam(m, IMAGES, "head"), InputError, r"layer=2 'head'.*rank 2.*spatial output"),
    (_conv, lambda m: gm.gradcam(m, IMAGES, "cnov"), LayerError, r"Received: layer='cnov'.*Did you mean 'conv'"),
    (_conv, lambda m: gm.gradcam(m, IMAGES, 7), LayerError, r"Received: layer=7"),
    (_conv, lambda m: gm.gradcam(m, IMAGES, "conv", output=4), InputError, r"Received: output=4"),
    (_mlp, lambda m: gm.token_gradients(m, X), InputError, r"no keras.layers.Embedding"),
    (_tokens, lambda m: gm.token_gradients(m, IDS, output=2), InputError, r"Received: output=2"),
    (_tokens, lambda m: gm.token_gradients(m, IDS + 5), InputError, r"not token ids of 'embed'.*from 0 to 9"),
    (_tokens, lambda m: gm.token_integrated_gradients(m, IDS, steps=1), InputError, r"Received: steps=1"),
    (_tokens, lambda m: gm.saliency(m, IDS), InputError, r"dtype int32.*float inputs.*gradcam"),
]


@pytest.mark.parametrize(("make", "call", "error", "pattern"), CASES)
def test_bad_input_gets_the_house_error_and_leaves_the_model_unchanged(make, call, error, pattern):
    model = make()
    model(np.zeros((1, *model.inputs[0].shape[1:]), model.inputs[0].dtype))  # built, so that a change would show
    before = fingerprint(model)
    with pytest.raises(error, match=pattern) as info:
        call(model)
    assert fingerprint(model) == before and no_grad_left(model)
    assert "\n" not in str(info.value) and ("Fix" in str(info.value) or "Expected" in str(info.value))


def test_several_inputs_are_refused():
    a, b = keras.Input((3,)), keras.Input((2,))
    model = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    with pytest.raises(InputError, match=r"2 inputs.*single input"):
        gm.saliency(model, [X, X[:, :2]])


def test_not_a_model_is_refused():
    with pytest.raises(GradmagicError, match="Expected a Keras 3 model"):
        gm.integrated_gradients("model", X)


class SubclassedCNN(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.conv = keras.layers.Conv2D(3, 3)
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(2)

    def call(self, x, training=None):
        return self.head(self.pool(self.conv(x)))


def _gradcam_truth(activations: np.ndarray, dense: np.ndarray, unit: int) -> np.ndarray:
    """ReLU(sum_c w_c A_c) where, through global average pooling, w_c = dense[c, unit] / (places)."""
    weights = dense[:, unit] / np.prod(activations.shape[1:3])
    return np.maximum(activations.astype(np.float64) @ weights, 0.0)


def test_gradcam_on_a_subclassed_model_finds_the_rank_when_it_runs():
    keras.utils.set_random_seed(5)
    model = SubclassedCNN()
    model(IMAGES)
    g = gm.gradcam(model, IMAGES, 0, output=1)
    activations = keras.ops.convert_to_numpy(model.conv(IMAGES))
    dense = model.head.get_weights()[0].astype(np.float64)
    np.testing.assert_allclose(g.array, _gradcam_truth(activations, dense, 1), rtol=1e-4, atol=1e-6)
    with pytest.raises(GradmagicError, match=r"rank 2.*spatial output"):
        gm.gradcam(model, IMAGES, 2)


def test_gradcam_at_a_nested_base_model_as_in_transfer_learning():
    keras.utils.set_random_seed(6)
    base = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(3, 3, activation="relu")], name="base")
    head = keras.layers.Dense(2)
    model = keras.Sequential([keras.Input((6, 6, 1)), base, keras.layers.GlobalAveragePooling2D(), head])
    g = gm.gradcam(model, IMAGES, "base", output=0)
    activations = keras.ops.convert_to_numpy(base(IMAGES))
    dense = head.get_weights()[0].astype(np.float64)
    np.testing.assert_allclose(g.array, _gradcam_truth(activations, dense, 0), rtol=1e-4, atol=1e-6)


def test_gradcam_over_token_positions_and_a_masked_embedding():
    keras.utils.set_random_seed(7)
    ids = keras.Input((5,), dtype="int32")
    embedded = keras.layers.Embedding(10, 4, name="embed")(ids)
    model = keras.Model(ids, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(embedded)))
    g = gm.gradcam(model, IDS, "embed", output=1)  # a map over the 5 positions
    vectors = keras.ops.convert_to_numpy(model.get_layer("embed")(IDS))
    # Through the average over 5 positions, each channel's weight is the head's weight over 5.
    expected = np.maximum(vectors.astype(np.float64) @ (model.layers[-1].get_weights()[0][:, 1] / 5), 0)
    np.testing.assert_allclose(g.array, expected, rtol=1e-4, atol=1e-6)
    # A masked Embedding: the padding (id 0) gets no gradient, the mask still reaches the LSTM.
    masked = keras.Sequential(
        [keras.Input((5,), dtype="int32"), keras.layers.Embedding(10, 4, mask_zero=True), keras.layers.LSTM(3),
         keras.layers.Dense(1)]
    )  # fmt: skip
    t = gm.token_gradients(masked, IDS)
    assert np.all(t.array[1, 3:] == 0) and np.any(t.array[1, :3] != 0)


@pytest.mark.parametrize("function", ["integrated_gradients", "saliency", "gradcam", "token_gradients"])
def test_a_tensor_of_another_framework_is_refused_by_name(backend, function):
    if backend == "jax":
        tensor, framework = pytest.importorskip("torch").ones((2, 6, 6, 1)), "PyTorch"
    else:
        tensor, framework = pytest.importorskip("jax.numpy").ones((2, 6, 6, 1)), "JAX"
    model = _tokens() if function == "token_gradients" else _conv()
    call = {
        "integrated_gradients": lambda: gm.integrated_gradients(model, tensor),
        "saliency": lambda: gm.saliency(model, tensor),
        "gradcam": lambda: gm.gradcam(model, tensor, "conv"),
        "token_gradients": lambda: gm.token_gradients(model, tensor),
    }[function]
    with pytest.raises(InputError, match=f"{framework} tensor") as info:
        call()
    assert repr(backend) in str(info.value) and no_grad_left(model)


def test_the_backends_own_tensors_are_taken():
    model = _conv()
    images = keras.ops.convert_to_tensor(IMAGES)  # a tf.Tensor, a JAX array or a torch.Tensor
    # The same question on the same numbers; on PyTorch the first call runs eagerly and the second its traced
    # graph (the same operations): equal up to float32 round-off.
    same = {"rtol": 1e-6, "atol": 1e-7}
    np.testing.assert_allclose(gm.saliency(model, images).array, gm.saliency(model, IMAGES).array, **same)
    np.testing.assert_allclose(gm.gradcam(model, images, "conv").array, gm.gradcam(model, IMAGES, "conv").array, **same)
    ids = keras.ops.convert_to_tensor(IDS)
    np.testing.assert_allclose(
        gm.token_gradients(_tokens(), ids).array, gm.token_gradients(_tokens(), IDS).array, **same
    )


class WithSpareLayer(SubclassedCNN):
    def __init__(self) -> None:
        super().__init__()
        self.spare = keras.layers.Conv2D(2, 3)  # built but never called by call()
        self.spare.build((None, 6, 6, 1))


def test_gradcam_at_a_layer_the_forward_pass_never_calls_is_refused():
    model = WithSpareLayer()
    model(IMAGES)
    index = model.layers.index(model.spare)
    before = fingerprint(model)
    with pytest.raises(InputError, match=rf"layer={index} .*did not call when it ran on x"):
        gm.gradcam(model, IMAGES, index)
    assert fingerprint(model) == before and no_grad_left(model)
    assert gm.gradcam(model, IMAGES, 0).array.shape == (2, 4, 4)  # the layers it calls still work
