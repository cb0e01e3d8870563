"""The diagnosis on real architectures, built small: no false alarm on right gradients, wrong ones caught.

Each model is a ``keras.applications`` network (weights=None, 32 px, batch 2) or
a few blocks built the way those networks and the keras.io examples build them
(a residual ResNetV2 stack, a squeeze-excite MBConv, a ConvNeXt block with
layer scale and a grouped convolution, a Transformer block, masked RNNs). The
truth each test checks against is independent of gradmagic: a hand-written
``tf.GradientTape``, or a deliberately wrong ``tf.custom_gradient`` whose error
is known.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Opaque, assert_unchanged, fingerprint

import gradmagic as gm

RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(0.0, 1.0, (2, 32, 32, 3)).astype("float32")
MORE_IMAGES = RNG.uniform(0.0, 1.0, (32, 32, 32, 3)).astype("float32")  # to set BatchNormalization statistics
LABELS = np.array([1, 3])

# --- a layer with a hand-written gradient, right or wrong -----------------------------------------------------------


def _swish_grad(t: tf.Tensor, kind: str) -> tf.Tensor:
    """d(t * sigmoid(t))/dt, or one of the classic slips in writing it."""
    s = tf.sigmoid(t)
    true = s + t * s * (1.0 - s)
    return {"right": true, "factor": 3.0 * true, "sign": -true, "missing": t * s * (1.0 - s)}[kind]


@keras.saving.register_keras_serializable(package="gradmagic_tests")
class HandSwish(keras.layers.Layer):
    """``t * sigmoid(t)`` with a hand-written gradient: ``kind="right"``, or a wrong one.

    ``"stop"`` computes the same function with ``tf.stop_gradient`` on the
    sigmoid, which hides its part of the derivative from autodiff.
    """

    def __init__(self, kind: str = "right", **kwargs):
        super().__init__(**kwargs)
        self.kind = kind

    def call(self, t):
        if self.kind == "stop":
            return t * tf.stop_gradient(tf.sigmoid(t))

        @tf.custom_gradient
        def swish(u):
            return u * tf.sigmoid(u), lambda upstream: upstream * _swish_grad(u, self.kind)

        return swish(t)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind}


def _with_layer_after(model: keras.Model, name: str, kind: str) -> keras.Model:
    """The same architecture with a :class:`HandSwish` inserted right after layer ``name``."""

    def call(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        return HandSwish(kind, name="hand_swish")(out) if layer.name == name else out

    return keras.models.clone_model(model, call_function=call)


def _calibrated(model: keras.Model, x) -> keras.Model:
    """Set every BatchNormalization's moving statistics to those of x, as training leaves them.

    At random init the moving statistics (mean 0, variance 1) do not match the
    activations: MobileNetV2's shrink until every ReLU6 sits at exactly 0, where
    no derivative exists and a wrong gradient has nowhere to show.
    """
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0  # one training-mode pass writes the batch statistics
    model(x, training=True)
    for layer, momentum in zip(norms, momenta, strict=True):
        layer.momentum = momentum
    return model


def _tape_gradients(model, x, y, loss):
    with tf.GradientTape() as tape:
        value = loss(y, model(x, training=False))
    return [np.asarray(g) for g in tape.gradient(value, model.trainable_weights)]


def _assert_no_false_alarm(model, x, y, **kwargs):
    before = fingerprint(model)
    check = gm.check_gradients(model, x, y, verbose=False, **kwargs)
    assert check.passed, check
    assert check.dtype == "float64", check.notes
    assert_unchanged(model, before)
    return check


def _assert_caught(model, x, y, **kwargs):
    check = gm.check_gradients(model, x, y, verbose=False, **kwargs)
    index = [layer.name for layer in model.layers].index("hand_swish")
    assert not check.passed, check
    assert f"{index} 'hand_swish'" in check.suspects, check
    # Rows downstream of the wrong layer do not see it.
    assert all(row.passed for row in check.rows if row.index is not None and row.index > index), check
    return check


# --- keras.applications, small -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobilenet():
    keras.utils.set_random_seed(1)
    model = keras.applications.MobileNetV2((32, 32, 3), alpha=0.35, weights=None, classes=5)
    model.compile(loss="sparse_categorical_crossentropy")
    return model


def test_mobilenet_v2_weight_gradients_match_a_tape_and_the_check_passes(mobilenet):
    got = gm.weight_gradients(mobilenet, IMAGES, LABELS).arrays()
    want = _tape_gradients(mobilenet, IMAGES, LABELS, keras.losses.SparseCategoricalCrossentropy())
    for g, w in zip(got, want, strict=True):
        # Two different compiled graphs of the same float32 math: equal to round-off only.
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * np.abs(w).max())
    check = _assert_no_false_alarm(mobilenet, IMAGES, LABELS, max_directions=1)
    # Random-init MobileNetV2 is full of ReLU6 units at exactly 0: those rows are not failures.
    assert all(row.status in ("ok", "not smooth here") for row in check.rows)


def test_mobilenet_v2_with_a_wrong_gradient_inside_is_caught(mobilenet):
    keras.utils.set_random_seed(2)
    wrong = _calibrated(_with_layer_after(mobilenet, "block_6_project_BN", "factor"), MORE_IMAGES)
    wrong.compile(loss="sparse_categorical_crossentropy")
    _assert_caught(wrong, IMAGES, LABELS, max_directions=1)


# --- the blocks of the other architectures, built small ------------------------------------------------------------


def _maybe_wrong(t, wrong):
    return t if wrong is None else HandSwish(wrong, name="hand_swish")(t)


def resnet_v2(wrong=None):
    """ResNetV2's stem (padding, 7x7 conv, 3x3 max-pool) and two pre-activation bottleneck blocks."""
    inp = keras.Input((32, 32, 3))
    t = keras.layers.ZeroPadding2D(3)(inp)
    t = keras.layers.Conv2D(16, 7, strides=2, name="conv1")(t)
    t = keras.layers.ZeroPadding2D(1)(t)
    t = keras.layers.MaxPooling2D(3, strides=2)(t)  # ties between equal maxima are kinks too
    for i, filters in enumerate((8, 16)):
        pre = keras.layers.Activation("relu")(keras.layers.BatchNormalization(name=f"block{i}_preact_bn")(t))
        shortcut = keras.layers.Conv2D(4 * filters, 1, name=f"block{i}_shortcut")(pre)
        h = keras.layers.Conv2D(filters, 1, use_bias=False)(pre)
        h = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(h))
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(h))
        h = keras.layers.Conv2D(4 * filters, 1, name=f"block{i}_out")(h)
        t = keras.layers.Add()([shortcut, _maybe_wrong(h, wrong) if i == 1 else h])
    t = keras.layers.Activation("relu")(keras.layers.BatchNormalization(name="post_bn")(t))
    out = keras.layers.Dense(5, activation="softmax")(keras.layers.GlobalAveragePooling2D()(t))
    return keras.Model(inp, out, name="resnet_v2_small")


