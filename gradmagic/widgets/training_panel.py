"""Live panel of per-layer gradient norms while ``fit`` runs, fed by a GradientMonitor.

The figure is built once; each update moves the lines with ``set_data`` and
repaints through :class:`~gradmagic.widgets.figure_view.FigureView`: with the
ipympl backend (``%matplotlib widget``) on ipympl's canvas, otherwise as a PNG in
an ``ipywidgets.Image``. Either way the kernel pushes the frame itself, so the
panel repaints while ``fit`` keeps the cell running (and works headless).
"""

from __future__ import annotations

import traceback
from typing import Any

import ipywidgets as widgets
import matplotlib
import numpy as np

from gradmagic.core.monitor import GradientMonitor
from gradmagic.widgets.figure_view import FigureView


def _ipympl_active() -> bool:
    backend = matplotlib.get_backend().lower()
    return "ipympl" in backend or backend.endswith("widget")


class TrainingPanel:
    """Per-layer gradient-norm curves over steps, updated during ``fit``.

    Args:
        monitor: The monitor to follow; pass it to ``fit(callbacks=[monitor])``.
        every: Redraw at most once per this many new steps. Defaults to 20.
        max_layers: Plot the first this many layers that have weights. Defaults to 12.
        log_scale: Log y axis (norms span decades). Defaults to True.
        use_ipympl: Use the ipympl canvas; ``None`` picks it when it is the active
            matplotlib backend. Defaults to None.

    Example:
        >>> monitor = gm.GradientMonitor()
        >>> panel = gm.training_panel(monitor)   # shows itself in a notebook
        >>> model.fit(x, y, epochs=5, callbacks=[monitor])
    """

    def __init__(
        self,
        monitor: GradientMonitor,
        every: int = 20,
        max_layers: int = 12,
        log_scale: bool = True,
        use_ipympl: bool | None = None,
    ) -> None:
        self.monitor = monitor
        self.every = every
        self.max_layers = max_layers
        # The canvas and how to repaint it come from FigureView: frames are pushed
        # from the kernel, which matters here because fit keeps the kernel busy.
        self.view = FigureView((7.0, 3.5), dpi=80, use_ipympl=_ipympl_active() if use_ipympl is None else use_ipympl)
        self.use_ipympl = self.view.uses_ipympl
        self.redraws = 0
        self._drawn_steps = 0
        self._lines: dict[str, Any] = {}
        self.figure = self.view.figure
        self.axes = self._build_axes(log_scale)
        self.status = widgets.HTML()
        self.image = None if self.use_ipympl else self.view.widget
        self.widget = widgets.VBox([self.view.widget, self.status])
        monitor.add_listener(self._on_read)

    def _build_axes(self, log_scale: bool) -> Any:
        axes = self.figure.add_subplot(1, 1, 1)
        axes.set_xlabel("step")
        axes.set_ylabel("gradient L2 norm (per layer)")
        if log_scale:
            axes.set_yscale("log")
        axes.grid(True, alpha=0.3)
        self.figure.tight_layout()
        return axes

    def _on_read(self, monitor: GradientMonitor) -> None:
        recorded = monitor.recorded
        if recorded is None or len(recorded) - self._drawn_steps < self.every:
            return
        self.update()

    def update(self) -> None:
        """Redraw from everything the monitor has recorded so far.

        This runs inside ``fit`` (from the monitor): an exception is shown in the
        panel's status line rather than raised, so a plotting problem never ends
        the training run.
        """
        try:
            self._update()
            self.status.value = ""
        except Exception:  # shown in the panel, not swallowed: training must go on
            self.status.value = f"<pre style='color:#900'>{traceback.format_exc(limit=3)}</pre>"

    def _update(self) -> None:
        recorded = self.monitor.recorded
        if recorded is None or not len(recorded):
            return
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
        self._drawn_steps = len(recorded)
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
