"""ipywidgets panels over the gradmagic core.

- :mod:`gradmagic.widgets.explorer`: sliders move the input point, gradient plots follow
  (``gradmagic.explore``).
- :mod:`gradmagic.widgets.training_panel`: live per-layer gradient norms during ``fit``.

Submodules are imported on demand (they pull in matplotlib and ipywidgets).
"""
