"""Result objects: statistics computed by hand, tables, to_dict, per-layer parts."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from conftest import mlp

import gradmagic as gm
from gradmagic.core.questions.results import GradientRow, GradientStats, WeightGradients


def test_stats_of_a_known_array():
    st = GradientStats.of(np.array([[3.0, -4.0], [0.0, 0.0]], "float32"))
    assert st.size == 4
    assert st.norm == pytest.approx(5.0)
    assert st.max_abs == 4.0 and st.min == -4.0 and st.max == 3.0
    assert st.mean == pytest.approx(-0.25)
    assert st.std == pytest.approx(np.sqrt(((3.25**2) + (3.75**2) + 2 * 0.25**2) / 4))
    assert st.zero_fraction == 0.5 and st.nan == 0 and st.inf == 0 and st.finite


def test_stats_describe_finite_entries_and_count_the_rest():
    st = GradientStats.of(np.array([np.nan, np.inf, -np.inf, 2.0, -1.0]))
    assert (st.nan, st.inf) == (1, 2)
    assert st.norm == pytest.approx(math.sqrt(5.0))
    assert st.max_abs == 2.0 and not st.finite
    nothing = GradientStats.of(np.array([np.nan]))
    assert math.isnan(nothing.norm) and nothing.nan == 1


def _result():
    rows = [
        GradientRow(
            {"index": 0, "layer": "a", "weight": "kernel", "shape": (2,), "path": "m/a/kernel"}, np.array([1.0, 2.0])
        ),
        GradientRow({"index": 0, "layer": "a", "weight": "bias", "shape": (1,), "path": "m/a/bias"}, None),
        GradientRow(
            {"index": 2, "layer": "b", "weight": "kernel", "shape": (1,), "path": "m/b/kernel"}, np.array([np.nan])
        ),
    ]
    return WeightGradients(0.5, rows, "title")


def test_to_dict_has_equal_length_columns():
    columns = _result().to_dict()
    assert {len(v) for v in columns.values()} == {3}
    assert columns["norm"][0] == pytest.approx(math.sqrt(5.0))
    assert columns["norm"][1] is None and columns["disconnected"] == [False, True, False]
    assert columns["path"] == ["m/a/kernel", "m/a/bias", "m/b/kernel"]
    assert columns["nan"][2] == 1


def test_tables_mark_disconnected_and_nonfinite_rows():
    result = _result()
    page = result._repr_html_()
    assert page.count('<tr class="gm-') == 3
    assert 'class="gm-disconnected"' in page and 'class="gm-nonfinite"' in page and 'class="gm-ok"' in page
    assert "m/a/kernel" not in page  # paths stay in to_dict, out of the table
    text = repr(result)
    assert "disconnected" in text and "<- NaN/Inf" in text and text.startswith("title")


def test_layer_parts_by_index_and_name():
    result = _result()
    assert result[0].arrays()[1] is None and len(result["a"]) == 2
    assert result[2].paths == ["m/b/kernel"]
    with pytest.raises(gm.GradmagicError, match=r"no weights of that layer.*0 'a', 2 'b'"):
        result[1]


def test_real_result_columns_align_with_trainable_weights():
    model = mlp()
    r = gm.weight_gradients(model, np.ones((2, 3)), np.zeros((2, 2)))
    assert r.paths == [v.path for v in model.trainable_weights]
    for row, array in zip(r, r.arrays()):
        assert row.stats.norm == pytest.approx(float(np.linalg.norm(array)), rel=1e-6)


def test_negative_layer_index_counts_from_the_end_like_model_layers():
    model = mlp()
    r = gm.weight_gradients(model, np.ones((2, 3)), np.zeros((2, 2)))
    last = model.layers[-1]
    assert r[-1].paths == [v.path for v in last.trainable_weights] == r[len(model.layers) - 1].paths
    assert r[np.int64(-1)][-1].paths == r[-1].paths  # a part keeps the model's layer count
    for out_of_range in (-len(model.layers) - 1, -len(model.layers) - 5):
        with pytest.raises(gm.GradmagicError, match=rf"Received: {out_of_range}, but this result has no weights"):
            r[out_of_range]


def test_a_models_own_weights_are_reached_by_name_not_by_a_negative_index():
    class Scaled(keras.Model):
        def __init__(self):
            super().__init__(name="scaled")
            self.dense = keras.layers.Dense(2, name="d")
            self.scale = self.add_weight(shape=(), initializer="ones", name="own")

        def call(self, x):
            return self.dense(x) * self.scale

    model = Scaled()
    model(np.ones((1, 3)))
    r = gm.weight_gradients(model, np.ones((2, 3)), np.zeros((2, 2)), loss="mse")
    assert r[-1].paths == [v.path for v in model.dense.trainable_weights]  # model.layers[-1]
    assert r["scaled"].paths == [model.scale.path]
    with pytest.raises(gm.GradmagicError, match=r"'scaled' \(the model's own weights, by name\)"):
        r[-2]  # model.layers[-2] does not exist
