"""The one exception family every user-facing gradmagic error belongs to.

Each message is one paragraph: what was wrong, what was expected, and how to fix
it. Front-ends (magics, widgets) show these messages as they are.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - for the annotation only; errors never imports the core
    from gradmagic.core.monitor.anomaly import Anomaly


class GradmagicError(Exception):
    """Base class of every error gradmagic raises for a user mistake or failure."""

    # Raised inside a traced function or a layer's call, a gradmagic error must
    # reach the user as it is: TensorFlow's AutoGraph re-creates any exception
    # that crosses a converted function unless it has ``ag_pass_through``, and
    # Keras re-creates one that leaves a layer's ``call`` unless it is marked as
    # already annotated. Neither framework has a public switch for this.
    ag_pass_through = True
    _keras_call_info_injected = True


class LayerError(GradmagicError, LookupError):
    """A layer was addressed by an index out of range or an unknown name."""


class NoWeightsError(GradmagicError, ValueError):
    """Weight gradients were asked of a layer that has no trainable weights."""


class LossError(GradmagicError, ValueError):
    """No loss could be resolved, the loss is unknown, or its targets are missing."""


class InputError(GradmagicError, ValueError):
    """Inputs or targets do not fit the model (shape, structure, dtype, empty)."""


class ModelBuildError(GradmagicError, ValueError):
    """The model is not built and could not be built from the inputs given."""


class ComputeError(GradmagicError, RuntimeError):
    """Running the model, the loss or the gradient failed for another reason."""


class UserCodeError(ComputeError):
    """The user's own code (a loss, a layer's ``call``) raised; the original error is the ``__cause__``.

    Attributes:
        original: The exception the user's code raised (also chained as
            ``__cause__``, so its traceback is shown below this error's).
    """

    original: BaseException | None = None


class MonitorArgumentError(GradmagicError, ValueError):
    """A GradientMonitor argument is invalid, or the model cannot be monitored."""


class GradientAnomalyError(GradmagicError, RuntimeError):
    """Raised by ``GradientMonitor(on_anomaly="raise")``; ``.anomaly`` says where and what."""

    def __init__(self, message: str, anomaly: Anomaly) -> None:
        super().__init__(message)
        self.anomaly = anomaly


class PanelArgumentError(GradmagicError, ValueError):
    """A TrainingPanel argument is invalid."""


class GradmagicWarning(UserWarning):
    """A recoverable problem with the input, e.g. NaN or Inf in x or y."""


def close_matches(word: str, choices: Iterable[str], limit: int = 3) -> list[str]:
    """Return up to `limit` entries of `choices` that look like `word`."""
    return difflib.get_close_matches(word, list(choices), n=limit, cutoff=0.5)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return `` Did you mean 'a', 'b'?`` for the closest choices, or ``""`` if none is close."""
    suggestions = close_matches(word, choices)
    return f" Did you mean {quote_list(suggestions)}?" if suggestions else ""


def quote_list(names: Sequence[str], limit: int = 8) -> str:
    """Format names as `'a', 'b', ...`, cut after `limit` entries."""
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown


def brief(exc: BaseException, limit: int = 400) -> str:
    """Condense an exception from TensorFlow or Keras into one short line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines) if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
