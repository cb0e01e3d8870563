"""The compute core: TensorFlow, Keras and NumPy only (no IPython, no widgets)."""

from __future__ import annotations

try:
    import tensorflow as _tf  # noqa: F401 - fail early with an install hint
except ImportError:  # pragma: no cover - depends on the environment
    from gradmagic.errors import GradmagicError

    raise GradmagicError(
        "gradmagic needs TensorFlow (2.16 or newer) as the Keras 3 backend, and it is "
        "not installed. Fix: `pip install tensorflow` (or `tensorflow-cpu`, or "
        "`pip install gradmagic[tensorflow]`); gradmagic does not install it for you so "
        "that an existing GPU or CPU build is kept."
    ) from None

from gradmagic.core.arguments import check_flag, is_flag, is_int
from gradmagic.core.backends import check_backend
from gradmagic.core.batches import is_stream
from gradmagic.core.diagnose.explain import DisconnectedWeight, Explanation, LayerPath, OpInfo, explain
from gradmagic.core.diagnose.gradcheck import CheckRow, GradientCheck, check_gradients
from gradmagic.core.display import html_table, text_table
from gradmagic.core.monitor.callback import GradientMonitor
from gradmagic.core.monitor.history import MonitorHistory, MonitorSummary
from gradmagic.core.norms import combined_norm
from gradmagic.core.questions.attribution.gradcam import gradcam
from gradmagic.core.questions.attribution.integrated import integrated_gradients
from gradmagic.core.questions.attribution.results import GradCAM, IntegratedGradients, Saliency
from gradmagic.core.questions.attribution.saliency import saliency
from gradmagic.core.questions.attribution.tokens import (
    TokenGradients,
    embedding_layer,
    input_kind,
    token_gradients,
    token_integrated_gradients,
)
from gradmagic.core.questions.compute import clear_cache
from gradmagic.core.questions.gradients import input_gradients, output_gradients, weight_gradients
from gradmagic.core.questions.inputs import is_scalar_list, model_spec
from gradmagic.core.questions.naming import output_labels
from gradmagic.core.questions.results import (
    GradientRow,
    GradientStats,
    InputGradients,
    OutputGradients,
    WeightGradients,
)
from gradmagic.core.questions.state import rollback_on_failure
from gradmagic.core.questions.targets import model_name

__all__ = [
    "CheckRow",
    "DisconnectedWeight",
    "Explanation",
    "GradCAM",
    "GradientCheck",
    "GradientMonitor",
    "GradientRow",
    "GradientStats",
    "InputGradients",
    "IntegratedGradients",
    "LayerPath",
    "MonitorHistory",
    "MonitorSummary",
    "OpInfo",
    "OutputGradients",
    "Saliency",
    "TokenGradients",
    "WeightGradients",
    "check_flag",
    "check_gradients",
    "clear_cache",
    "combined_norm",
    "embedding_layer",
    "explain",
    "gradcam",
    "html_table",
    "input_gradients",
    "input_kind",
    "integrated_gradients",
    "is_flag",
    "is_int",
    "is_scalar_list",
    "is_stream",
    "model_name",
    "model_spec",
    "output_gradients",
    "output_labels",
    "rollback_on_failure",
    "saliency",
    "text_table",
    "token_gradients",
    "token_integrated_gradients",
    "weight_gradients",
]

check_backend()  # refuse at import a Keras backend gradmagic cannot compute on, before any call fails inside
