"""The one table renderer (gradmagic.core.display), checked against hand-written tables."""

from __future__ import annotations

import numpy as np
import pytest

from gradmagic.core import display
from gradmagic.core.questions.results import GradientRow, WeightGradients


def test_text_table_pads_each_column_to_its_widest_cell():
    table = display.text_table("Title", ["a", "long header"], [[1, None], ["wide cell", 2.5]])
    assert table == "Title\na          long header\n1\nwide cell  2.5"


def test_text_table_appends_suffixes_after_stripping_and_omits_an_empty_title():
    table = display.text_table("", ["x", "y"], [["1", ""], ["22", "3"]], suffixes=["  <- bad", ""])
    assert table == "x   y\n1  <- bad\n22  3"


def test_text_table_without_rows_is_title_and_header():
    assert display.text_table("T", ["layer"], []) == "T\nlayer"


def test_html_table_classes_and_styles_rows_by_state_and_escapes_cells():
    page = display.html_table("A <b>", ["h&1"], [["<x>"], [None], [3]], ["nonfinite", "ok", "zero-gradient"])
    assert page == (
        "<table class=\"gradmagic\"><caption style='text-align:left'>A &lt;b&gt;</caption>"
        "<thead><tr><th>h&amp;1</th></tr></thead><tbody>"
        '<tr class="gm-nonfinite" style="background:#ffd6d6;color:#900;font-weight:bold"><td>&lt;x&gt;</td></tr>'
        '<tr class="gm-ok" style=""><td></td></tr>'
        '<tr class="gm-zero-gradient" style="background:#fff1c6;color:#7a5b00"><td>3</td></tr>'
        "</tbody></table>"
    )


def test_html_table_without_title_has_no_caption():
    page = display.html_table("", ["h"], [], [])
    assert page == '<table class="gradmagic"><thead><tr><th>h</th></tr></thead><tbody></tbody></table>'


@pytest.mark.parametrize(
    ("label", "css"),
    [
        ("no gradient", "background:#ffd6d6;color:#900;font-weight:bold"),
        ("failed", "background:#ffd6d6;color:#900;font-weight:bold"),
        ("nonfinite", "background:#ffd6d6;color:#900;font-weight:bold"),
        ("zero gradient", "background:#fff1c6;color:#7a5b00"),
        ("rough", "background:#fff1c6;color:#7a5b00"),
        ("disconnected", "background:#eeeeee;color:#666;font-style:italic"),
        ("flows", ""),
    ],
)
def test_one_style_per_row_state(label, css):
    state = display.row_state(label)
    assert display.ROW_STYLES.get(state, "") == css
    assert f'class="gm-{state}" style="{css}"' in display.html_table("", ["c"], [[1]], [state])


def test_notes_render_as_lines_and_escaped_paragraphs():
    assert display.text_notes(["a", "b < c"]) == ["Note: a", "Note: b < c"]
    assert display.html_notes(["b < c"]) == "<p><em>Note: b &lt; c</em></p>"
    assert display.html_notes([]) == ""


def test_a_gradient_table_renders_through_the_shared_renderer():
    # Hand-made rows: a NaN gradient, a disconnected one, an all-zero one.
    rows = [
        GradientRow({"layer": "a", "weight": "kernel"}, np.array([1.0, np.nan], "float32")),
        GradientRow({"layer": "b", "weight": "bias"}, None),
        GradientRow({"layer": "c", "weight": "bias"}, np.zeros(2, "float32")),
    ]
    result = WeightGradients(0.5, rows, "Title")
    assert repr(result) == (
        "Title\n"
        "layer  weight  norm          max |g|  mean  std  min  max  NaN  Inf  zeros\n"
        "a      kernel  1             1        1     0    1    1    1    0    0%  <- NaN/Inf\n"
        "b      bias    disconnected\n"
        "c      bias    0             0        0     0    0    0    0    0    100%"
    )
    page = result._repr_html_()
    assert [s for s in ("gm-nonfinite", "gm-disconnected", "gm-ok") if f'class="{s}"' in page] == [
        "gm-nonfinite",
        "gm-disconnected",
        "gm-ok",
    ]
    assert page.startswith("<table class=\"gradmagic\"><caption style='text-align:left'>Title</caption>")
