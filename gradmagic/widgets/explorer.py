"""The gradient explorer: sliders move the input point, the gradient plots follow.

``explore(model, x, y)`` returns a panel with one slider per input feature, three
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
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np

from gradmagic.core import (
    input_gradients,
    input_kind,
    model_name,
    model_spec,
    output_labels,
    rollback_on_failure,
    weight_gradients,
)
from gradmagic.errors import GradmagicError, InputError
from gradmagic.plots import ExplorerFigure, layer_norms
from gradmagic.widgets import explorer_args
from gradmagic.widgets.coalesce import LatestWins, Scheduler
from gradmagic.widgets.explorer_view import ExplorerView, compute_view
from gradmagic.widgets.figure_view import FigureView
from gradmagic.widgets.view_args import check_labels, check_samples, check_steps, check_view_options, choose_view

__all__ = ["Explorer", "ExplorerView", "compute_view", "explore"]


def _flat_features(model: Any, x: Any, data: np.ndarray | None) -> np.ndarray:
    """Check that the model takes one flat float vector; return x as (n, n_features).

    ``data`` is x as checked by :func:`explorer_args.check_x` (None for a structure).
    Only a flat x for a model that may take one reaches TensorFlow (which builds an
    unbuilt model and checks the number of features); anything else is refused first.
    """
    if data is not None and data.ndim <= 1:
        data = data.reshape(-1, 1)

    def flat(spec: Any) -> bool:
        inputs = spec.inputs
        return inputs is None or (len(inputs) == 1 and len(inputs[0].shape) == 1 and "float" in inputs[0].dtype)

    spec = model_spec(model)
    if data is not None and data.ndim == 2 and flat(spec):
        input_gradients(model, data[:1])  # builds an unbuilt model; a wrong feature count is the core's error
        spec = model_spec(model)
        if flat(spec):
            return data.astype(spec.inputs[0].dtype if spec.inputs else "float32")
    received = f"x of shape {data.shape}" if data is not None else f"x as a {type(x).__name__} of arrays"
    takes = (
        ", which takes " + ", ".join(f"(batch, {', '.join(str(d) for d in s.shape)}) {s.dtype}" for s in spec.inputs)
        if spec.inputs
        else ""
    )
    raise InputError(
        f"Received: {received} for model '{model_name(model)}'{takes}. Expected a model whose single input is a "
        f"flat float vector and x of shape (n, n_features): the explorer moves one input point with a slider per "
        f"feature. Fix: explore a model on flat features; for images (H, W, C), sequences (T, F) or token ids, "
        f"build the model on a keras.Input of that shape so the explorer opens its image or sequence view; for "
        f"several inputs use gradmagic.input_gradients(model, x)."
    )


def _single_sample(model: Any, data: np.ndarray | None) -> np.ndarray | None:
    """Read a 1-D x as one sample without its batch axis when the model says so.

    A model that declares one flat input of ``len(x) > 1`` features takes such an x
    as one sample, as the core does; for any other model a 1-D x stays a column
    (n rows of one feature). Reads the model's declared inputs only: no TensorFlow call.
    """
    if data is None or data.ndim != 1 or data.size < 2:
        return data
    inputs = model_spec(model).inputs
    return data[None, :] if inputs and len(inputs) == 1 and inputs[0].shape == (data.size,) else data


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
        # Every argument is checked before the first TensorFlow call (in _flat_features).
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
        checked = _single_sample(model, explorer_args.check_x(x))
        if checked is not None and checked.ndim <= 2:
            rows, n_features = (checked.size, 1) if checked.ndim <= 1 else checked.shape
            explorer_args.check_feature_names(feature_names, n_features)
            explorer_args.check_y(y, rows)
        self.model = model
        self.data = _flat_features(model, x, checked)
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
        # DESIGN: exceptions inside a panel callback are shown, never swallowed. A GradmagicError's
        # paragraph says all the user needs; anything else is unexpected, so its whole traceback is shown.
        if isinstance(exc, GradmagicError):
            text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        else:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()
        self.error.value = f"<pre style='color:#b00'>{html.escape(text)}</pre>"

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


def explore(
    model: Any,
    x: Any,
    y: Any = None,
    reference: Callable | None = None,
    reference_grad: Callable | None = None,
    *,
    view: str | None = None,
    labels: Sequence[str] | None = None,
    steps: int = 32,
    baseline: Any = None,
    gradcam_layer: int | str | None = None,
    feature_names: Sequence[str] | None = None,
    points: int = 200,
    training: bool = False,
    max_sliders: int = 6,
    use_ipympl: bool | None = None,
    **unknown: Any,
) -> widgets.VBox:
    """Open the gradient explorer: sliders move the input point, the plots follow.

    The view follows the model's declared input: a flat float vector gets one
    slider per feature (the *vector* view, or with ``view="plane"`` the output
    over two features with the gradient field as arrows); a float sequence
    (T, F) or token ids read by an Embedding get the *sequence* view
    (per-position gradient norms, gradient x input and integrated gradients,
    with a slider along the path from zeros, or zero embeddings, to the
    sample); an image (H, W, C) gets
    the *image* view (a slider along the integrated-gradients path from a
    baseline to the image, SmoothGrad noise, the attribution built up so far).

    Args:
        model: A Keras model with a single input: a flat float vector
            (batch, n_features) (Sequential, Functional or subclassed), or a
            declared (keras.Input) sequence, token ids or image.
        x: Data (n, n_features) or (n,) for one feature: slider ranges come from
            it (padded by 10%), and "reset to sample" picks one of its rows. A
            single sample (n_features,) of a model that declares its inputs is one row.
            For the sequence and image views: the samples to choose from.
        y: Optional targets, one per row of x (vector view). With them the bars show dLoss/dW
            at the point (target: the chosen sample's); without, d(output)/dW.
        view: ``"vector"``, ``"plane"``, ``"sequence"`` or ``"image"``.
            Defaults to None: chosen from the model's input (a flat vector gets
            ``"vector"``; ask for ``"plane"``).
        labels: Sequence view: one label per position (e.g. the tokens), or
            one such list per sample. Defaults to the position numbers.
        steps: Image and sequence views: points on the path from the baseline
            (zeros, or zero embeddings for tokens) to the sample, from 2 to 512.
            Defaults to 32.
        baseline: Image view: where the path starts, as for
            :func:`gradmagic.integrated_gradients` (``None``: zeros, ``"blur"``,
            ``"uniform"`` or an array). Defaults to None.
        gradcam_layer: Image view: a convolutional layer (index or name) whose
            Grad-CAM map at x is shown beside the path's plots. Defaults to None.
        reference: Optional ``f(points) -> values`` drawn dashed beside the model
            (called with an (n, n_features) array), e.g. the analytic curve.
        reference_grad: Optional analytic derivative along the chosen feature
            (an (n, n_features) result is read at that feature's column).
        feature_names: One name per feature (a list, an array, ``df.columns``). Defaults to ``x0``, ``x1``, ...
        points: How many points each curve is drawn with, from 2 to 10000.
            Defaults to 200.
        training: Run the model in training mode (its state is left as it was;
            vector and plane views only). Defaults to False.
        max_sliders: With more features than this, one slider plus a feature
            dropdown. Defaults to 6.
        use_ipympl: True for an interactive ipympl canvas, False for PNG images.
            Defaults to None (ipympl when installed).
        **unknown: Refused with the closest option's name (a typo is an error,
            not a silently ignored keyword).

    Returns:
        An :class:`Explorer` widget; display it (it is the cell's last value).

    Raises:
        GradmagicError: An argument has the wrong type or value (checked before
            any TensorFlow call), the model's input is not a flat float vector,
            x and y do not fit it, or ``reference``/``reference_grad`` fails at
            the first point (a :class:`~gradmagic.errors.ComputeError` chaining
            the original exception). Later failures of the references, on a
            slider move, are shown in the panel.

    Example:
        >>> gm.explore(model, x, y, reference=lambda p: (p - 5) ** 2 / 25,
        ...            reference_grad=lambda p: 2 * (p - 5) / 25)
        >>> gm.explore(model, x, view="plane")
        >>> gm.explore(cnn, images[:8], baseline="blur")
        >>> gm.explore(text_model, ids[:20], labels=tokens[:20])
    """
    explorer_args.check_unknown(unknown)
    chosen = choose_view(model, view)
    check_view_options(
        chosen,
        {"labels": labels is not None, "steps": steps != 32, "baseline": baseline is not None,
         "gradcam_layer": gradcam_layer is not None},
    )  # fmt: skip
    if chosen != "vector":
        # The other views' own options first, before anything runs.
        explorer_args.check_options(model, reference, reference_grad, feature_names, points, training, max_sliders,
                                    use_ipympl)  # fmt: skip
        if training and chosen in ("sequence", "image"):
            raise GradmagicError(
                f"Received: training=True with view={chosen!r}. Expected training=False: the {chosen} view walks "
                f"the integrated-gradients path, which runs the model in inference mode. Fix: drop training=True."
            )
        if reference is not None or reference_grad is not None or y is not None:
            raise GradmagicError(
                f"Received: {'y' if y is not None else 'reference'}=... with view={chosen!r}. Expected them only for "
                f"the vector view (curves along one feature, dLoss/dW bars). Fix: drop them, e.g. "
                f"gm.explore(model, x, view={chosen!r})."
            )
        with rollback_on_failure(model):
            return _open_view(
                chosen, model, x, labels, steps, baseline, gradcam_layer, feature_names, training, use_ipympl
            )
    return Explorer(
        model,
        x,
        y,
        reference,
        reference_grad,
        feature_names=feature_names,
        points=points,
        training=training,
        max_sliders=max_sliders,
        use_ipympl=use_ipympl,
    )


def _open_view(
    kind: str, model: Any, x: Any, labels: Any, steps: Any, baseline: Any, gradcam_layer: Any, feature_names: Any,
    training: bool, use_ipympl: bool | None,
) -> widgets.VBox:  # fmt: skip
    """Check the data for the plane, sequence or image view and open it."""
    if kind == "plane":
        from gradmagic.widgets.plane import PlaneExplorer

        checked = _single_sample(model, explorer_args.check_x(x))
        data = _flat_features(model, x, checked)
        if data.shape[1] < 2:
            raise InputError(
                f"Received: x with {data.shape[1]} feature for view='plane'. Expected two features or more: the "
                f"plane view shows the output over two of them. Fix: leave view out for one feature."
            )
        names = explorer_args.check_feature_names(feature_names, data.shape[1])
        return PlaneExplorer(model, data, names, training=training, use_ipympl=use_ipympl)
    data = check_samples(model, x, kind)
    if kind == "sequence":
        from gradmagic.widgets.sequence import SequenceExplorer

        tokens = input_kind(model) == "tokens"
        steps = check_steps(steps)
        return SequenceExplorer(model, data, tokens, check_labels(labels, len(data), data.shape[1]), steps, use_ipympl)
    from gradmagic.widgets.image import ImageExplorer

    return ImageExplorer(model, data, check_steps(steps), baseline, gradcam_layer, use_ipympl=use_ipympl)
