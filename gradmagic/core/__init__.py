"""The compute core: Keras, a framework and NumPy only (no IPython, no widgets).

Every public name is imported lazily, on first access, from the module that
implements it on the Keras backend in use (``keras.backend.backend()``): so a
JAX or PyTorch Keras never imports TensorFlow, and importing one helper module
(``gradmagic.core.display``) does not import the whole core. A backend gradmagic
does not support gets one clear error at that first access, naming the fix.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names whose module imports no framework: the same object on every backend.
_EVERY_BACKEND = {
    "check_flag": "gradmagic.core.arguments",
    "is_flag": "gradmagic.core.arguments",
    "is_int": "gradmagic.core.arguments",
    "check_backend": "gradmagic.core.backends",
    "html_table": "gradmagic.core.display",
    "text_table": "gradmagic.core.display",
    "combined_norm": "gradmagic.core.norms",
    "GradientRow": "gradmagic.core.questions.results",
    "GradientStats": "gradmagic.core.questions.results",
    "InputGradients": "gradmagic.core.questions.results",
    "OutputGradients": "gradmagic.core.questions.results",
    "WeightGradients": "gradmagic.core.questions.results",
    "output_labels": "gradmagic.core.questions.naming",
    "model_name": "gradmagic.core.questions.targets",
    "is_scalar_list": "gradmagic.core.questions.inputs",
    "model_spec": "gradmagic.core.questions.inputs",
    "embedding_layer": "gradmagic.core.questions.kinds",
    "input_kind": "gradmagic.core.questions.kinds",
    "is_stream": "gradmagic.core.batches",
    "rollback_on_failure": "gradmagic.core.questions.state",
    "GradCAM": "gradmagic.core.questions.attribution.results",
    "IntegratedGradients": "gradmagic.core.questions.attribution.results",
    "Saliency": "gradmagic.core.questions.attribution.results",
    "TokenGradients": "gradmagic.core.questions.attribution.results",
}

# The TensorFlow implementations.
_TENSORFLOW = {
    "DisconnectedWeight": "gradmagic.core.diagnose.explain",
    "Explanation": "gradmagic.core.diagnose.explain",
    "LayerPath": "gradmagic.core.diagnose.explain",
    "OpInfo": "gradmagic.core.diagnose.explain",
    "explain": "gradmagic.core.diagnose.explain",
    "CheckRow": "gradmagic.core.diagnose.gradcheck",
    "GradientCheck": "gradmagic.core.diagnose.gradcheck",
    "check_gradients": "gradmagic.core.diagnose.gradcheck",
    "GradientMonitor": "gradmagic.core.monitor.callback",
    "MonitorHistory": "gradmagic.core.monitor.history",
    "MonitorSummary": "gradmagic.core.monitor.history",
    "gradcam": "gradmagic.core.questions.attribution.gradcam",
    "integrated_gradients": "gradmagic.core.questions.attribution.integrated",
    "saliency": "gradmagic.core.questions.attribution.saliency",
    "token_gradients": "gradmagic.core.questions.attribution.tokens",
    "token_integrated_gradients": "gradmagic.core.questions.attribution.tokens",
    "clear_cache": "gradmagic.core.questions.compute",
    "input_gradients": "gradmagic.core.questions.gradients",
    "output_gradients": "gradmagic.core.questions.gradients",
    "weight_gradients": "gradmagic.core.questions.gradients",
}

# The JAX and PyTorch implementations (through Keras' stateless API and each
# framework's own autodiff, see ``gradmagic.core.backends``). A TensorFlow name
# missing here raises a clear "not yet on this backend" error when used.
_STATELESS: dict[str, str] = {
    "DisconnectedWeight": "gradmagic.core.diagnose.explanation",
    "Explanation": "gradmagic.core.diagnose.explanation",
    "LayerPath": "gradmagic.core.diagnose.explanation",
    "OpInfo": "gradmagic.core.diagnose.explanation",
    "explain": "gradmagic.core.diagnose.stateless_explain",
    "CheckRow": "gradmagic.core.diagnose.gradcheck_results",
    "GradientCheck": "gradmagic.core.diagnose.gradcheck_results",
    "check_gradients": "gradmagic.core.diagnose.stateless_gradcheck",
    "clear_cache": "gradmagic.core.questions.stateless",
    "input_gradients": "gradmagic.core.questions.stateless",
    "output_gradients": "gradmagic.core.questions.stateless",
    "weight_gradients": "gradmagic.core.questions.stateless",
    "GradientMonitor": "gradmagic.core.monitor.callback",
    "MonitorHistory": "gradmagic.core.monitor.history",
    "MonitorSummary": "gradmagic.core.monitor.history",
    # The attribution functions: one implementation, which runs its gradients on the backend's engine.
    "gradcam": "gradmagic.core.questions.attribution.gradcam",
    "integrated_gradients": "gradmagic.core.questions.attribution.integrated",
    "saliency": "gradmagic.core.questions.attribution.saliency",
    "token_gradients": "gradmagic.core.questions.attribution.tokens",
    "token_integrated_gradients": "gradmagic.core.questions.attribution.tokens",
}

_BY_BACKEND = {"tensorflow": _TENSORFLOW, "jax": _STATELESS, "torch": _STATELESS}

__all__ = sorted({*_EVERY_BACKEND, *_TENSORFLOW})


def _module_of(name: str) -> str | None:
    """The module that implements ``name`` on the Keras backend in use (None: not on this backend)."""
    module = _EVERY_BACKEND.get(name)
    if module is not None:
        return module
    from gradmagic.core.backends import check_backend

    return _BY_BACKEND[check_backend()].get(name)


def __getattr__(name: str) -> Any:
    if name not in _EVERY_BACKEND and name not in _TENSORFLOW:
        raise AttributeError(f"module 'gradmagic.core' has no attribute {name!r}")
    module = _module_of(name)
    if module is None:
        from gradmagic.core.backends import not_on_backend

        value = not_on_backend(name)
    else:
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
