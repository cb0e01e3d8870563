"""The one exception family every user-facing gradmagic error belongs to.

Each message is one paragraph: what was wrong, what was expected, and how to fix
it. Front-ends (magics, widgets) show these messages as they are.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class GradmagicError(Exception):
    """Base class of every error gradmagic raises for a user mistake or failure."""


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
