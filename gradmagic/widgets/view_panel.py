"""What the explorer's plane, sequence and image views share: a figure, a readout, an error line, coalesced renders.

A view subclasses :class:`ViewPanel`, builds its controls and its figure, and
implements ``compute(state)`` (a plain function of the control values, asking
the core for every number) and ``draw(view)`` (moving artists built once).
"""

from __future__ import annotations

import collections
import html
import time
import traceback
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import numpy as np

from gradmagic.core import model_spec
from gradmagic.core import output_labels as core_output_labels
from gradmagic.errors import GradmagicError
from gradmagic.widgets.coalesce import LatestWins, Scheduler

#: The panels' clock (tests inject their own).
DEFAULT_CLOCK = time.monotonic


def output_labels(model: Any) -> list[str]:
    """One label per unit of the flattened per-sample output, read from the model's declared outputs."""
    spec = model_spec(model)
    outputs = spec.outputs or []
    labels: list[str] = []
    for name, spec_out in zip(core_output_labels(spec.output_names, len(outputs)), outputs):
        size = int(np.prod([d or 1 for d in spec_out.shape]))
        labels += [name] if size == 1 else [f"{name}[{i}]" for i in range(size)]
    return labels or ["output"]


def path_slider(steps: int) -> widgets.FloatSlider:
    """The slider for the position a along a path of ``steps`` points, one step per point, at x."""
    return widgets.FloatSlider(
        value=1.0,
        min=0.0,
        max=1.0,
        step=1.0 / (steps - 1),
        description="a (path)",
        continuous_update=True,
        readout_format=".3f",
        layout=widgets.Layout(width="60%"),
    )


def error_html(exc: BaseException) -> str:
    """An exception raised inside a panel callback, as the panel shows it (never swallowed).

    A GradmagicError's paragraph says all the user needs; anything else is
    unexpected, so its whole traceback is shown.
    """
    if isinstance(exc, GradmagicError):
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    else:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()
    return f"<pre style='color:#b00'>{html.escape(text)}</pre>"


def readout_table(rows: list[tuple[str, str]]) -> str:
    """A small HTML table of (name, value) rows; both are escaped."""
    cells = "".join(
        f"<tr><td style='padding-right:1em'>{html.escape(k)}</td><td><code>{html.escape(v)}</code></td></tr>"
        for k, v in rows
    )
    return f"<table class='gm-readout'>{cells}</table>"


#: Paths (and SmoothGrad maps) a view keeps: each is steps times the input's size, twice over.
KEEP_PATHS = 8


class Recent:
    """The last :data:`KEEP_PATHS` computed values by key: revisits are free, memory stays bounded."""

    def __init__(self, keep: int = KEEP_PATHS) -> None:
        self.keep = keep
        self._values: collections.OrderedDict[Any, Any] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        """The value for ``key``, computed by ``compute()`` unless kept; the oldest is dropped beyond ``keep``."""
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        value = compute()  # a failure keeps nothing
        self._values[key] = value
        while len(self._values) > self.keep:
            self._values.popitem(last=False)
        return value


def nonfinite_note(gradients: np.ndarray, alphas: np.ndarray) -> list[str]:
    """A note when the gradient is NaN or Inf somewhere on the path (such points are left blank in the plots)."""
    bad = ~np.isfinite(gradients.reshape(len(alphas), -1)).all(axis=1)
    if not bad.any():
        return []
    return [
        f"the gradient is NaN or Inf at {int(bad.sum())} of {len(alphas)} points on the path (first at a = "
        f"{alphas[bad][0]:.3g}), so the attribution from there on is not finite; such values are left blank. A "
        f"model with sqrt or log of its input has an infinite slope at zero: try another baseline"
    ]


class ViewPanel(widgets.VBox):
    """The frame of a view: controls on top, the figure, a readout and an error line.

    Args:
        clock: Seconds, monotonic (tests inject one).
        scheduler: Runs a callback later; None renders on the event loop (or at once outside one).
    """

    def _frame(
        self,
        controls: widgets.Widget,
        figure_widget: widgets.Widget,
        clock: Callable[[], float],
        scheduler: Scheduler | None,
    ) -> None:
        self.controls = controls
        self.readout = widgets.HTML()
        self.error = widgets.HTML()
        self.updates = LatestWins(self._render, clock=clock, scheduler=scheduler, on_error=self._show_error)
        super().__init__([controls, figure_widget, self.readout, self.error], layout=widgets.Layout(width="100%"))
        self.add_class("gradmagic-explorer")

    def _render(self, state: Any) -> None:
        self.draw(self.compute(state))

    def compute(self, state: Any) -> Any:  # pragma: no cover - every view defines it
        raise NotImplementedError

    def draw(self, view: Any) -> None:  # pragma: no cover - every view defines it
        raise NotImplementedError

    def _show_error(self, exc: BaseException) -> None:
        self.error.value = error_html(exc)