def squeeze_excite(wrong=None):
    """EfficientNet's MBConv block: expand, depthwise, squeeze-excite (swish, sigmoid, multiply), project."""
    inp = keras.Input((32, 32, 3))
    t = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inp)
    t = keras.layers.Activation("swish")(keras.layers.BatchNormalization()(t))
    h = keras.layers.Conv2D(48, 1, use_bias=False)(t)
    h = keras.layers.Activation("swish")(keras.layers.BatchNormalization()(h))
    h = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(h)
    h = keras.layers.Activation("swish")(keras.layers.BatchNormalization()(h))
    se = keras.layers.Reshape((1, 1, 48))(keras.layers.GlobalAveragePooling2D()(h))
    se = keras.layers.Conv2D(4, 1, activation="swish", name="se_reduce")(se)
    se = keras.layers.Conv2D(48, 1, activation="sigmoid", name="se_expand")(_maybe_wrong(se, wrong))
    h = keras.layers.Multiply()([h, se])
    h = keras.layers.BatchNormalization()(keras.layers.Conv2D(16, 1, use_bias=False)(h))
    t = keras.layers.Add()([t, keras.layers.Dropout(0.2)(h)])
    out = keras.layers.Dense(5, activation="softmax")(keras.layers.GlobalAveragePooling2D()(t))
    return keras.Model(inp, out, name="mbconv_se")


@keras.saving.register_keras_serializable(package="gradmagic_tests")
class LayerScale(keras.layers.Layer):
    """ConvNeXt's layer scale: a learned per-channel factor, initialised small."""

    def __init__(self, init_values, projection_dim, **kwargs):
        super().__init__(**kwargs)
        self.init_values, self.projection_dim = init_values, projection_dim

    def build(self, _):
        init = keras.initializers.Constant(self.init_values)
        self.gamma = self.add_weight(shape=(self.projection_dim,), initializer=init, name="gamma")

    def call(self, t):
        return t * self.gamma

    def get_config(self):
        return {**super().get_config(), "init_values": self.init_values, "projection_dim": self.projection_dim}


