"""The explorer's image view: walk the straight path from a baseline to the image and watch the gradient.

The whole path is computed at once, when the sample or the output unit
changes, by :func:`~gradmagic.core.integrated_gradients` (gradients kept at
every point of the path); a move of the path slider then only picks the
precomputed arrays and repaints. The SmoothGrad noise slider asks
:func:`~gradmagic.core.saliency` for the whole path again, in batched calls.

Plots: the input at position a on the path, the gradient map there (summed
over channels), the output along the whole path with the current point marked
(dashed: f(baseline) plus the attributions accumulated so far, which meets the
output at a = 1 when the path integral is exact), and the attribution
accumulated from the baseline up to a.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import numpy as np

from gradmagic.core import gradcam, integrated_gradients, saliency
from gradmagic.errors import GradmagicError, GradmagicWarning
from gradmagic.widgets.coalesce import Scheduler
from gradmagic.widgets.figure_view import FigureView
from gradmagic.widgets.view_panel import (
    DEFAULT_CLOCK,
    Recent,
    ViewPanel,
    nonfinite_note,
    output_labels,
    path_slider,
    readout_table,
)

#: Noisy copies per path point for SmoothGrad in the panel (each is a forward and backward pass).
SMOOTH_SAMPLES = 8

#: The output chooser's entry for the predicted class.
PREDICTED = -1


@dataclass
class ImagePath:
    """Everything along the path for one sample and output unit (all numbers from the core).

    Attributes:
        x: The image, ``(H, W, C)``.
        baseline: The path's start, same shape.
        alphas: The positions on the path (0: baseline, 1: image), ``(steps,)``.
        gradients: The gradient at every position, ``(steps, H, W, C)``.
        outputs: The output unit at every position, ``(steps,)``.
        accumulated: The attribution integrated up to every position, ``(steps, H, W, C)``.
        unit: The output unit differentiated.
        completeness_gap: ``sum(attribution) - (f(x) - f(baseline))``.
        notes: What the core said about the numbers (e.g. a completeness gap above 5%).
        gradcam: Grad-CAM at x (at the chosen layer, resized to the image), ``(H, W)``, or None.
        gradcam_layer: The name of Grad-CAM's layer, or None.
    """

    x: np.ndarray
    baseline: np.ndarray
    alphas: np.ndarray
    gradients: np.ndarray
    outputs: np.ndarray
    accumulated: np.ndarray
    unit: int
    completeness_gap: float
    notes: list[str]
    gradcam: np.ndarray | None = None
    gradcam_layer: str | None = None

    def point(self, index: int) -> np.ndarray:
        """The input at position ``alphas[index]``: ``baseline + a (x - baseline)``."""
        return self.baseline + self.alphas[index] * (self.x - self.baseline)


def compute_path(
    model: Any, image: np.ndarray, unit: int | None, baseline: Any, steps: int, gradcam_layer: Any = None
) -> ImagePath:
    """The path from the baseline to ``image`` (one sample, with batch axis), in batched calls of the core.

    Args:
        model: The Keras model (one image input).
        image: ``(1, H, W, C)``.
        unit: The output unit, or None for the predicted class.
        baseline: As for :func:`~gradmagic.core.integrated_gradients`.
        steps: Points on the path.
        gradcam_layer: A layer for Grad-CAM at x (by index or name), or None.
    """
    cam, cam_layer = None, None
    if gradcam_layer is not None:  # first: a layer that does not fit fails before the path is computed
        try:
            cam_result = gradcam(model, image, gradcam_layer, output=unit)
            cam, cam_layer = np.asarray(cam_result.array_at_input)[0], cam_result.layer_name
        except GradmagicError as exc:
            raise GradmagicError(
                f"{str(exc).rstrip('.')} (for gradcam_layer={gradcam_layer!r}). Fix: pass gradcam_layer= a "
                f"convolutional layer of the model (by index or name, see model.summary()), or leave it out."
            ) from exc
    # The result's own check (the completeness gap) is shown in the panel's readout, with its note, rather
    # than warned about once per sample and output chosen.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradmagicWarning)
        result = integrated_gradients(
            model, image, output=unit, baseline=baseline, steps=steps, keep_path_gradients=True
        )
    unit_done = int(result.output[0])
    return ImagePath(
        x=image[0],
        baseline=np.asarray(result.baseline)[0],
        alphas=np.asarray(result.accumulated_alphas),
        gradients=result.path_gradients[0],
        outputs=np.asarray(result.path_outputs)[0],
        accumulated=result.accumulated()[0],
        unit=unit_done,
        completeness_gap=float(result.completeness_gap[0]),
        notes=nonfinite_note(result.path_gradients[0], np.asarray(result.path_alphas)) + list(result.notes),
        gradcam=cam,
        gradcam_layer=cam_layer,
    )


def compute_smooth(model: Any, path: ImagePath, noise: float, samples: int = SMOOTH_SAMPLES) -> np.ndarray:
    """SmoothGrad maps at every point of the path, ``(steps, H, W, C)``, in batched calls of the core."""
    points = np.stack([path.point(i) for i in range(len(path.alphas))]).astype(path.x.dtype)
    return np.asarray(saliency(model, points, output=path.unit, smooth=noise, samples=samples).array)


@dataclass
class ImageView:
    """What the image view shows at one position on the path.

    Attributes:
        path: The :class:`ImagePath`.
        index: The position's index; ``alpha`` is ``path.alphas[index]``.
        gradient: The gradient (or SmoothGrad) map at the position, ``(H, W, C)``.
        noise: The SmoothGrad noise level (0: the plain gradient).
    """

    path: ImagePath
    index: int
    gradient: np.ndarray
    noise: float

    @property
    def alpha(self) -> float:
        return float(self.path.alphas[self.index])


def _display(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """An image for imshow: RGB scaled to [0, 1] by x's range, one channel as 2-D, else the channel mean."""
    scaled = np.clip((image - low) / ((high - low) or 1.0), 0.0, 1.0)
    if image.shape[-1] == 3:
        return scaled
    return scaled[..., 0] if image.shape[-1] == 1 else scaled.mean(axis=-1)


