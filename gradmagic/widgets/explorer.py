"""The explorer's vector view: sliders move the input point, the gradient plots follow.

``explore(model, x, y)`` (in :mod:`~gradmagic.widgets.views`) opens it for a model on flat
features: a panel with one slider per input feature, three
plots (the output along a feature, its derivative, per-layer gradient norms)
and a readout of the exact numbers. Every number comes from the core
(:func:`~gradmagic.core.input_gradients`, :func:`~gradmagic.core.weight_gradients`);
this module only arranges controls, and :func:`compute_view` (in
:mod:`~gradmagic.widgets.explorer_view`) is a plain function of the control
values. Figures are built once and updated in place; slider events are
coalesced so the latest value wins.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np

from gradmagic.core import (
    input_gradients,
    model_spec,
    output_labels,
    rollback_on_failure,
    weight_gradients,
)
from gradmagic.errors import GradmagicError
from gradmagic.plots import ExplorerFigure, layer_norms
from gradmagic.widgets import explorer_args
from gradmagic.widgets.coalesce import LatestWins, Scheduler
from gradmagic.widgets.explorer_view import ExplorerView, compute_view
from gradmagic.widgets.figure_view import FigureView
from gradmagic.widgets.flat_data import flat_features, single_sample
from gradmagic.widgets.view_panel import error_html

__all__ = ["Explorer", "ExplorerView", "compute_view"]


def _nice_step(span: float, moves: int = 200) -> float:
    """A slider step of 1, 2 or 5 times a power of ten, about ``span / moves``."""
    raw = span / moves
    power = 10.0 ** np.floor(np.log10(raw))
    return float(next(m * power for m in (1.0, 2.0, 5.0, 10.0) if m * power >= raw * 0.999))


def _output_units(model: Any, sample: np.ndarray) -> list[str]:
    values = input_gradients(model, sample[:1], output=0).values
    parts = values if isinstance(values, list) else [values]
    names = output_labels(model_spec(model).output_names, len(parts))
    labels = []
    for name, part in zip(names, parts):
        size = int(np.prod(part.shape[1:]))
        labels += [name] if size == 1 else [f"{name}[{i}]" for i in range(size)]
    return labels


class Explorer(widgets.VBox):
    """The explorer panel; build it with :func:`explore`.

    Attributes:
        view: The :class:`ExplorerView` currently shown.
        sliders: One ``FloatSlider`` per feature (or one slider with a feature
            dropdown for many features).
        figure: The :class:`~gradmagic.plots.ExplorerFigure`.
    """

    def __init__(
        self,
        model: Any,
        x: Any,
        y: Any = None,
        reference: Callable | None = None,
        reference_grad: Callable | None = None,
        feature_names: Sequence[str] | None = None,
        points: int = 200,
        training: bool = False,
        max_sliders: int = 6,
        use_ipympl: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        scheduler: Scheduler | None = None,
    ) -> None:
        # Every argument is checked before the first TensorFlow call (in flat_features).
        explorer_args.check_options(
            model, reference, reference_grad, feature_names, points, training, max_sliders, use_ipympl
        )
        if not callable(clock) or (scheduler is not None and not callable(scheduler)):
            raise GradmagicError(
                f"Received: clock={explorer_args.describe(clock)}, scheduler={explorer_args.describe(scheduler)}. "
                f"Expected callables (scheduler may be None). Fix: leave both out."
            )
        # A failure after the model was built on the way (x, y or a reference that does not fit) leaves an
        # unbuilt model unbuilt, as every core function does.
        with rollback_on_failure(model):
            self._setup(model, x, y, reference, reference_grad, feature_names, points, training, max_sliders)
            self._show(use_ipympl, clock, scheduler)

    def _setup(
        self,
        model: Any,
        x: Any,
        y: Any,
        reference: Callable | None,
        reference_grad: Callable | None,
        feature_names: Sequence[str] | None,
        points: int,
        training: bool,
        max_sliders: int,
    ) -> None:
        """Read the data and set up the controls (no figure yet); the options are checked already."""
        checked = single_sample(model, explorer_args.check_x(x))
        if checked is not None and checked.ndim <= 2:
            rows, n_features = (checked.size, 1) if checked.ndim <= 1 else checked.shape
            explorer_args.check_feature_names(feature_names, n_features)
            explorer_args.check_y(y, rows)
        self.model = model
        self.data = flat_features(model, x, checked)
        self.targets = explorer_args.check_y(y, len(self.data))
        n_features = self.data.shape[1]
        self.names = explorer_args.check_feature_names(feature_names, n_features)
        self.reference, self.reference_grad = reference, reference_grad
        self.training = training
        self.points = points
        low, high = self.data.min(axis=0).astype(float), self.data.max(axis=0).astype(float)
        # A feature with one value gets a range around it that float32 can still resolve (1e30 +- 1 cannot).
        pad = np.where(high > low, 0.1 * (high - low), np.maximum(1.0, 0.1 * np.abs(low)))
        self.steps = np.array([_nice_step(span) for span in (high - low) + 2 * pad])
        # Ranges on the step grid, so round values (x = 0.5) are reachable exactly.
        self.low = np.floor((low - pad) / self.steps) * self.steps
        self.high = np.ceil((high + pad) / self.steps) * self.steps
        self.point = self._snapped(self.data[0])
        self.feature = 0
        self.unit = 0
        self.sample = 0
        self.units = _output_units(model, self.data)
        self._quiet = False
        self._build_controls(max_sliders)
        self.view: ExplorerView | None = None

    def _show(self, use_ipympl: bool | None, clock: Callable[[], float], scheduler: Scheduler | None) -> None:
        """Compute the first view, then build the figure and the panel around it."""
        # The first view is computed before any figure exists: a reference that fails leaves nothing behind.
        first = self.compute(self._state())
        labels = [label for label, _, _ in self._bar_layers()]
        title = "dLoss/dW norm per layer" if self.targets is not None else "d(output)/dW norm per layer"
        self.figure_view = FigureView(figsize=(9.6, 3.2), use_ipympl=use_ipympl)
        self.figure = ExplorerFigure(self.figure_view.figure, labels, title)
        self.figure_view.animate(self.figure.artists)
        self.readout = widgets.HTML()
        self.error = widgets.HTML()
        self.updates = LatestWins(self._render, clock=clock, scheduler=scheduler, on_error=self._show_error)
        super().__init__(
            [self.controls, self.figure_view.widget, self.readout, self.error],
            layout=widgets.Layout(width="100%"),
        )
        self.add_class("gradmagic-explorer")
        self.draw(first)

    # --- controls ------------------------------------------------------------------------------------------------

    def _build_controls(self, max_sliders: int) -> None:
        n_features = self.data.shape[1]
        self.feature_select = widgets.Dropdown(
            options=[(n, i) for i, n in enumerate(self.names)], value=0, description="along"
        )
        if n_features <= max_sliders:
            self.sliders = [self._slider(i) for i in range(n_features)]
        else:
            self.sliders = [self._slider(0)]
            self.feature_select.description = "feature"
        for index, slider in enumerate(self.sliders):
            slider.observe(lambda change, index=index: self._on_slider(index, change["new"]), names="value")
        self.feature_select.observe(lambda change: self._on_feature(change["new"]), names="value")
        self.sample_select = widgets.BoundedIntText(
            value=0, min=0, max=len(self.data) - 1, description="sample", layout=widgets.Layout(width="160px")
        )
        self.reset_button = widgets.Button(description="reset to sample", icon="undo")
        self.reset_button.on_click(lambda _: self.reset_to_sample(self.sample_select.value))
        self.unit_select = widgets.Dropdown(
            options=[(n, i) for i, n in enumerate(self.units)], value=0, description="output"
        )
        self.unit_select.observe(lambda change: self._on_unit(change["new"]), names="value")
        row = [self.feature_select, self.sample_select, self.reset_button]
        if len(self.units) > 1:
            row.append(self.unit_select)
        self.controls = widgets.VBox([*self.sliders, widgets.HBox(row)])

    def _slider(self, feature: int) -> widgets.FloatSlider:
        low, high = float(self.low[feature]), float(self.high[feature])
        return widgets.FloatSlider(
            value=self._snap(feature, self.point[feature]),
            min=low,
            max=high,
            step=float(self.steps[feature]),
            description=self.names[feature],
            continuous_update=True,
            readout_format=".4g",
            layout=widgets.Layout(width="60%"),
        )

    def _single_slider(self) -> bool:
        return len(self.sliders) == 1 and self.data.shape[1] > 1

    def _on_slider(self, index: int, value: float) -> None:
        if self._quiet:
            return
        feature = self.feature if self._single_slider() else index
        self.point[feature] = value
        if feature != self.feature:
            self.feature = feature
            self._quietly(lambda: setattr(self.feature_select, "value", feature))
        self.updates.submit(self._state())

    def _on_feature(self, feature: int) -> None:
        if self._quiet:
            return
        self.feature = feature
        if self._single_slider():
            self._quietly(lambda: self._retarget_slider(feature))
        self.updates.submit(self._state())

    def _retarget_slider(self, feature: int) -> None:
        """Point the single slider at another feature (its range and value)."""
        slider = self.sliders[0]
        low, high = float(self.low[feature]), float(self.high[feature])
        slider.description = self.names[feature]
        # Widen first so the new value is never clipped to the old range.
        slider.min, slider.max = min(low, slider.min), max(high, slider.max)
        slider.value = self._snap(feature, self.point[feature])
        slider.min, slider.max, slider.step = low, high, float(self.steps[feature])

    def _quietly(self, change: Callable[[], None]) -> None:
        """Change controls from code without their observers acting on it."""
        self._quiet = True
        try:
            change()
        finally:
            self._quiet = False

    def _on_unit(self, unit: int) -> None:
        self.unit = unit
        self.updates.submit(self._state())

    def _snap(self, feature: int, value: float) -> float:
        """The slider position nearest to ``value``.

        Every value the kernel gives a slider is on its step grid: a browser
        slider moves an off-grid value to the grid and sends it back, and that
        late echo would undo the kernel's next move (as after ``set_point``).
        """
        low, step = float(self.low[feature]), float(self.steps[feature])
        snapped = low + round((float(value) - low) / step) * step
        return round(min(max(snapped, low), float(self.high[feature])), 12)

    def _snapped(self, row: np.ndarray) -> np.ndarray:
        return np.array([self._snap(f, v) for f, v in enumerate(row)], dtype=self.data.dtype)

    def reset_to_sample(self, row: int) -> None:
        """Move the point to row ``row`` of x, on the slider grid (its target becomes the loss target).

        Raises:
            GradmagicError: ``row`` is not an int in ``[0, len(x) - 1]``.
        """
        explorer_args.check_row(row, len(self.data))
        self.sample = int(row)
        self.point = self._snapped(self.data[self.sample])

        def move_sliders() -> None:
            for index, slider in enumerate(self.sliders):
                feature = self.feature if self._single_slider() else index
                slider.value = self._snap(feature, self.point[feature])

        self._quietly(move_sliders)
        self.updates.submit(self._state())

    def set_point(self, values: Sequence[float]) -> None:
        """Move the sliders to ``values`` (one per feature, each snapped to its slider's step), as a user would.

        Raises:
            GradmagicError: Not one finite number per feature.
        """
        explorer_args.check_point(values, self.names)
        for feature, value in enumerate(values):
            value = self._snap(feature, value)
            if self._single_slider():
                self.feature_select.value = feature
                self.sliders[0].value = value
            else:
                self.sliders[feature].value = value

    # --- rendering -----------------------------------------------------------------------------------------------

    def _state(self) -> tuple:
        return (self.point.copy(), self.feature, self.unit, self.sample)

    def _bar_layers(self) -> list[tuple[str, float | None, bool]]:
        target = None if self.targets is None else self.targets[:1]
        if target is not None:
            result = weight_gradients(self.model, self.data[:1], target, training=self.training)
        else:
            result = weight_gradients(self.model, self.data[:1], None, output=0, training=self.training)
        return layer_norms([result])

    def compute(self, state: tuple) -> ExplorerView:
        """The numbers for a control state ``(point, feature, unit, sample)``."""
        point, feature, unit, sample = state
        line = np.linspace(self.low[feature], self.high[feature], self.points, dtype=self.data.dtype)
        target = None if self.targets is None else self.targets[sample : sample + 1]
        return compute_view(
            self.model,
            point,
            feature,
            line,
            unit,
            target,
            self.reference,
            self.reference_grad,
            self.training,
        )

    def _render(self, state: tuple) -> None:
        view = self.compute(state)
        self.draw(view)

    def draw(self, view: ExplorerView) -> None:
        """Show ``view``: move the artists, redraw the canvas, refresh the readout."""
        self.view = view
        has_reference = self.reference is not None or self.reference_grad is not None
        titles_changed = self.figure.set_labels(self.names[view.feature], self.units[view.unit], has_reference)
        limits_changed = self.figure.update(view)
        self.figure_view.show(titles_changed or limits_changed)
        self.readout.value = self._readout_html(view)
        self.error.value = ""

    def _show_error(self, exc: BaseException) -> None:
        self.error.value = error_html(exc)

    def _readout_html(self, view: ExplorerView) -> str:
        point = ", ".join(f"{name}={value:.6g}" for name, value in zip(self.names, view.point))
        unit, feature = html.escape(self.units[view.unit]), html.escape(self.names[view.feature])
        rows = [
            ("point", html.escape(point)),
            (f"{unit}", f"{view.point_value:.6g}"),
            (f"d {unit} / d {feature}", f'<span class="gm-derivative">{view.point_grad:.6g}</span>'),
        ]
        if view.reference_point_grad is not None:
            rows.append((f"reference d/d {feature}", f"{view.reference_point_grad:.6g}"))
        if self.data.shape[1] > 1:
            rows.append(("gradient", ", ".join(f"{g:.4g}" for g in view.gradient)))
        what = "loss" if self.targets is not None else unit
        rows.append(
            (f"{what} at sample {self.sample}" if self.targets is not None else "mean " + what, f"{view.loss:.6g}")
        )
        cells = "".join(f"<tr><td style='padding-right:1em'>{k}</td><td><code>{v}</code></td></tr>" for k, v in rows)
        return f"<table class='gm-readout'>{cells}</table>"


def __getattr__(name: str) -> Any:
    # ``explore`` lives in :mod:`gradmagic.widgets.views` (it picks one of the views, this one among them);
    # ``from gradmagic.widgets.explorer import explore`` keeps working.
    if name == "explore":
        from gradmagic.widgets.views import explore

        return explore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