def convnext(wrong=None, dim=16):
    """ConvNeXt's stem and block: a 7x7 grouped convolution, LayerNorm, MLP with GELU, layer scale, ``inp + h``."""
    inp = keras.Input((32, 32, 3))
    t = keras.layers.LayerNormalization(epsilon=1e-6)(keras.layers.Conv2D(dim, 4, strides=4, name="stem")(inp))
    h = keras.layers.Conv2D(dim, 7, padding="same", groups=dim, name="grouped")(t)
    h = keras.layers.LayerNormalization(epsilon=1e-6)(h)
    h = keras.layers.Dense(4 * dim, activation="gelu")(h)
    h = keras.layers.Dense(dim)(_maybe_wrong(h, wrong))
    h = LayerScale(1e-6, dim, name="layer_scale")(h)
    t = t + h  # a raw op between layers, as keras.applications.ConvNeXt writes its residual
    out = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(t))
    return keras.Model(inp, out, name="convnext_block")


class TransformerBlock(keras.layers.Layer):
    """The keras.io text-classification Transformer block: sublayers made in __init__, no build, no get_config."""

    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1):
        super().__init__()
        self.att = keras.layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential([keras.layers.Dense(ff_dim, activation="relu"), keras.layers.Dense(embed_dim)])
        self.layernorm1 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.dropout1, self.dropout2 = keras.layers.Dropout(rate), keras.layers.Dropout(rate)

    def call(self, inputs, training=False):
        attn_output = self.dropout1(self.att(inputs, inputs), training=training)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.dropout2(self.ffn(out1), training=training)
        return self.layernorm2(out1 + ffn_output)


class TokenAndPositionEmbedding(keras.layers.Layer):
    """The keras.io token + position embedding (integer ids in, floats out)."""

    def __init__(self, maxlen, vocab_size, embed_dim):
        super().__init__()
        self.token_emb = keras.layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = keras.layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        positions = keras.ops.arange(0, keras.ops.shape(x)[-1], 1)
        return self.token_emb(x) + self.pos_emb(positions)


def transformer(wrong=None, maxlen=6, vocab=20, dim=8):
    inp = keras.Input((maxlen,), dtype="int32")
    t = TokenAndPositionEmbedding(maxlen, vocab, dim)(inp)
    t = TransformerBlock(dim, 2, 16)(t)
    t = _maybe_wrong(keras.layers.GlobalAveragePooling1D()(t), wrong)
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.Dense(8, activation="tanh")(t))
    return keras.Model(inp, out, name="transformer")


TOKENS = np.array([[3, 7, 1, 12, 0, 5], [9, 2, 2, 18, 4, 11]], "int32")
SEQUENCES = RNG.normal(size=(2, 5, 3)).astype("float32")
SEQUENCES[0, 3:] = 0.0  # padding: Masking skips these steps


def masked_rnn(wrong=None, cell=keras.layers.LSTM):
    """Masking, then a recurrent layer, then a head; the mask is a bool tensor beside the floats."""
    inp = keras.Input((5, 3))
    t = cell(6, name="rnn")(keras.layers.Masking(0.0)(inp))
    out = keras.layers.Dense(1)(_maybe_wrong(t, wrong))
    return keras.Model(inp, out, name="masked_rnn")


def conv_bn_dropout(wrong=None):
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.MaxPooling2D(),
            keras.layers.Dropout(0.3),
            *([HandSwish(wrong, name="hand_swish")] if wrong else []),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(5, activation="softmax"),
        ],
        name="conv_bn_dropout",
    )


IMAGE_MODELS = [resnet_v2, squeeze_excite, convnext, conv_bn_dropout]


def _compiled(model, loss="sparse_categorical_crossentropy"):
    model.compile(optimizer="adam", loss=loss)
    return model


@pytest.mark.parametrize("build", IMAGE_MODELS, ids=lambda b: b.__name__)
def test_image_blocks_pass_right_and_catch_a_wrong_gradient(build):
    model = _compiled(build(wrong="right"))
    check = _assert_no_false_alarm(model, IMAGES, LABELS, max_directions=2)
    assert check.notes == []
    kind = {"resnet_v2": "sign", "squeeze_excite": "missing", "convnext": "stop", "conv_bn_dropout": "factor"}
    wrong = _compiled(build(wrong=kind[build.__name__]))
    wrong.set_weights(model.get_weights())
    if build is convnext:  # as after training: at its initial 1e-6 the block adds next to nothing to any gradient
        wrong.get_layer("layer_scale").gamma.assign(np.full(16, 0.5, "float32"))
    _assert_caught(wrong, IMAGES, LABELS, max_directions=2)


