"""The explorer's plane view: the output over two features, the gradient field as arrows, a point moved by sliders.

The other features stay at the chosen sample's values. The grid (the output
and its gradient at every grid point) is one batched
:func:`~gradmagic.core.input_gradients` call, made again only when the
features, the sample or the output unit change; a slider move asks the core
about the one point and repaints the point and its arrow over the cached
background.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import numpy as np

from gradmagic.core import input_gradients
from gradmagic.widgets.coalesce import Scheduler
from gradmagic.widgets.figure_view import FigureView
from gradmagic.widgets.view_panel import DEFAULT_CLOCK, ViewPanel, output_labels, readout_table


@dataclass
class PlaneGrid:
    """The output unit and its gradient on a grid over two features (rows: ``ys``, columns: ``xs``).

    Attributes:
        fx, fy: The features on the horizontal and vertical axes.
        xs, ys: The grid's values of those features.
        values: The output unit, ``(len(ys), len(xs))``.
        grad_x, grad_y: d(output unit)/d(feature fx) and d/d(feature fy), same shape.
    """

    fx: int
    fy: int
    xs: np.ndarray
    ys: np.ndarray
    values: np.ndarray
    grad_x: np.ndarray
    grad_y: np.ndarray


@dataclass
class PlaneView:
    """What the plane view shows: the grid and the point.

    Attributes:
        grid: The :class:`PlaneGrid`.
        point: The input point, ``(n_features,)``.
        value: The output unit at the point.
        gradient: d(output unit)/d(input) at the point, ``(n_features,)``.
    """

    grid: PlaneGrid
    point: np.ndarray
    value: float
    gradient: np.ndarray


def _unit_values(values: Any, unit: int) -> np.ndarray:
    parts = values if isinstance(values, list) else [values]
    return np.concatenate([np.reshape(p, (p.shape[0], -1)) for p in parts], axis=1)[:, unit]


def compute_grid(
    model: Any,
    base: np.ndarray,
    fx: int,
    fy: int,
    xs: np.ndarray,
    ys: np.ndarray,
    unit: int = 0,
    training: bool = False,
) -> PlaneGrid:
    """The output unit and its gradient over the grid ``xs`` x ``ys`` of features fx and fy, in one batched call.

    Args:
        model: The Keras model (one flat float input).
        base: The point whose other features are held, ``(n_features,)``.
        fx, fy: The two features.
        xs, ys: Their values on the grid.
        unit: The output unit (index into the flattened per-sample output).
        training: Run the model in training mode.
    """
    grid_x, grid_y = np.meshgrid(xs, ys)
    points = np.repeat(base[None, :], grid_x.size, axis=0)
    points[:, fx], points[:, fy] = grid_x.ravel(), grid_y.ravel()
    jac = input_gradients(model, points, output=unit, training=training)
    grads = np.asarray(jac.array).reshape(len(points), -1)
    shape = grid_x.shape
    return PlaneGrid(
        fx,
        fy,
        xs,
        ys,
        _unit_values(jac.values, unit).reshape(shape),
        grads[:, fx].reshape(shape),
        grads[:, fy].reshape(shape),
    )


def compute_point(model: Any, point: np.ndarray, unit: int = 0, training: bool = False) -> tuple[float, np.ndarray]:
    """The output unit and its gradient at one point."""
    jac = input_gradients(model, point[None, :], output=unit, training=training)
    return float(_unit_values(jac.values, unit)[0]), np.asarray(jac.array).reshape(-1)


class PlaneFigure:
    """One axes: the output as an image with contour lines, the gradient field as arrows, the point and its arrow.

    The image, arrows and contours change with the grid (a full redraw); the
    point and its arrow are animated artists, repainted over the cached background.
    """

    def __init__(self, figure: Any, size: int) -> None:
        self.figure = figure
        self.ax = figure.subplots()
        self.image = self.ax.imshow(np.zeros((size, size)), origin="lower", aspect="auto", cmap="viridis")
        self.colorbar = figure.colorbar(self.image, ax=self.ax)
        zeros = np.zeros(size * size)
        self.arrows = self.ax.quiver(
            zeros, zeros, zeros, zeros, angles="xy", scale_units="xy", scale=1.0, color="white", width=0.003
        )
        (self.point,) = self.ax.plot([], [], "o", color="tab:red", markersize=8, zorder=4)
        self.point_arrow = self.ax.quiver(
            [0.0],
            [0.0],
            [0.0],
            [0.0],
            angles="xy",
            scale_units="xy",
            scale=1.0,
            color="tab:red",
            width=0.008,
            zorder=5,
        )
        self.contours: Any = None
        self.scale = 1.0
        self.ax.tick_params(labelsize=8)
        figure.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.9)
        for artist in self.artists:
            artist.set_animated(True)

    @property
    def artists(self) -> list[Any]:
        """The artists that move with the point."""
        return [self.point, self.point_arrow]

    def set_grid(self, grid: PlaneGrid, names: Sequence[str], output: str) -> None:
        """Show a new grid: image, contour lines and arrows (scaled so the longest is one grid cell)."""
        xs, ys = grid.xs, grid.ys
        self.image.set_data(grid.values)
        self.image.set_extent((xs[0], xs[-1], ys[0], ys[-1]))
        low, high = float(np.min(grid.values)), float(np.max(grid.values))
        self.image.set_clim(low, high if high > low else low + 1e-6)
        if self.contours is not None:
            self.contours.remove()
        self.contours = self.ax.contour(xs, ys, grid.values, levels=8, colors="k", linewidths=0.6, alpha=0.5)
        cell_x, cell_y = (xs[-1] - xs[0]) / (len(xs) - 1), (ys[-1] - ys[0]) / (len(ys) - 1)
        # Arrow components in data units with one factor for both, so an arrow points along the gradient
        # in feature units; the longest arrow spans about one grid cell.
        longest = float(np.max(np.hypot(grid.grad_x / cell_x, grid.grad_y / cell_y))) or 1.0
        self.scale = 0.9 / longest
        grid_x, grid_y = np.meshgrid(xs, ys)
        self.arrows.set_offsets(np.column_stack([grid_x.ravel(), grid_y.ravel()]))
        self.arrows.set_UVC(grid.grad_x.ravel() * self.scale, grid.grad_y.ravel() * self.scale)
        self.ax.set_xlim(xs[0], xs[-1])
        self.ax.set_ylim(ys[0], ys[-1])
        self.ax.set_xlabel(names[grid.fx], fontsize=9)
        self.ax.set_ylabel(names[grid.fy], fontsize=9)
        self.ax.set_title(f"{output} over ({names[grid.fx]}, {names[grid.fy]}); arrows: gradient", fontsize=10)

    def set_point(self, view: PlaneView) -> None:
        """Move the point and its gradient arrow."""
        fx, fy = view.grid.fx, view.grid.fy
        self.point.set_data([view.point[fx]], [view.point[fy]])
        self.point_arrow.set_offsets([[view.point[fx], view.point[fy]]])
        self.point_arrow.set_UVC([view.gradient[fx] * self.scale], [view.gradient[fy] * self.scale])


class PlaneExplorer(ViewPanel):
    """The plane view; build it with ``gradmagic.explore(model, x, view="plane")``.

    Attributes:
        view: The :class:`PlaneView` shown.
        x_select, y_select: The features on the axes.
        x_slider, y_slider: Move the point along them.
        figure: The :class:`PlaneFigure`.
    """

    def __init__(
        self,
        model: Any,
        data: np.ndarray,
        names: Sequence[str],
        grid_size: int = 21,
        training: bool = False,
        use_ipympl: bool | None = None,
        clock: Callable[[], float] = DEFAULT_CLOCK,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.model, self.data, self.names, self.training = model, data, list(names), training
        self.grid_size = grid_size
        low, high = data.min(axis=0).astype(float), data.max(axis=0).astype(float)
        pad = np.where(high > low, 0.1 * (high - low), np.maximum(1.0, 0.1 * np.abs(low)))
        self.low, self.high = low - pad, high + pad
        self.units = output_labels(model)
        self.sample = 0
        self.point = data[0].copy()
        self._grid_key: tuple | None = None
        self._grid: PlaneGrid | None = None
        options = [(n, i) for i, n in enumerate(self.names)]
        self.x_select = widgets.Dropdown(options=options, value=0, description="x axis")
        self.y_select = widgets.Dropdown(options=options, value=1, description="y axis")
        self.x_slider = self._slider(0)
        self.y_slider = self._slider(1)
        self.sample_select = widgets.BoundedIntText(
            value=0, min=0, max=len(data) - 1, description="sample", layout=widgets.Layout(width="160px")
        )
        self.unit_select = widgets.Dropdown(
            options=[(n, i) for i, n in enumerate(self.units)], value=0, description="output"
        )
        self._quiet = False
        self.x_slider.observe(lambda c: self._on_slider(self.x_select.value, c["new"]), names="value")
        self.y_slider.observe(lambda c: self._on_slider(self.y_select.value, c["new"]), names="value")
        self.x_select.observe(lambda c: self._on_axes(), names="value")
        self.y_select.observe(lambda c: self._on_axes(), names="value")
        self.sample_select.observe(lambda c: self.reset_to_sample(c["new"]), names="value")
        self.unit_select.observe(lambda c: self.updates.submit(self._state()), names="value")
        first = self.compute(self._state())  # before any figure: a failure leaves nothing behind
        self.figure_view = FigureView(figsize=(6.4, 4.6), use_ipympl=use_ipympl)
        self.figure = PlaneFigure(self.figure_view.figure, grid_size)
        self.figure_view.animate(self.figure.artists)
        # With ipympl the canvas reports clicks: a click on the plot moves the point there.
        self.figure_view.canvas.mpl_connect("button_press_event", self._on_click)
        row = widgets.HBox([self.x_select, self.y_select, self.sample_select, self.unit_select])
        self._frame(widgets.VBox([row, self.x_slider, self.y_slider]), self.figure_view.widget, clock, scheduler)
        self.view: PlaneView | None = None
        self._shown_grid: PlaneGrid | None = None
        self.draw(first)

    def _slider(self, feature: int) -> widgets.FloatSlider:
        low, high = float(self.low[feature]), float(self.high[feature])
        return widgets.FloatSlider(
            value=float(self.point[feature]),
            min=low,
            max=high,
            step=(high - low) / 200,
            description=self.names[feature],
            continuous_update=True,
            readout_format=".4g",
            layout=widgets.Layout(width="60%"),
        )

    def _quietly(self, change: Callable[[], None]) -> None:
        self._quiet = True
        try:
            change()
        finally:
            self._quiet = False

    def _retarget(self, slider: widgets.FloatSlider, feature: int) -> None:
        low, high = float(self.low[feature]), float(self.high[feature])
        slider.min, slider.max = min(low, slider.min), max(high, slider.max)  # widen first: no clipping
        slider.value = float(self.point[feature])
        slider.min, slider.max, slider.step = low, high, (high - low) / 200
        slider.description = self.names[feature]

    def _retarget_sliders(self) -> None:
        """Point both sliders at the features on the axes, at the point's values."""
        self._retarget(self.x_slider, self.x_select.value)
        self._retarget(self.y_slider, self.y_select.value)

    def _on_slider(self, feature: int, value: float) -> None:
        if self._quiet:
            return
        self.point[feature] = value
        self.updates.submit(self._state())

    def _on_axes(self) -> None:
        if self._quiet:
            return
        if self.x_select.value == self.y_select.value:
            self.error.value = (
                "<pre style='color:#b00'>Received: the same feature on both axes. Expected two different features. "
                "Fix: pick another feature for one axis.</pre>"
            )
            return
        self._quietly(self._retarget_sliders)
        self.updates.submit(self._state())

    def reset_to_sample(self, row: int) -> None:
        """Hold the other features at row ``row`` of x and move the point there."""
        self.sample = int(row)
        self.point = self.data[self.sample].copy()
        self._quietly(self._retarget_sliders)
        self.updates.submit(self._state())

    def _on_click(self, event: Any) -> None:
        if event.inaxes is not self.figure.ax or event.xdata is None or event.ydata is None:
            return
        x_value = min(max(float(event.xdata), self.x_slider.min), self.x_slider.max)
        y_value = min(max(float(event.ydata), self.y_slider.min), self.y_slider.max)
        self.set_point(x_value, y_value)

    def set_point(self, x_value: float, y_value: float) -> None:
        """Move the two sliders, as a user would."""
        self.x_slider.value = float(x_value)
        self.y_slider.value = float(y_value)

    def _state(self) -> tuple:
        return (self.point.copy(), self.x_select.value, self.y_select.value, self.unit_select.value, self.sample)

    def compute(self, state: tuple) -> PlaneView:
        """The numbers for a control state ``(point, fx, fy, unit, sample)``: the grid is reused while it holds."""
        point, fx, fy, unit, sample = state
        key = (fx, fy, unit, sample)
        if key != self._grid_key:
            xs = np.linspace(self.low[fx], self.high[fx], self.grid_size).astype(self.data.dtype)
            ys = np.linspace(self.low[fy], self.high[fy], self.grid_size).astype(self.data.dtype)
            self._grid = compute_grid(self.model, self.data[sample], fx, fy, xs, ys, unit, self.training)
            self._grid_key = key
        value, gradient = compute_point(self.model, point, unit, self.training)
        return PlaneView(self._grid, point, value, gradient)

    def draw(self, view: PlaneView) -> None:
        """Show ``view``: the grid when it changed (a full redraw), then the point."""
        new_grid = view.grid is not self._shown_grid
        if new_grid:
            self.figure.set_grid(view.grid, self.names, self.units[self.unit_select.value])
            self._shown_grid = view.grid
        self.figure.set_point(view)
        self.figure_view.show(new_grid)
        self.view = view
        fx, fy = view.grid.fx, view.grid.fy
        unit = self.units[self.unit_select.value]
        self.readout.value = readout_table(
            [
                ("point", ", ".join(f"{n}={v:.6g}" for n, v in zip(self.names, view.point))),
                (unit, f"{view.value:.6g}"),
                (f"d {unit} / d {self.names[fx]}", f"{view.gradient[fx]:.6g}"),
                (f"d {unit} / d {self.names[fy]}", f"{view.gradient[fy]:.6g}"),
                ("gradient", ", ".join(f"{g:.4g}" for g in view.gradient)),
            ]
        )
        self.error.value = ""
