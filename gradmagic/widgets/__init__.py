"""ipywidgets panels over the gradmagic core.

- :mod:`gradmagic.widgets.views`: ``gradmagic.explore``, which opens the view that fits the model's input:
  :mod:`~gradmagic.widgets.explorer` (flat features, a slider each), :mod:`~gradmagic.widgets.plane`
  (two features, the gradient field), :mod:`~gradmagic.widgets.sequence` (per position in a sequence or
  token ids) and :mod:`~gradmagic.widgets.image` (the integrated-gradients path of an image).
- :mod:`gradmagic.widgets.training_panel`: live per-layer gradient norms during ``fit``.

Submodules are imported on demand (they pull in matplotlib and ipywidgets).
"""
