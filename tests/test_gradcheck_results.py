"""The check_gradients() result as an object: the verdict from its rows, columns and tables, built by hand."""

from __future__ import annotations

import pandas as pd

from gradmagic.core.diagnose.gradcheck_results import FAIL, NOT_SMOOTH, OK, CheckRow, GradientCheck


def _row(index, name, rel, status=OK):
    what = "input" if index is None else "kernel, bias"
    return CheckRow(index, name, what, 6, 6, "every entry", rel * 2, rel, status != FAIL, status, 1e-5)


def _check(*rows, suspects=()) -> GradientCheck:
    return GradientCheck("m", list(rows), 1e-6, "float64", 1e-5, 0.125, list(suspects), ["a note"])


def test_the_verdict_and_the_largest_error_come_from_the_rows():
    good = _check(_row(0, "first", 1e-9), _row(None, "x", 3e-8))
    assert good.passed and good.failed == [] and good.max_rel_error == 3e-8
    rough = _check(_row(0, "first", 0.2, NOT_SMOOTH), _row(None, "x", 1e-9))
    assert rough.passed and [r.name for r in rough.not_smooth] == ["first"] and rough.max_rel_error == 0.2
    bad = _check(_row(0, "first", 0.5, FAIL), _row(2, "last", 1e-9), _row(None, "x", 0.25, FAIL))
    assert not bad.passed and [r.name for r in bad.failed] == ["first", "x"] and bad.max_rel_error == 0.5
    assert _check().passed and _check().max_rel_error == 0.0  # nothing to check: nothing failed


def test_to_dict_has_one_equal_column_per_row_field():
    columns = _check(_row(0, "first", 0.5, FAIL), _row(None, "x", 1e-9)).to_dict()
    frame = pd.DataFrame(columns)
    assert list(frame.columns) == [
        "index", "name", "what", "size", "directions", "mode", "max_abs_error", "rel_error", "passed", "status", "step",
    ]  # fmt: skip
    assert list(frame["name"]) == ["first", "x"] and list(frame["passed"]) == [False, True]
    assert list(frame["status"]) == [FAIL, OK]


def test_the_title_says_the_verdict_and_a_failure_names_its_suspects():
    bad = _check(_row(0, "first", 0.5, FAIL), _row(None, "x", 1e-9), suspects=["0 'first'", "1 'lam'"])
    text = repr(bad)
    title = "Gradient check of model 'm': FAILED (max relative error 0.5, tol 1e-06, float64, h = 1e-05, loss = 0.125)"
    assert title in text
    assert "The wrong gradient enters at one of the layers 0 'first', 1 'lam'" in text and "Note: a note" in text
    page = bad._repr_html_()
    assert "<table" in page and "FAILED" in page and "1 &#x27;lam&#x27;" in page
    rough = repr(_check(_row(0, "first", 0.2, NOT_SMOOTH)))
    assert "PASSED, 1 row(s) not smooth here" in rough and "wrong gradient" not in rough
