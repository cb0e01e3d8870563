"""explain on every backend: the layer that cuts a gradient path, the weights it cuts off, where NaN/Inf is made.

The truth is the model's own construction: a Lambda applying
``keras.ops.stop_gradient``, ``keras.ops.round`` or an integer cast sits
between known weights and the output, so exactly the weights upstream of it are
cut off, by that layer; a Lambda dividing by an input column that holds a zero
is where Inf is made, in the forward pass. The loss value is checked against
the same model written out in NumPy.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

import gradmagic as gm
from tests.conftest import assert_unchanged, fingerprint

X = np.array([[0.3, -0.7, 1.2], [0.9, 0.4, -0.5], [-1.1, 0.2, 0.8]], "float32")
Y = np.array([[0.5], [-0.2], [0.1]], "float32")

CUTS = {
    "stop": lambda t: keras.ops.stop_gradient(t),
    "round": lambda t: keras.ops.round(t),
    "int_cast": lambda t: keras.ops.cast(keras.ops.cast(t * 4.0, "int32"), "float32"),
    "argmax": lambda t: keras.ops.one_hot(keras.ops.argmax(t, axis=-1), 2),
}


def _two_branches(cut: str) -> keras.Model:
    """``before`` -> Lambda(cut) and ``side`` both feed ``head``: only ``before``'s weights are cut off."""
    inputs = keras.Input((3,), name="x")
    cut_branch = keras.layers.Lambda(CUTS[cut], name="cut")(keras.layers.Dense(2, name="before")(inputs))
    side = keras.layers.Dense(2, activation="tanh", name="side")(inputs)
    merged = keras.layers.Concatenate(name="merge")([cut_branch, side])
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(merged), name=f"cut_by_{cut}")
    model.compile(loss="mse")
    return model


def _torch_grads_left(model: keras.Model) -> list[str]:
    """Paths of torch parameters that hold a ``.grad`` (none may be left by gradmagic)."""
    if keras.backend.backend() != "torch":
        return []
    return [v.path for v in model.trainable_variables if getattr(v.value, "grad", None) is not None]


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_the_cutting_lambda_and_the_weights_upstream_are_named(cut):
    model = _two_branches(cut)
    before = fingerprint(model)
    e = gm.explain(model, X, Y, verbose=False)
    assert_unchanged(model, before)
    assert _torch_grads_left(model) == []

    assert [r.name for r in e.blocked] == ["cut"]
    assert e["cut"].verdict in ("no gradient", "zero gradient") and e["cut"].op is not None
    assert e["side"].verdict == e["head"].verdict == "flows"
    cut_off = {(d.layer, d.weight) for d in e.disconnected}
    assert cut_off == {("before", "kernel"), ("before", "bias")}
    assert {d.cut_layer for d in e.disconnected} == {"cut"}
    assert e.target == "loss" and e.nonfinite == []


def test_the_loss_value_matches_numpy():
    model = _two_branches("round")
    e = gm.explain(model, X, Y, verbose=False)
    weights = {v.path: v.numpy().astype("float64") for v in model.weights}
    x = X.astype("float64")
    before = np.round(x @ weights["before/kernel"] + weights["before/bias"])
    side = np.tanh(x @ weights["side/kernel"] + weights["side/bias"])
    out = np.concatenate([before, side], axis=1) @ weights["head/kernel"] + weights["head/bias"]
    # float32 forward pass against float64 NumPy: a few ulps of float32.
    np.testing.assert_allclose(e.value, np.mean((out - Y) ** 2), rtol=1e-5)


def test_without_y_the_sum_of_outputs_is_differentiated_and_flows_everywhere():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    e = gm.explain(model, X, verbose=False)
    assert e.target == "sum of outputs" and e.blocked == [] and e.disconnected == []
    assert [r.observed for r in e.layers] == ["flows", "flows"]


def _dividing_model() -> keras.Model:
    inputs = keras.Input((3,), name="x")
    ratio = keras.layers.Lambda(lambda t: t[:, :2] / t[:, 2:3], name="ratio")(inputs)
    hidden = keras.layers.Dense(2, name="dense")(inputs)
    merged = keras.layers.Concatenate(name="merge")([hidden, ratio])
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(merged))
    model.compile(loss="mse")
    return model