def test_transformer_block_without_build_or_get_config_is_copied_and_checked():
    model = _compiled(transformer(wrong="right"))
    check = _assert_no_false_alarm(model, TOKENS, LABELS[:2] % 2, max_directions=2)
    assert [r.what for r in check.rows if r.index is None] == []  # integer token ids: no input row
    wrong = _compiled(transformer(wrong="sign"))
    wrong.set_weights(model.get_weights())
    _assert_caught(wrong, TOKENS, LABELS[:2] % 2, max_directions=2)


@pytest.mark.parametrize("cell", [keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN], ids=str)
def test_masked_rnns_pass_and_catch_a_wrong_gradient(cell):
    targets = np.array([[0.5], [-1.0]], "float32")
    model = _compiled(masked_rnn("right", cell), loss="mse")
    _assert_no_false_alarm(model, SEQUENCES, targets, max_directions=4)
    wrong = _compiled(masked_rnn("factor", cell), loss="mse")
    wrong.set_weights(model.get_weights())
    _assert_caught(wrong, SEQUENCES, targets, max_directions=4)


def test_mixed_float16_model_is_checked_in_float64():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        inp = keras.Input((32, 32, 3))
        t = keras.layers.Conv2D(8, 3, activation="relu")(inp)
        t = keras.layers.BatchNormalization()(t)
        t = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(t))
        model = _compiled(keras.Model(inp, keras.layers.Activation("softmax", dtype="float32")(t)))
    finally:
        keras.config.set_dtype_policy(previous)
    check = _assert_no_false_alarm(model, IMAGES, LABELS, max_directions=2)
    # The float16 model's own loss differs from the float64 copy's by float16 round-off only.
    np.testing.assert_allclose(check.loss, gm.weight_gradients(model, IMAGES, LABELS).loss, rtol=1e-2)
    assert keras.config.dtype_policy().name == previous.name


# --- the float64 copy, and the model left alone --------------------------------------------------------------------


def _two_outputs():
    inp = keras.Input((3,), name="inp")
    h = keras.layers.Dense(3, activation="tanh")(inp)
    h = keras.layers.Dense(4, activation="tanh")(inp + h)  # a raw op between layers
    model = keras.Model(inp, [keras.layers.Dense(2, name="a")(h), keras.layers.Dense(1, name="b")(h)])
    model.compile(optimizer="adam", loss=["mse", "mae"], loss_weights=[0.3, 2.0])
    return model


X3 = RNG.normal(size=(4, 3)).astype("float32")
Y2 = [RNG.normal(size=(4, 2)).astype("float32"), RNG.normal(size=(4, 1)).astype("float32")]


def _tracked(model):
    """Every variable the model tracks, metrics and optimizer included, by path."""
    paths = [v.path for v in model.variables] + [v.path for v in model.metrics_variables]
    return sorted(paths) + sorted(v.path for v in model.optimizer.variables) + [str(len(model.metrics))]


def test_no_call_adds_variables_to_a_multi_output_model():
    model = _two_outputs()
    tracked, before = _tracked(model), fingerprint(model)

    grads = gm.weight_gradients(model, X3, Y2)
    gm.output_gradients(model, X3, Y2, layer="a")
    gm.explain(model, X3, Y2)
    gm.check_gradients(model, X3, Y2, verbose=False)

    assert _tracked(model) == tracked  # no compile_loss/a_loss/total, /count
    assert_unchanged(model, before)
    # The loss is still the compiled one, loss_weights included, and so are its gradients.
    with tf.GradientTape() as tape:
        a, b = model(X3)
        mse = tf.reduce_mean(keras.losses.mean_squared_error(Y2[0], a))
        want = 0.3 * mse + 2.0 * tf.reduce_mean(keras.losses.mean_absolute_error(Y2[1], b))
    np.testing.assert_allclose(grads.loss, float(want), rtol=1e-5)
    for got, expected in zip(grads.arrays(), tape.gradient(want, model.trainable_weights), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)  # two graphs: round-off apart
    model.fit(X3, Y2, epochs=1, verbose=0)  # Keras builds its own trackers when it trains, as always
    assert any("a_loss" in v.path for v in model.metrics_variables)