def _heat(values: np.ndarray) -> tuple[np.ndarray, float]:
    """A map summed over channels, and its largest finite magnitude (for a symmetric colour scale)."""
    heat = values.astype(np.float64).sum(axis=-1)
    return heat, float(np.max(np.abs(heat[np.isfinite(heat)]), initial=0.0)) or 1e-12


class ImageFigure:
    """Four plots, built once: input at a, gradient map at a, output along the path, attribution up to a."""

    def __init__(self, figure: Any, shape: tuple[int, ...], gradcam_layer: Any = None) -> None:
        self.figure = figure
        axes = figure.subplots(1, 5 if gradcam_layer is not None else 4)
        self.ax_input, self.ax_grad, self.ax_path, self.ax_attr = axes[:4]
        height, width = shape[:2]
        self.ax_cam = axes[4] if gradcam_layer is not None else None
        self.cam_image = None
        if self.ax_cam is not None:
            self.cam_image = self.ax_cam.imshow(np.zeros((height, width)), cmap="magma", interpolation="nearest")
            self.ax_cam.set_xticks([])
            self.ax_cam.set_yticks([])
        blank = np.zeros((height, width, 3) if shape[-1] == 3 else (height, width))
        self.input_image = self.ax_input.imshow(blank, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        self.grad_image = self.ax_grad.imshow(np.zeros((height, width)), cmap="bwr", interpolation="nearest")
        self.attr_image = self.ax_attr.imshow(np.zeros((height, width)), cmap="bwr", interpolation="nearest")
        (self.path_line,) = self.ax_path.plot([], [], color="tab:blue", label="output")
        (self.sum_line,) = self.ax_path.plot([], [], "--", color="tab:orange", label="f(baseline) + sum(attr)")
        (self.path_point,) = self.ax_path.plot([], [], "o", color="tab:red", zorder=3)
        self.path_cursor = self.ax_path.axvline(0.0, color="tab:red", linewidth=0.8)
        self.ax_path.legend(fontsize=7, loc="best")
        self.ax_path.set_xlabel("a (0: baseline, 1: image)", fontsize=8)
        self.ax_path.set_xlim(0.0, 1.0)
        for ax, title in (
            (self.ax_input, "input at a"),
            # No colour bars (their scale changes with every move): the titles say how to read the colours.
            (self.ax_grad, "gradient at a" + (" (sum over channels)" if shape[-1] > 1 else "") + "\nred +, blue -"),
            (self.ax_path, "output along the path"),
            (self.ax_attr, "attribution up to a\nred +, blue -"),
        ):
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in (self.ax_input, self.ax_grad, self.ax_attr):
            ax.set_xticks([])
            ax.set_yticks([])
        figure.subplots_adjust(left=0.02, right=0.99, bottom=0.15, top=0.88, wspace=0.25)
        for artist in self.artists:
            artist.set_animated(True)

    @property
    def artists(self) -> list[Any]:
        """What a move along the path changes (drawn over the cached background)."""
        return [self.input_image, self.grad_image, self.attr_image, self.path_point, self.path_cursor]

    def set_path(self, path: ImagePath, sums: np.ndarray, output: str) -> None:
        """Draw the output along a new path, and Grad-CAM for it (a full redraw follows).

        ``output`` names the output unit differentiated (in the titles: which class the maps explain).
        """
        self.ax_path.set_title(f"{output} along the path", fontsize=9)
        if self.cam_image is not None and path.gradcam is not None:
            self.cam_image.set_data(path.gradcam)
            self.cam_image.set_clim(0.0, float(np.max(path.gradcam)) or 1e-12)
            self.ax_cam.set_title(f"Grad-CAM of {output} at '{path.gradcam_layer:.16}'", fontsize=9)
        self.path_line.set_data(path.alphas, path.outputs)
        self.sum_line.set_data(path.alphas, sums)
        values = np.concatenate([path.outputs, sums])
        values = values[np.isfinite(values)]  # matplotlib refuses NaN or Inf limits
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        span = (high - low) or max(abs(high), 1e-3) * 0.1
        self.ax_path.set_ylim(low - 0.1 * span, high + 0.1 * span)

    def set_view(self, view: ImageView, low: float, high: float) -> tuple[float, float]:
        """Show one position; return the colour-scale limits of the gradient and attribution maps."""
        path, k = view.path, view.index
        self.input_image.set_data(_display(path.point(k), low, high))
        grad, grad_max = _heat(view.gradient)
        attr, attr_max = _heat(path.accumulated[k])
        self.grad_image.set_data(grad)
        self.grad_image.set_clim(-grad_max, grad_max)
        self.attr_image.set_data(attr)
        self.attr_image.set_clim(-attr_max, attr_max)
        self.path_point.set_data([view.alpha], [path.outputs[k]])
        self.path_cursor.set_xdata([view.alpha, view.alpha])
        return grad_max, attr_max


class ImageExplorer(ViewPanel):
    """The image view; ``gradmagic.explore`` opens it for models on (H, W, C) float images.

    Attributes:
        view: The :class:`ImageView` shown.
        alpha_slider: The position on the path (0: baseline, 1: the image).
        noise_slider: SmoothGrad's noise level (a fraction of the value range at the point; 0: plain gradient).
        sample_select, unit_select: The image of x and the output unit (or the predicted class).
        figure: The :class:`ImageFigure`.
    """

    def __init__(
        self,
        model: Any,
        data: np.ndarray,
        steps: int = 32,
        baseline: Any = None,
        gradcam_layer: Any = None,
        use_ipympl: bool | None = None,
        clock: Callable[[], float] = DEFAULT_CLOCK,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.model, self.data, self.steps, self.baseline = model, data, steps, baseline
        self.gradcam_layer = gradcam_layer
        self.units = output_labels(model)
        self._paths = Recent()
        self._smooth = Recent()
        self.alpha_slider = path_slider(steps)
        self.noise_slider = widgets.FloatSlider(
            value=0.0,
            min=0.0,
            max=0.5,
            step=0.05,
            description="noise",
            continuous_update=False,
            readout_format=".2f",
            layout=widgets.Layout(width="60%"),
        )
        self.sample_select = widgets.BoundedIntText(
            value=0, min=0, max=len(data) - 1, description="sample", layout=widgets.Layout(width="160px")
        )
        options = [("predicted class", PREDICTED)] + [(n, i) for i, n in enumerate(self.units)]
        self.unit_select = widgets.Dropdown(options=options, value=PREDICTED, description="output")
        for control in (self.alpha_slider, self.noise_slider, self.sample_select, self.unit_select):
            control.observe(lambda c: self.updates.submit(self._state()), names="value")
        first = self.compute(self._state())  # before any figure: a failure leaves nothing behind
        width = 10.0 if gradcam_layer is None else 12.0
        self.figure_view = FigureView(figsize=(width, 2.8), use_ipympl=use_ipympl)
        self.figure = ImageFigure(self.figure_view.figure, data.shape[1:], gradcam_layer)
        self.figure_view.animate(self.figure.artists)
        controls = widgets.VBox(
            [self.alpha_slider, self.noise_slider, widgets.HBox([self.sample_select, self.unit_select])]
        )
        self._frame(controls, self.figure_view.widget, clock, scheduler)
        self.view: ImageView | None = None
        self._shown_path: ImagePath | None = None
        self.draw(first)

    def _state(self) -> tuple[int, int, float, float]:
        return (
            int(self.sample_select.value),
            int(self.unit_select.value),
            float(self.noise_slider.value),
            float(self.alpha_slider.value),
        )

    def path(self, sample: int, unit: int) -> ImagePath:
        """The path of one sample and output unit, computed once (the whole path in batched calls)."""
        return self._paths.get(
            (sample, unit),
            lambda: compute_path(
                self.model,
                self.data[sample : sample + 1],
                None if unit == PREDICTED else unit,
                self.baseline,
                self.steps,
                self.gradcam_layer,
            ),
        )

    def compute(self, state: tuple[int, int, float, float]) -> ImageView:
        """The view for ``(sample, unit, noise, alpha)``: a lookup once the path (and its noise level) is known."""
        sample, unit, noise, alpha = state
        path = self.path(sample, unit)
        index = int(np.argmin(np.abs(path.alphas - alpha)))
        if noise > 0:
            gradient = self._smooth.get((sample, unit, noise), lambda: compute_smooth(self.model, path, noise))[index]
        else:
            gradient = path.gradients[index]
        return ImageView(path, index, gradient, noise)

    def _unit_name(self, unit: int) -> str:
        return self.units[unit] if unit < len(self.units) else str(unit)

    def draw(self, view: ImageView) -> None:
        """Show ``view``: the path's curve when it changed (a full redraw), then the maps and the marker."""
        path = view.path
        new_path = path is not self._shown_path
        if new_path:
            sums = path.outputs[0] + path.accumulated.reshape(len(path.alphas), -1).astype(np.float64).sum(axis=1)
            self.figure.set_path(path, sums, self._unit_name(path.unit))
            self._shown_path = path
        low, high = float(path.x.min()), float(path.x.max())
        grad_max, attr_max = self.figure.set_view(view, low, high)
        self.figure_view.show(new_path)
        self.view = view
        k = view.index
        attr_sum = float(path.accumulated[k].astype(np.float64).sum())
        self.readout.value = readout_table(
            [
                ("a", f"{view.alpha:.4g}"),
                (f"output {self._unit_name(path.unit)} at a", f"{path.outputs[k]:.6g}"),
                ("f(baseline) + sum(attribution up to a)", f"{path.outputs[0] + attr_sum:.6g}"),
                ("completeness gap at a = 1", f"{path.completeness_gap:.4g}"),
                ("largest |map| (gradient, attribution)", f"{grad_max:.4g}, {attr_max:.4g}"),
                ("gradient", f"SmoothGrad, noise {view.noise:.2f}" if view.noise > 0 else "plain"),
                *(("note", note) for note in path.notes),
            ]
        )
        self.error.value = ""
