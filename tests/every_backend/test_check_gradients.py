"""check_gradients on every backend: healthy models pass in float64, a deliberately wrong gradient is caught.

The truth is central finite differences of the loss (what the check computes
on its own, in float64) and, for the wrong gradient, its construction: a
``keras.ops.custom_gradient`` whose backward rule says 3 where the derivative
of ``2 t`` is 2, so every weight upstream of it gets a wrong gradient and the
weights downstream do not.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import gradmagic as gm
from tests.conftest import assert_unchanged, fingerprint

RNG = np.random.default_rng(7)


def _torch_grads_left(model: keras.Model) -> list[str]:
    if keras.backend.backend() != "torch":
        return []
    return [v.path for v in model.trainable_variables if getattr(v.value, "grad", None) is not None]


def _x64() -> bool | None:
    """JAX's x64 setting (None on other backends): the check may switch it on only for its own duration."""
    if keras.backend.backend() != "jax":
        return None
    import jax

    return bool(jax.config.jax_enable_x64)


def _mlp() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)])
    model.compile(loss="mse")
    return model, RNG.normal(size=(6, 4)).astype("float32"), RNG.normal(size=(6, 2)).astype("float32")


def _cnn() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(loss="mse")
    return model, RNG.normal(size=(3, 6, 6, 2)).astype("float32"), RNG.normal(size=(3, 2)).astype("float32")


def _lstm() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(4), keras.layers.Dense(1)])
    model.compile(loss="mse")
    return model, RNG.normal(size=(3, 5, 3)).astype("float32"), RNG.normal(size=(3, 1)).astype("float32")


@pytest.mark.parametrize("build", [_mlp, _cnn, _lstm], ids=["mlp", "cnn", "lstm"])
def test_healthy_models_pass_in_float64_without_changing_anything(build):
    model, x, y = build()
    before, x64 = fingerprint(model), _x64()
    c = gm.check_gradients(model, x, y, verbose=False)
    assert_unchanged(model, before)
    assert _torch_grads_left(model) == []
    assert _x64() == x64
    assert c.dtype == "float64" and c.passed, c
    layers_with_weights = [i for i, layer in enumerate(model.layers) if layer.trainable_weights]
    assert [r.index for r in c.rows] == [*layers_with_weights, None]
    # In float64 autodiff and central differences at h = 1e-5 agree to about h^2 |L'''| (1e-10 here), far
    # below the 1e-6 tolerance: any real disagreement would be orders of magnitude larger.
    assert c.max_rel_error <= 1e-6


def _wrong_gradient_model() -> keras.Model:
    @keras.ops.custom_gradient
    def doubled(t):
        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            return upstream * 3.0  # wrong on purpose: d(2 t)/dt is 2

        return 2.0 * t, grad

    inputs = keras.Input((3,), name="x")
    hidden = keras.layers.Dense(4, activation="tanh", name="before")(inputs)
    wrong = keras.layers.Lambda(doubled, name="wrong")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(1, name="after")(wrong))
    model.compile(loss="mse")
    return model


def test_a_wrong_custom_gradient_is_flagged_upstream_of_its_layer():
    model = _wrong_gradient_model()
    x, y = RNG.normal(size=(5, 3)).astype("float32"), RNG.normal(size=(5, 1)).astype("float32")
    before, x64 = fingerprint(model), _x64()
    c = gm.check_gradients(model, x, y, verbose=False)
    assert_unchanged(model, before)
    assert _torch_grads_left(model) == []
    assert _x64() == x64
    assert not c.passed
    by_name = {r.name: r for r in c.rows}
    # Upstream of the wrong rule every gradient is 3/2 of the truth: a relative error near 1/2, not round-off.
    assert not by_name["before"].passed and by_name["before"].rel_error > 0.1
    assert not by_name["x"].passed
    assert by_name["after"].passed  # downstream of it the gradient is right
    wrong_index = model.layers.index(model.get_layer("wrong"))
    assert f"{wrong_index} 'wrong'" in c.suspects


def test_bad_arguments_are_gradmagic_errors_and_leave_the_model_unchanged():
    model, x, y = _mlp()
    before = fingerprint(model)
    with pytest.raises(gm.GradmagicError, match="tol"):
        gm.check_gradients(model, x, y, tol=-1.0)
    with pytest.raises(gm.GradmagicError, match="max_directions"):
        gm.check_gradients(model, x, y, max_directions=0)
    with pytest.raises(gm.GradmagicError, match="Received"):
        gm.check_gradients(model, np.zeros((2, 7), "float32"), y[:2])
    with pytest.raises(gm.GradmagicError, match="Received"):
        gm.check_gradients(model, x, y, np.ones(6))  # sample weights where the loss goes
    assert_unchanged(model, before)
    assert _torch_grads_left(model) == []


def test_results_are_the_public_types():
    model, x, y = _mlp()
    c = gm.check_gradients(model, x, y, verbose=False)
    from gradmagic.core import CheckRow

    assert isinstance(c, gm.GradientCheck) and all(isinstance(r, CheckRow) for r in c.rows)
    assert c.to_dict()["name"] == [r.name for r in c.rows]
    assert "PASSED" in repr(c)


def test_float64_promotion_is_scoped():
    """Canary of the Keras internal the float64 copy needs (Keras on JAX/PyTorch narrows float64 to float32)."""
    from gradmagic.core.backends.keras_internals import float64_promotion

    outside = keras.backend.result_type("float64", "float64")
    with float64_promotion():
        assert keras.backend.result_type("float64", "float64") == "float64"
    assert keras.backend.result_type("float64", "float64") == outside
