"""gradmagic: see the gradients of Keras 3 models, in code and in notebooks.

The public functions live in :mod:`gradmagic.core` and are re-exported here
lazily, so that ``import gradmagic`` and ``%load_ext gradmagic`` stay quick and
do not import TensorFlow until a gradient is asked for.

Example:
    >>> import gradmagic as gm
    >>> gm.weight_gradients(model, x, y, layer=2)
    >>> gm.input_gradients(model, x).array
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradmagic.errors import GradmagicError

__version__ = "0.1.0"

# Public name -> module that defines it; imported on first access.
_LAZY = {
    "weight_gradients": "gradmagic.core",
    "output_gradients": "gradmagic.core",
    "input_gradients": "gradmagic.core",
    "clear_cache": "gradmagic.core",
    "token_gradients": "gradmagic.core",
    "token_integrated_gradients": "gradmagic.core",
    "WeightGradients": "gradmagic.core",
    "OutputGradients": "gradmagic.core",
    "InputGradients": "gradmagic.core",
    "GradientStats": "gradmagic.core",
    "explain": "gradmagic.core",
    "Explanation": "gradmagic.core",
    "check_gradients": "gradmagic.core",
    "GradientCheck": "gradmagic.core",
    "integrated_gradients": "gradmagic.core",
    "saliency": "gradmagic.core",
    "gradcam": "gradmagic.core",
    "IntegratedGradients": "gradmagic.core",
    "Saliency": "gradmagic.core",
    "GradCAM": "gradmagic.core",
    "GradientMonitor": "gradmagic.core",
    "GradientAnomalyError": "gradmagic.errors",
    "training_panel": "gradmagic.widgets.training_panel",
    "TrainingPanel": "gradmagic.widgets.training_panel",
    "explore": "gradmagic.widgets.views",
    "Explorer": "gradmagic.widgets.explorer",
}

__all__ = ["GradmagicError", "__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from gradmagic.core import (  # noqa: F401
        Explanation,
        GradCAM,
        GradientCheck,
        GradientMonitor,
        GradientStats,
        InputGradients,
        IntegratedGradients,
        OutputGradients,
        Saliency,
        WeightGradients,
        check_gradients,
        clear_cache,
        explain,
        gradcam,
        input_gradients,
        integrated_gradients,
        output_gradients,
        saliency,
        token_gradients,
        token_integrated_gradients,
        weight_gradients,
    )
    from gradmagic.errors import GradientAnomalyError  # noqa: F401
    from gradmagic.widgets.explorer import Explorer  # noqa: F401
    from gradmagic.widgets.training_panel import TrainingPanel, training_panel  # noqa: F401
    from gradmagic.widgets.views import explore  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradmagic' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


def load_ipython_extension(ipython: Any) -> None:
    """Register the gradmagic magics (``%load_ext gradmagic``); TensorFlow stays unloaded."""
    from gradmagic.magics import GradientMagics

    ipython.register_magics(GradientMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """Remove the gradmagic magics (``%unload_ext gradmagic``)."""
    from gradmagic.magics import unregister

    unregister(ipython)