def test_loss_weights_and_raw_ops_get_a_float64_copy():
    model = _two_outputs()
    check = gm.check_gradients(model, X3, Y2, verbose=False)
    assert check.passed and check.dtype == "float64" and check.notes == [], check
    # The copy's loss is the weighted one: equal to the float32 model's to float32 round-off.
    np.testing.assert_allclose(check.loss, gm.weight_gradients(model, X3, Y2).loss, rtol=1e-6)


@keras.saving.register_keras_serializable(package="gradmagic_tests")
class Subclassed(keras.Model):
    def __init__(self, width=4, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.hidden = keras.layers.Dense(width, activation="tanh")
        self.out = keras.layers.Dense(2)

    def call(self, t):
        return self.out(self.hidden(t) * t[:, :1])

    def get_config(self):
        return {**super().get_config(), "width": self.width}


def test_subclassed_model_gets_a_float64_copy():
    model = Subclassed(5)
    model(X3)
    model.compile(loss="mse")
    before = fingerprint(model)
    check = gm.check_gradients(model, X3, Y2[0], verbose=False)
    assert check.passed and check.dtype == "float64" and check.max_rel_error < 1e-7, check
    assert_unchanged(model, before)


# --- explain: verdicts that match the gradient actually computed -----------------------------------------------------


def _attention_with_masks():
    """Padding mask from Embedding(mask_zero=True) plus a causal mask, through MultiHeadAttention."""
    inp = keras.Input((6,), dtype="int32")
    t = keras.layers.Embedding(20, 8, mask_zero=True)(inp)
    t = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(t, t, use_causal_mask=True)
    out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(t))
    return keras.Model(inp, out, name="masked_attention")


def _embedding_gru():
    inp = keras.Input((6,), dtype="int32")
    t = keras.layers.GRU(5)(keras.layers.Embedding(20, 4, mask_zero=True)(inp))
    return keras.Model(inp, keras.layers.Dense(1)(t), name="embedding_gru")


def _plain_lstm():
    inp = keras.Input((5, 3))
    return keras.Model(inp, keras.layers.Dense(1)(keras.layers.LSTM(4)(inp)), name="plain_lstm")


EXPLAINED = {
    "masked_lstm": (lambda: masked_rnn(None, keras.layers.LSTM), SEQUENCES),
    "masked_gru": (lambda: masked_rnn(None, keras.layers.GRU), SEQUENCES),
    "masked_simple_rnn": (lambda: masked_rnn(None, keras.layers.SimpleRNN), SEQUENCES),
    "plain_lstm": (_plain_lstm, SEQUENCES),
    "embedding_gru": (_embedding_gru, TOKENS),
    "masked_attention": (_attention_with_masks, TOKENS),
    "transformer": (lambda: transformer(None), TOKENS),
}


@pytest.mark.parametrize("name", sorted(EXPLAINED))
def test_explain_verdicts_match_the_gradient_actually_computed(name):
    build, x = EXPLAINED[name]
    model = build()
    targets = np.array([[0.5], [-1.0]], "float32") if model.outputs[0].shape[-1] == 1 else np.array([0, 1])
    model.compile(loss="mse" if targets.ndim == 2 else "sparse_categorical_crossentropy")
    before = fingerprint(model)

    e = gm.explain(model, x, targets)

    loss = keras.losses.get(model.loss)
    tape = _tape_gradients(model, x, targets, loss)
    owner = {id(v): i for i, layer in enumerate(model.layers) for v in layer.trainable_weights}
    moved = {owner[id(v)] for v, g in zip(model.trainable_weights, tape, strict=True) if np.any(g != 0)}
    assert moved, "the tape sees gradients"
    for record in e.layers:
        if record.index in moved:  # the gradient reaches this layer's weights, so nothing blocks it
            assert (record.verdict, record.observed) == ("flows", "flows"), record
    assert e.blocked == [] and e.disconnected == [], e
    assert_unchanged(model, before)


# --- Jacobians through grouped convolutions --------------------------------------------------------------------------

