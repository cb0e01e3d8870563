"""Live panel of per-layer gradient norms while ``fit`` runs, fed by a GradientMonitor.

The figure is built once; each update moves the lines with ``set_data`` and
repaints through :class:`~gradmagic.widgets.figure_view.FigureView`: with the
ipympl backend (``%matplotlib widget``) on ipympl's canvas, otherwise as a PNG in
an ``ipywidgets.Image``. Either way the kernel pushes the frame itself, so the
panel repaints while ``fit`` keeps the cell running (and works headless).

A repaint costs tens of milliseconds and happens inside ``fit``, so repaints are
time-budgeted the way progress bars throttle theirs: at most one per
``min_interval`` seconds, and only while the time spent repainting stays within
``max_fraction`` of the time elapsed. The last steps are drawn when ``fit`` ends.
"""

from __future__ import annotations

import html
import math
import time
import traceback
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import matplotlib
import numpy as np

from gradmagic.core import GradientMonitor, MonitorHistory
from gradmagic.errors import PanelArgumentError
from gradmagic.widgets.figure_view import FigureView

_NO_FIT = object()  # differs from any monitor.params, so the first read opens a budget window


def _check_arguments(monitor: Any, every: Any, max_layers: Any, log_scale: Any, use_ipympl: Any) -> None:
    """Refuse what would fail later, inside ``fit``: checked before anything is drawn."""
    # What the panel uses of a monitor (a GradientMonitor, or a stand-in with its interface).
    if not callable(getattr(monitor, "add_listener", None)) or not hasattr(monitor, "recorded"):
        raise PanelArgumentError(
            f"Received: monitor={monitor!r} ({type(monitor).__name__}). Expected a gm.GradientMonitor, the one "
            "passed to fit. Fix: monitor = gm.GradientMonitor(); gm.training_panel(monitor); "
            "model.fit(x, y, callbacks=[monitor])."
        )
    for name, value in (("every", every), ("max_layers", max_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PanelArgumentError(f"Received: {name}={value!r}. Expected a positive int. Fix: pass e.g. {name}=10.")
    if not isinstance(log_scale, bool) or not (use_ipympl is None or isinstance(use_ipympl, bool)):
        raise PanelArgumentError(
            f"Received: log_scale={log_scale!r}, use_ipympl={use_ipympl!r}. Expected True or False (use_ipympl "
            "also None). Fix: pass a bool, e.g. log_scale=False."
        )


def _ipympl_active() -> bool:
    backend = matplotlib.get_backend().lower()
    return "ipympl" in backend or backend.endswith("widget")


class TrainingPanel:
    """Per-layer gradient-norm curves over steps, updated during ``fit``.

    Args:
        monitor: The monitor to follow; pass it to ``fit(callbacks=[monitor])``.
        every: Read new steps from the monitor every this many batches and redraw
            at most once per this many new steps. Defaults to 50.
        max_layers: Plot the first this many layers that have weights. Defaults to 12.
        log_scale: Log y axis (norms span decades). Defaults to True.
        use_ipympl: Use the ipympl canvas; ``None`` picks it when it is the active
            matplotlib backend. Defaults to None.
        max_fraction: The largest fraction of the time since a ``fit``'s first read
            that redrawing may take, the final redraw included (which always
            happens, so a fit shorter than ``redraw time / max_fraction``, about a
            second, goes over); 1 turns the budget off. Defaults to 0.03.
        min_interval: The least number of seconds between two redraws. Defaults to 0.25.
        clock: Seconds, monotonic. Defaults to ``time.perf_counter`` (tests inject one).

    Example:
        >>> monitor = gm.GradientMonitor()
        >>> panel = gm.training_panel(monitor)   # shows itself in a notebook
        >>> model.fit(x, y, epochs=5, callbacks=[monitor])
    """

    def __init__(
        self,
        monitor: GradientMonitor,
        every: int = 50,
        max_layers: int = 12,
        log_scale: bool = True,
        use_ipympl: bool | None = None,
        *,
        max_fraction: float = 0.03,
        min_interval: float = 0.25,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        _check_arguments(monitor, every, max_layers, log_scale, use_ipympl)
        if not 0 < max_fraction <= 1 or min_interval < 0:
            raise PanelArgumentError(
                f"Received: max_fraction={max_fraction!r}, min_interval={min_interval!r}. Expected "
                "0 < max_fraction <= 1 and min_interval >= 0. Example: TrainingPanel(monitor, max_fraction=0.05)."
            )
        self.monitor = monitor
        self.every = every
        self.max_layers = max_layers
        self.max_fraction = max_fraction
        self.min_interval = min_interval
        self._clock = clock
        # The time budget of the current fit: when its first read came, seconds spent
        # redrawing since, when the last redraw ended, and what one redraw costs.
        self._fit: Any = _NO_FIT
        self._start = self._spent = 0.0
        self._last = -math.inf
        # The canvas and how to repaint it come from FigureView: frames are pushed
        # from the kernel, which matters here because fit keeps the kernel busy.
        self.view = FigureView((7.0, 3.5), dpi=80, use_ipympl=_ipympl_active() if use_ipympl is None else use_ipympl)
        self.use_ipympl = self.view.uses_ipympl
        self.redraws = 0
        # The history drawn last and how many steps of it: a monitor starts a new
        # history when it is reused with another model.
        self._drawn: MonitorHistory | None = None
        self._drawn_steps = 0
        self._lines: dict[str, Any] = {}
        self.figure = self.view.figure
        self.axes = self._build_axes(log_scale)
        self.status = widgets.HTML()
        self.image = None if self.use_ipympl else self.view.widget
        self.widget = widgets.VBox([self.view.widget, self.status])
        # One draw of the empty axes now, outside fit: it pays matplotlib's
        # first-draw costs and tells the budget what a redraw costs.
        start = self._clock()
        self.view.show(background_changed=True)
        self._cost = self._clock() - start
        # Reads every `every` batches (about a millisecond each) keep the panel fed;
        # the last steps are drawn when fit ends.
        monitor.add_listener(self._on_read, every=every, on_end=self.finish)

    def _build_axes(self, log_scale: bool) -> Any:
        axes = self.figure.add_subplot(1, 1, 1)
        axes.set_xlabel("step")
        axes.set_ylabel("gradient L2 norm (per layer)")
        if log_scale:
            axes.set_yscale("log")
        axes.grid(True, alpha=0.3)
        # Fixed margins with room for log tick labels such as 6x10^-1: a layout
        # computed on the empty axes would leave the y label off the canvas once
        # data arrives, and re-solving it on every redraw costs time during fit.
        self.figure.subplots_adjust(left=0.14, right=0.98, bottom=0.16, top=0.96)
        return axes

    def _on_read(self, monitor: GradientMonitor) -> None:
        now = self._clock()
        if monitor.params is not self._fit:  # Keras passes new params to every fit
            # A new budget window: time between fits must not buy redraws in this one.
            self._fit, self._start, self._spent, self._last = monitor.params, now, 0.0, -math.inf
        recorded = monitor.recorded
        if recorded is not None and len(recorded) - self._steps_drawn(recorded) >= self.every and self._affordable(now):
            self.update()

    def _steps_drawn(self, recorded: MonitorHistory) -> int:
        return self._drawn_steps if recorded is self._drawn else 0

    def _affordable(self, now: float) -> bool:
        """Whether a redraw now keeps to ``min_interval`` and to ``max_fraction``."""
        if now - self._last < self.min_interval:
            return False
        if self.max_fraction >= 1.0:
            return True  # no time budget
        # Room for this redraw and the final one, which happens whatever the budget.
        return self._spent + 2 * self._cost <= self.max_fraction * (now - self._start)

    def update(self) -> None:
        """Redraw from everything the monitor has recorded so far, now (no throttling).

        This runs inside ``fit`` (from the monitor): an exception is shown in the
        panel's status line rather than raised, so a plotting problem never ends
        the training run.
        """
        recorded = self.monitor.recorded
        if recorded is None or not len(recorded):
            return
        start = self._clock()
        try:
            self._update(recorded)
            self.status.value = ""
        except Exception:  # shown in the panel, not swallowed: training must go on
            # Escaped: a traceback holds text like "<lambda>" that HTML would swallow.
            self.status.value = f"<pre style='color:#900'>{html.escape(traceback.format_exc(limit=3))}</pre>"
        self._last = self._clock()
        seconds = self._last - start
        self._spent += seconds
        # Recent redraws predict the next one best (the first with data adds the legend, which costs more).
        self._cost = 0.5 * (self._cost + seconds)

    def finish(self) -> None:
        """Draw the steps the time budget held back, if any.

        Called when ``fit`` ends (from the monitor's ``on_train_end``); call it
        yourself after a ``fit`` that raised.
        """
        recorded = self.monitor.recorded
        if recorded is not None and len(recorded) != self._steps_drawn(recorded):
            self.update()

    def _update(self, recorded: MonitorHistory) -> None:
        if recorded is not self._drawn and self._lines:  # another model's layers: start afresh
            for line in self._lines.values():
                line.remove()
            self._lines.clear()
            self.axes.get_legend().remove()
        names, norms = recorded.layer_norms()
        steps = recorded.steps
        for j, name in enumerate(names[: self.max_layers]):
            values = np.where(norms[:, j] > 0, norms[:, j], np.nan)  # log axes cannot show 0
            line = self._lines.get(name)
            if line is None:
                (line,) = self.axes.plot([], [], label=name, linewidth=1)
                self._lines[name] = line
                self.axes.legend(loc="upper right", fontsize="small")
            line.set_data(steps, values)
        self.axes.relim()
        self.axes.autoscale_view()
        self._drawn, self._drawn_steps = recorded, len(recorded)
        self.redraws += 1
        self.view.show(background_changed=True)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def training_panel(monitor: GradientMonitor, **options: Any) -> TrainingPanel:
    """Build a :class:`TrainingPanel` for ``monitor`` and display it (in IPython).

    Args:
        monitor: The monitor passed to ``fit``.
        **options: Passed to :class:`TrainingPanel` (``every``, ``max_layers``...).

    Returns:
        The panel (its ``widget`` is the ipywidgets box).
    """
    panel = TrainingPanel(monitor, **options)
    try:
        from IPython import get_ipython

        if get_ipython() is not None:
            from IPython.display import display

            display(panel.widget)
    except ImportError:  # pragma: no cover - IPython is a dependency
        pass
    return panel
