"""The explain() report as an object: verdicts per layer, cut weights, columns and tables, built by hand."""

from __future__ import annotations

import pandas as pd
import pytest

import gradmagic as gm
from gradmagic.core.diagnose.explanation import DisconnectedWeight, Explanation, LayerPath, OpInfo
from gradmagic.core.diagnose.nonfinite_origin import NonfiniteOrigin


def _report() -> Explanation:
    layers = [
        LayerPath(0, "pre", "Dense", None, 1, [OpInfo("MatMul", 1, "flows", "", True)], "flows", observed="flows"),
        LayerPath(
            1, "lam", "Lambda", "round", 2,
            [OpInfo("Mul", 2, "flows", "", True), OpInfo("Round", 2, "no gradient", "piecewise constant", True),
             OpInfo("Shape", 1, "no gradient", "int32 output", False)],
            "no gradient", "Round", "lam/Round", "piecewise constant", "no gradient",
        ),
        LayerPath(2, "sign", "Lambda", "sign", 1, [OpInfo("Sign", 1, "zero gradient", "zeros", True)], "zero gradient"),
    ]  # fmt: skip
    cut = [
        DisconnectedWeight(0, "pre", "kernel", "m/pre/kernel", "None", 1, "lam", "Round", "piecewise constant"),
        DisconnectedWeight(0, "pre", "bias", "m/pre/bias", "zero", None, "loss", "Floor", "piecewise constant"),
        DisconnectedWeight(0, "pre", "scale", "m/pre/scale", "zero", None, None, None, "zero for this data"),
    ]
    origin = NonfiniteOrigin("Log", "lam/Log", 1, "lam", False, "cell.py:3 (f): tf.math.log(t)")
    return Explanation("m", "loss", 0.25, layers, cut, ["a note"], [origin])


def test_ops_text_counts_ops_and_marks_only_blocking_ops_on_the_path():
    lam = _report()["lam"]
    # Written out by hand from the OpInfo entries: Shape blocks too, but off the path, so no mark.
    assert lam.ops_text() == "Mul×2, Round!×2, Shape"
    assert [i.differentiable for i in lam.ops] == [True, False, False]


def test_layers_are_found_by_index_or_name_and_blocked_lists_the_cut_ones():
    report = _report()
    assert report[1] is report["lam"] is report.layers[1]
    assert [r.name for r in report.blocked] == ["lam", "sign"]
    with pytest.raises(gm.GradmagicError, match=r"Received: 'nope'.*'pre', 'lam', 'sign' of model 'm'"):
        report["nope"]


def test_each_disconnected_weight_says_where_its_path_is_cut():
    kernel, bias, scale = _report().disconnected
    assert kernel.describe() == (
        "layer 0 'pre' kernel: gradient None, cut in layer 1 'lam' by op Round: piecewise constant"
    )
    assert bias.describe() == "layer 0 'pre' bias: gradient zero, cut in the loss by op Floor: piecewise constant"
    assert scale.describe() == "layer 0 'pre' scale: gradient zero: zero for this data"
    own_call = DisconnectedWeight(0, "pre", "w", "m/pre/w", "None", None, "m", "Floor", "why")
    assert "cut in the call of model 'm' itself by op Floor" in own_call.describe()


def test_to_dict_gives_equal_columns_that_make_a_dataframe():
    columns = _report().to_dict()
    layers = pd.DataFrame(columns["layers"])
    assert list(layers["layer"]) == ["pre", "lam", "sign"]
    assert list(layers["verdict"]) == ["flows", "no gradient", "zero gradient"]
    assert layers.loc[1, "ops"] == "Mul×2, Round!×2, Shape" and layers.loc[1, "function"] == "round"
    assert columns["disconnected"]["cut_op"] == ["Round", "Floor", None]
    assert len(pd.DataFrame(columns["disconnected"])) == 3
    assert list(pd.DataFrame(columns["nonfinite"])["op_type"]) == ["Log"]
    assert (columns["target"], columns["value"], columns["notes"]) == ("loss", 0.25, ["a note"])


def test_text_and_html_show_the_title_rows_cut_weights_and_notes():
    report = _report()
    text = repr(report)
    assert "Gradient paths of model 'm' (differentiating the loss = 0.25)" in text
    assert "Round!×2" in text and "Disconnected weights" in text and "Note: a note" in text
    page = report._repr_html_()
    assert "<table" in page and "lam" in page and "cut in the loss by op Floor" in page and "a note" in page
    no_value = Explanation("m", "sum of outputs", None, [], [], [])
    assert "(differentiating the sum of outputs)" in repr(no_value) and "Disconnected" not in repr(no_value)