_GROUPED_SCRIPT = """
import numpy as np, tensorflow as tf, keras, gradmagic as gm
keras.utils.set_random_seed(0)
inp = keras.Input((8, 8, 6))
t = keras.layers.Conv2D(6, 3, groups=3)(inp)  # ConvNeXt's grouped convolution
model = keras.Model(inp, keras.layers.Dense(4)(keras.layers.Flatten()(t)))
x = np.random.default_rng(0).normal(size=(2, 8, 8, 6)).astype("float32")
j = gm.input_gradients(model, x)
want = []
for i in range(2):  # one sample, one output unit at a time: plain backward passes
    row = []
    for k in range(4):
        xi = tf.constant(x[i : i + 1])
        with tf.GradientTape() as tape:
            tape.watch(xi)
            unit = model(xi)[0, k]
        row.append(tape.gradient(unit, xi)[0].numpy())
    want.append(row)
np.testing.assert_allclose(j.array, np.array(want), rtol=1e-4, atol=1e-6)  # different graphs: round-off apart
print("NOTES", j.notes)
"""


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_jacobian_through_a_grouped_convolution_falls_back_to_one_unit_at_a_time(onednn, tmp_path):
    # TensorFlow's CPU kernels without oneDNN refuse the vectorised (pfor) gradient of a grouped
    # convolution; the setting is read at import, hence a fresh interpreter.
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(gm.__file__).parents[1]), env.get("PYTHONPATH", "")])
    script = tmp_path / "grouped.py"
    script.write_text(_GROUPED_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    notes = done.stdout.split("NOTES", 1)[1]
    if onednn == "0":
        assert "one output unit at a time" in notes and "grouped convolutions" in notes
    else:
        assert notes.strip() == "[]"


def test_token_ids_error_names_the_layer_that_holds_the_embedding():
    model = transformer()
    layer = next(lay for lay in model.layers if isinstance(lay, TokenAndPositionEmbedding))
    with pytest.raises(gm.GradmagicError, match=f"layer='{layer.name}'") as raised:
        gm.input_gradients(model, TOKENS)
    assert "<the Embedding layer>" not in str(raised.value)
    # The advice works: the gradient at that layer's output, checked against a tape.
    model.compile(loss="sparse_categorical_crossentropy")
    got = gm.output_gradients(model, TOKENS, np.array([0, 1]), layer=layer.name).array
    with tf.GradientTape() as tape:
        embedded = layer(TOKENS)
        tape.watch(embedded)
        rest = embedded
        for later in model.layers[2:]:
            rest = later(rest)
        loss = keras.losses.SparseCategoricalCrossentropy()(np.array([0, 1]), rest)
    np.testing.assert_allclose(got, tape.gradient(loss, embedded), rtol=1e-4, atol=1e-7)  # two graphs


def test_an_input_cut_by_a_cast_gets_a_note_not_a_bare_zero():
    inp = keras.Input((3,))
    ids = keras.layers.Lambda(lambda t: keras.ops.cast(t, "int32"), output_shape=(3,))(inp)
    out = keras.layers.Dense(1)(keras.layers.Flatten()(keras.layers.Embedding(5, 2)(ids)))
    model = keras.Model(inp, out)
    j = gm.input_gradients(model, np.array([[1.0, 2.0, 3.0], [0.0, 4.0, 1.0]], "float32"))
    assert not np.any(j.array)  # autodiff's answer through a cast to int32 (an Embedding lookup follows)
    assert "exactly 0" in j.notes[0] and "cast to an integer" in repr(j) and "explain" in j._repr_html_()
    e = gm.explain(model, np.array([[1.0, 2.0, 3.0]], "float32"))
    assert e.blocked[0].op == "Cast"  # and explain names the cut, as the note says


def test_float32_fallback_on_a_conv_net_says_why_passes_right_and_catches_wrong():
    def build(kind):
        model = conv_bn_dropout(kind)
        return _compiled(keras.Sequential([keras.Input((32, 32, 3)), Opaque(lambda t: t * 1.0), *model.layers]))

    right = build("right")
    with pytest.warns(UserWarning, match="float32"):
        check = gm.check_gradients(right, IMAGES, LABELS, max_directions=2, verbose=False)
    assert check.dtype == "float32" and "not possible" in check.notes[0] and "Opaque" in check.notes[0]
    assert check.passed, check
    wrong = build("sign")
    wrong.set_weights(right.get_weights())
    with pytest.warns(UserWarning, match="float32"):
        bad = gm.check_gradients(wrong, IMAGES, LABELS, max_directions=2, verbose=False)
    index = [layer.name for layer in wrong.layers].index("hand_swish")
    assert not bad.passed and f"{index} 'hand_swish'" in bad.suspects, bad
