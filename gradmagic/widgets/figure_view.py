"""Show a matplotlib figure as a widget that repaints in place, with blitting.

With ipympl installed, the figure's canvas *is* a widget (``ipympl`` Canvas):
it sends only the changed pixels to the browser. Without it, the figure is
rendered with Agg and sent as PNG into an ``ipywidgets.Image``, which updates
in place too (no flicker, unlike clearing an Output widget) and works in any
front-end that shows widgets.

Either way, artists marked *animated* are drawn over a cached background: a
full render (axes, ticks, text) happens only when the caller says the
background changed, or when the front-end asks for one (the ``draw_event``
handler then re-draws the animated artists on top, so they never vanish).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def ipympl_available() -> bool:
    """True when ipympl can provide a widget canvas."""
    try:
        import ipympl.backend_nbagg  # noqa: F401
    except ImportError:
        return False
    return True


class FigureView:
    """A figure, the widget that shows it, and fast repaints of its moving parts.

    Args:
        figsize: Figure size in inches.
        dpi: Resolution. Defaults to 90.
        use_ipympl: ``True``/``False`` to force a canvas kind; ``None`` uses ipympl
            when it is installed.
    """

    def __init__(self, figsize: tuple[float, float], dpi: int = 90, use_ipympl: bool | None = None) -> None:
        # No layout engine: constrained layout would re-solve on every full draw.
        self.figure = Figure(figsize=figsize, dpi=dpi)
        self.uses_ipympl = ipympl_available() if use_ipympl is None else use_ipympl
        if self.uses_ipympl:
            from ipympl.backend_nbagg import Canvas, FigureManager

            canvas = Canvas(self.figure)
            FigureManager(canvas, 0)  # wires the canvas's messages and toolbar
            canvas.header_visible = False
            canvas.footer_visible = False
            canvas.toolbar_visible = False
            canvas.resizable = False
            # Keep frames out of the widget state: ipympl would store each one as a
            # bare base64 string, which the front-end then fails to load as an image
            # and leaves the canvas blank. Frames go out as binary messages only.
            canvas.syncing_data_url = False
            # Size the canvas now, as ipympl does when the front-end says it is
            # initialized: that message waits while the kernel is busy (fit running
            # in the cell that made the panel), and until then the canvas is 0x0.
            _, _, width, height = self.figure.bbox.bounds
            canvas.manager.resize(width, height)
            self.widget: widgets.DOMWidget = canvas
        else:
            FigureCanvasAgg(self.figure)
            self.widget = widgets.Image(format="png")
        self.canvas = self.figure.canvas
        self._animated: list[Any] = []
        self._background: Any = None
        self.full_draws = 0
        self.canvas.mpl_connect("draw_event", self._on_draw)

    def animate(self, artists: Sequence[Any]) -> None:
        """Declare the artists drawn over the cached background."""
        self._animated = list(artists)

    def show(self, background_changed: bool) -> None:
        """Repaint: everything if the background changed, else only the animated artists."""
        if background_changed or self._background is None:
            self.full_draws += 1
            # Agg's own draw: ipympl's would send a frame before the animated
            # artists are on it; the draw_event handler adds them first.
            FigureCanvasAgg.draw(self.canvas)
        else:
            self.canvas.restore_region(self._background)
            self._draw_animated()
        self._send()

    def _on_draw(self, event: Any) -> None:
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._draw_animated()

    def _draw_animated(self) -> None:
        for artist in self._animated:
            self.figure.draw_artist(artist)

    def _send(self) -> None:
        if self.uses_ipympl:
            self.canvas.blit(self.figure.bbox)  # webagg: diff against the last frame, send
        else:
            self.widget.value = _png(self.canvas)

    def savefig(self, path: str, **kwargs: Any) -> None:
        """Save the figure with its animated artists (which a plain savefig leaves out)."""
        for artist in self._animated:
            artist.set_animated(False)
        try:
            self.figure.savefig(path, **kwargs)
        finally:
            for artist in self._animated:
                artist.set_animated(True)


def _png(canvas: FigureCanvasAgg) -> bytes:
    """Encode the Agg buffer as it is now (background plus blitted artists) as PNG."""
    from PIL import Image  # matplotlib's own dependency

    buffer = io.BytesIO()
    # Fast compression: a frame is sent once and replaced a moment later.
    Image.fromarray(np.asarray(canvas.buffer_rgba())).save(buffer, format="png", compress_level=1)
    return buffer.getvalue()
