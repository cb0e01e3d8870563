"""FigureView: one widget repainted in place; animated artists blitted over a cached background."""

from __future__ import annotations

import io

import ipywidgets as widgets
import numpy as np
import pytest
from PIL import Image

from gradmagic.widgets.figure_view import FigureView

RED, WHITE, BLUE = (255, 0, 0), (255, 255, 255), (0, 0, 255)


def _view(use_ipympl: bool = False):
    view = FigureView((2, 2), dpi=50, use_ipympl=use_ipympl)
    ax = view.figure.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    ax.set_axis_off()
    (dot,) = ax.plot([2], [2], "s", color="red", markersize=12, animated=True)
    view.animate([dot])
    return view, ax, dot


def _png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _color_at(pixels: np.ndarray, ax, x: float, y: float) -> tuple[int, ...]:
    px, py = ax.transData.transform((x, y))
    return tuple(int(c) for c in pixels[pixels.shape[0] - 1 - int(py), int(px)][:3])  # rows count from the top


def test_a_moved_artist_is_repainted_into_the_same_image_widget():
    view, ax, dot = _view()
    widget = view.widget
    assert isinstance(widget, widgets.Image)
    view.show(background_changed=True)
    first = _png_pixels(widget.value)
    assert _color_at(first, ax, 2, 2) == RED and _color_at(first, ax, 7, 7) == WHITE
    dot.set_data([7], [7])
    view.show(background_changed=False)
    assert view.widget is widget and view.full_draws == 1  # blitted, not redrawn
    moved = _png_pixels(widget.value)
    assert _color_at(moved, ax, 7, 7) == RED and _color_at(moved, ax, 2, 2) == WHITE


def test_the_background_is_redrawn_only_when_the_caller_says_it_changed():
    view, ax, _ = _view()
    view.show(background_changed=True)
    view.figure.set_facecolor("blue")
    view.show(background_changed=False)
    assert _color_at(_png_pixels(view.widget.value), ax, 5, 5) == WHITE  # the cached background
    view.show(background_changed=True)
    assert _color_at(_png_pixels(view.widget.value), ax, 5, 5) == BLUE and view.full_draws == 2


def test_the_first_show_draws_everything_whatever_the_caller_says():
    view, ax, _ = _view()
    view.show(background_changed=False)
    assert view.full_draws == 1 and _color_at(_png_pixels(view.widget.value), ax, 2, 2) == RED


def test_savefig_includes_the_animated_artists(tmp_path):
    view, ax, dot = _view()
    view.show(background_changed=True)
    path = tmp_path / "figure.png"
    view.savefig(str(path))
    assert _color_at(_png_pixels(path.read_bytes()), ax, 2, 2) == RED
    assert dot.get_animated()  # still blitted afterwards


def test_with_ipympl_the_canvas_itself_is_the_widget_and_is_blitted():
    pytest.importorskip("ipympl")
    view, ax, dot = _view(use_ipympl=True)
    assert view.widget is view.canvas and isinstance(view.widget, widgets.DOMWidget)
    view.show(background_changed=True)
    dot.set_data([7], [7])
    view.show(background_changed=False)
    pixels = np.asarray(view.canvas.buffer_rgba())
    assert _color_at(pixels, ax, 7, 7) == RED and _color_at(pixels, ax, 2, 2) == WHITE and view.full_draws == 1
