"""The one per-layer norm, against the norm of the concatenated tensors computed directly."""

from __future__ import annotations

import math

import numpy as np

from gradmagic.core import combined_norm


def test_a_layer_norm_is_the_norm_of_all_its_tensors_together():
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(4, 3)), rng.normal(size=3)
    whole = np.linalg.norm(np.concatenate([kernel.ravel(), bias]))
    assert math.isclose(combined_norm([np.linalg.norm(kernel), np.linalg.norm(bias)]), whole, rel_tol=1e-12)


def test_nan_tensors_are_skipped_unless_asked_and_all_nan_gives_nan():
    assert combined_norm([3.0, float("nan"), 4.0]) == 5.0
    assert math.isnan(combined_norm([3.0, float("nan")], skip_nan=False))
    assert math.isnan(combined_norm([float("nan"), float("nan")]))
    assert combined_norm([float("inf"), 1.0]) == float("inf")  # an exploding tensor stays visible


def test_per_step_rows_combine_along_an_axis():
    steps = np.array([[3.0, 4.0], [float("nan"), float("nan")], [6.0, float("nan")]])
    np.testing.assert_array_equal(combined_norm(steps, axis=1), [5.0, np.nan, 6.0])
    np.testing.assert_array_equal(combined_norm(steps, axis=1, skip_nan=False), [5.0, np.nan, np.nan])
