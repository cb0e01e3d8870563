"""Text and HTML tables and their row styles: how every core result shows itself.

Gradient tables, the gradient-path report, the gradient check and the monitor
summary all render through :func:`text_table` and :func:`html_table`, so a row
state (a NaN/Inf gradient, a disconnected weight, a failed check) looks the same
everywhere. A row's state becomes its class ``gm-<state>`` (for notebook CSS
and tests) and picks its inline style from :data:`ROW_STYLES`.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

# Three looks, one per kind of news a row can carry.
_ALERT = "background:#ffd6d6;color:#900;font-weight:bold"  # broken: NaN/Inf, no gradient, a failed check
_CAUTION = "background:#fff1c6;color:#7a5b00"  # suspicious: all-zero gradient, not differentiable here
_MUTED = "background:#eeeeee;color:#666;font-style:italic"  # absent: no gradient path at all

#: Inline CSS of a table row by its state; a state not listed here (``"ok"``, ``"flows"``...) is unstyled.
ROW_STYLES: dict[str, str] = {
    "nonfinite": _ALERT,
    "no-gradient": _ALERT,
    "failed": _ALERT,
    "zero-gradient": _CAUTION,
    "rough": _CAUTION,
    "disconnected": _MUTED,
}


def row_state(label: str) -> str:
    """The state (and class suffix) for a human label: ``"no gradient"`` -> ``"no-gradient"``."""
    return label.replace(" ", "-")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def text_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], suffixes: Sequence[str] | None = None
) -> str:
    """A plain-text table: the title, then columns padded to their widest cell, two spaces apart.

    Args:
        title: Line(s) above the header; omitted when empty.
        headers: Column names.
        rows: One sequence of cells per row, as long as ``headers``; ``None`` shows as empty.
        suffixes: Text appended to each row after its trailing spaces are stripped
            (e.g. ``"  <- NaN/Inf"``). Defaults to none.

    Returns:
        The table, lines joined by newlines, without trailing spaces on any line.
    """
    cells = [[_text(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    ends = suffixes if suffixes is not None else [""] * len(cells)
    lines = [title] if title else []
    lines.append(line(headers))
    lines += [line(c) + end for c, end in zip(cells, ends, strict=True)]
    return "\n".join(lines)


def html_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], states: Sequence[str]) -> str:
    """An HTML table with a caption, each row classed ``gm-<state>`` and styled by :data:`ROW_STYLES`.

    Args:
        title: The caption; omitted when empty.
        headers: Column names.
        rows: One sequence of cells per row (escaped here); ``None`` shows as empty.
        states: One state per row, e.g. ``"ok"``, ``"nonfinite"``, ``"disconnected"``.

    Returns:
        One ``<table class="gradmagic">`` element.
    """
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        f'<tr class="gm-{state}" style="{ROW_STYLES.get(state, "")}">'
        + "".join(f"<td>{html.escape(_text(v))}</td>" for v in row)
        + "</tr>"
        for row, state in zip(rows, states, strict=True)
    )
    caption = f"<caption style='text-align:left'>{html.escape(title)}</caption>" if title else ""
    return f'<table class="gradmagic">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def text_notes(notes: Sequence[str]) -> list[str]:
    """Notes shown under a text table: one ``Note: ...`` line each."""
    return [f"Note: {n}" for n in notes]


def html_notes(notes: Sequence[str]) -> str:
    """Notes shown under an HTML table: one emphasised ``Note: ...`` paragraph each (escaped here)."""
    return "".join(f"<p><em>Note: {html.escape(n)}</em></p>" for n in notes)