def test_nan_origin_names_the_dividing_lambda():
    model = _dividing_model()
    x = X.copy()
    x[1, 2] = 0.0  # this sample divides by zero
    before = fingerprint(model)
    e = gm.explain(model, x, Y, verbose=False)
    assert_unchanged(model, before)
    assert _torch_grads_left(model) == []
    forward = [o for o in e.nonfinite if not o.backward]
    ratio_index = model.layers.index(model.get_layer("ratio"))
    assert forward and forward[0].layer == "ratio" and forward[0].layer_index == ratio_index
    assert any("ratio" in note and "forward pass" in note for note in e.notes)
    assert e["ratio"].observed.startswith("NaN/Inf")


def test_finite_inputs_report_no_origin():
    e = gm.explain(_dividing_model(), X, Y, verbose=False)
    assert e.nonfinite == []
    assert np.isfinite(e.value)


def test_bad_input_is_a_gradmagic_error_and_leaves_the_model_unchanged():
    model = _two_branches("stop")
    before = fingerprint(model)
    with pytest.raises(gm.GradmagicError, match="Received"):
        gm.explain(model, np.zeros((2, 5), "float32"), verbose=False)
    with pytest.raises(gm.GradmagicError, match="Received"):
        gm.explain(model, X, verbose=False, sample_weight=np.ones(3))
    with pytest.raises(gm.GradmagicError):
        gm.explain("not a model", X)
    assert_unchanged(model, before)
    assert _torch_grads_left(model) == []


def test_result_types_are_the_public_ones():
    e = gm.explain(_two_branches("stop"), X, Y, verbose=False)
    assert isinstance(e, gm.Explanation)
    table = e.to_dict()
    assert table["layers"]["layer"] == [r.name for r in e.layers]
    assert "cut" in repr(e) and "cut" in e._repr_html_()


def test_a_recurrent_model_flows_through_its_loop():
    model = keras.Sequential([keras.Input((4, 3)), keras.layers.LSTM(3, name="lstm"), keras.layers.Dense(1)])
    model.compile(loss="mse")
    x = np.random.default_rng(1).normal(size=(2, 4, 3)).astype("float32")
    e = gm.explain(model, x, np.zeros((2, 1), "float32"), verbose=False)
    assert e.blocked == [] and e.disconnected == []
    assert e["lstm"].verdict == e["lstm"].observed == "flows"


def test_a_custom_gradient_is_followed_not_blamed():
    @keras.ops.custom_gradient
    def doubled(t):
        def grad(*args, upstream=None):
            return 2.0 * (args[0] if upstream is None else upstream)

        return 2.0 * t, grad

    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(2, name="before")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Lambda(doubled, name="custom")(hidden)))
    e = gm.explain(model, X, verbose=False)
    assert e.blocked == [] and e.disconnected == []
    assert e["custom"].verdict == "flows" and e["before"].observed == "flows"


def test_training_mode_moves_no_batchnorm_statistics():
    model = keras.Sequential(
        [keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3), keras.layers.BatchNormalization(), keras.layers.Flatten()]
    )
    before = fingerprint(model)
    x = np.random.default_rng(2).normal(size=(3, 4, 4, 1)).astype("float32")
    e = gm.explain(model, x, training=True, verbose=False)
    assert_unchanged(model, before)
    assert _torch_grads_left(model) == []
    assert e.blocked == []


def test_a_jax_host_callback_is_named_as_the_cut(backend):
    if backend != "jax":
        pytest.skip("jax.pure_callback exists on JAX only")
    import jax

    def on_host(t):
        return jax.pure_callback(lambda a: np.asarray(a) * 2.0, jax.ShapeDtypeStruct(t.shape, t.dtype), t)

    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(2, name="before")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Lambda(on_host, name="host")(hidden)))
    e = gm.explain(model, X, verbose=False)
    assert [r.name for r in e.blocked] == ["host"] and e["host"].op == "pure_callback"
    assert {(d.layer, d.cut_layer) for d in e.disconnected} == {("before", "host")}
    assert any("could not compute the gradient" in note for note in e.notes)  # JAX refuses its JVP


@pytest.mark.parametrize("diagnose", ["explain", "check_gradients"])
def test_training_mode_leaves_the_random_stream_and_the_model_as_they_were(backend, diagnose):
    # Dropout in training mode draws masks: on PyTorch from the global generator, which
    # the user's own training reads too; it must be where it was after the diagnosis.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dropout(0.5), keras.layers.Dense(2)]
    )
    model.compile(loss="mse")
    before = fingerprint(model)
    if backend == "torch":
        import torch

        state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check_gradients warns that Dropout makes its differences meaningless
        getattr(gm, diagnose)(model, x, y, training=True)
    assert_unchanged(model, before)
    if backend == "torch":
        assert torch.equal(state, torch.get_rng_state())
