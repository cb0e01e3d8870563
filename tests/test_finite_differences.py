"""Central differences against autodiff, row by row, on losses whose derivatives are known by hand."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradmagic.core.diagnose.finite_differences import _weight_values, check_rows, count_rows, loss_problem
from gradmagic.core.diagnose.gradcheck_results import FAIL, NOT_SMOOTH, OK

W = np.array([0.7, -1.3, 2.1])
X = np.array([[0.4, -0.9, 1.6]])
#: The documented float64 step of the gradient check.
H = 1e-5


def _cubed(factor: float):
    """t**3 whose gradient is ``factor`` times the true 3 t**2 (1 is correct)."""

    @tf.custom_gradient
    def cube(t):
        return t**3, lambda upstream: upstream * 3.0 * t**2 * factor

    return cube


class Cubes(keras.layers.Layer):
    """sum(x**3) + sum(w**3) (or relu(w) where ``relu``): derivatives 3 x**2 and 3 w**2 by hand."""

    def __init__(self, factor: float = 1.0, relu: bool = False):
        super().__init__(name="cubes")
        self.factor, self.relu = factor, relu

    def build(self, input_shape):
        self.w = self.add_weight(shape=(3,), initializer="zeros", name="w")

    def call(self, t):
        of_w = tf.nn.relu(self.w) if self.relu else _cubed(self.factor)(self.w)
        return tf.reduce_sum(_cubed(self.factor)(t), axis=-1, keepdims=True) + tf.reduce_sum(of_w)


def _sum_loss(model, x, y, y_pred, sample_weight, training):
    return tf.reduce_sum(y_pred)


def _problem(w=W, **kwargs):
    model = keras.Sequential([keras.Input((3,), dtype="float64"), Cubes(**kwargs)])
    model.layers[0].w.assign(w)
    return model, loss_problem(model, _sum_loss, X, None, None, training=False)


def _settings(**overrides) -> dict:
    settings = {
        "epsilon": H,
        "tol": 1e-6,
        "max_directions": 16,
        "dtype": "float64",
        "input_names": ["x"],
        "rng": np.random.default_rng(0),
        "roundoff": 10 * 2.0**-52,  # as check_gradients sets it in float64
        "noise_rng": np.random.default_rng(1),
    }
    return {**settings, **overrides}


def test_central_differences_of_cubes_agree_with_three_x_squared_at_the_documented_step(float64):
    model, problem = _problem()
    assert problem.dtype == tf.float64
    assert problem.loss_at(problem.x) == pytest.approx(np.sum(X**3) + np.sum(W**3), rel=1e-15)
    variable = model.layers[0].w
    plus, minus = _weight_values(problem, [variable], H, np.eye(3))
    central = (plus - minus) / (2 * H)
    # Truncation error h**2 f'''/6 = 1e-10; round-off about eps |L| / h = 1e-11.
    np.testing.assert_allclose(central, 3 * W**2, rtol=0, atol=1e-8)
    assert np.array_equal(variable.numpy(), W)  # every perturbed weight put back bit for bit


def test_correct_gradients_pass_every_row_at_the_first_step(float64):
    model, problem = _problem()
    loss, rows = check_rows(model, problem, _settings())
    assert loss == pytest.approx(np.sum(X**3) + np.sum(W**3), rel=1e-15)
    assert count_rows(model, problem) == len(rows) == 2  # one layer with weights, one float input
    assert [(r.index, r.name, r.what, r.status, r.step) for r in rows] == [(0, "cubes", "w", OK, H),
                                                                          (None, "x", "input", OK, H)]  # fmt: skip
    assert all(r.mode == "every entry" and r.directions == r.size == 3 for r in rows)
    assert max(r.rel_error for r in rows) < 1e-9


def test_a_gradient_off_by_a_factor_fails_by_the_predicted_amount(float64):
    model, problem = _problem(factor=3.0)
    _, rows = check_rows(model, problem, _settings())
    # Autodiff a = 3 g against differences f = g: ||a - f|| / ||a|| = 2/3 at every step.
    assert [r.status for r in rows] == [FAIL, FAIL]
    for row in rows:
        assert row.rel_error == pytest.approx(2 / 3, rel=1e-6)
    np.testing.assert_allclose(rows[1].max_abs_error, np.max(2 * 3 * X**2), rtol=1e-6)


def test_relu_at_exactly_zero_is_not_smooth_rather_than_failed(float64):
    # Along w_0 the one-sided slopes of relu are 1 and 0 at every step, and autodiff says 0.
    model, problem = _problem(w=np.array([0.0, 0.5, -0.5]), relu=True)
    _, rows = check_rows(model, problem, _settings())
    weights = rows[0]
    assert (weights.status, weights.passed) == (NOT_SMOOTH, True)
    assert weights.max_abs_error == pytest.approx(0.5, rel=1e-6)  # |0 - (h - 0) / 2h|
    assert rows[1].status == OK


def test_big_rows_use_as_many_random_unit_directions_as_allowed(float64):
    model, problem = _problem(factor=3.0)
    _, rows = check_rows(model, problem, _settings(max_directions=2))
    assert [(r.mode, r.directions) for r in rows] == [("random directions", 2)] * 2
    # A factor of 3 fails along any direction by the same 2/3.
    assert all(r.rel_error == pytest.approx(2 / 3, rel=1e-6) for r in rows)
