"""Plain-text and HTML tables for the diagnosis results (explain, check_gradients)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any


def text_table(title: str, headers: Sequence[str], rows: list[list[Any]]) -> str:
    """A plain-text table with padded columns (``None`` shows as empty)."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells])


def html_table(title: str, headers: Sequence[str], rows: list[list[Any]], styles: list[tuple[str, str]]) -> str:
    """An HTML table; ``styles`` gives each row's ``(state, css)``, the state becoming class ``gm-<state>``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        f'<tr class="gm-{state}" style="{css}">'
        + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row)
        + "</tr>"
        for row, (state, css) in zip(rows, styles, strict=True)
    )
    caption = f"<caption style='text-align:left'>{html.escape(title)}</caption>"
    return f'<table class="gradmagic">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
