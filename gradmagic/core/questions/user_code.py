"""Errors raised by the user's own code (a loss, a layer's ``call``), named and chained.

The user's exception is kept as the ``__cause__`` of a :class:`UserCodeError`
that says which callable failed and while doing what, so the one-paragraph
message comes first and the user's own traceback stays one click away.
"""

from __future__ import annotations

from gradmagic.errors import GradmagicError, UserCodeError, brief


def failed(who: str, err: BaseException, doing: str) -> GradmagicError:
    """The error to raise when ``who`` raised ``err`` (a gradmagic error passes unchanged).

    Args:
        who: The user callable, e.g. ``"The loss function 'scaled'"``.
        err: What it raised.
        doing: What gradmagic was doing, e.g. ``"on y of shape (4, 2)"``.
    """
    if isinstance(err, GradmagicError):
        return err
    error = UserCodeError(
        f"{who} raised {type(err).__name__} {doing}: {brief(err, 300).rstrip('.')}. The error comes from that "
        f'code, not from gradmagic: its own traceback is chained above this message ("The above exception was '
        f'the direct cause"). The model was left unchanged.'
    )
    error.original = err
    error.__cause__ = err
    return error


def with_cause(error: GradmagicError) -> GradmagicError:
    """Re-attach a :class:`UserCodeError`'s original error (Keras drops ``__cause__`` when it re-raises)."""
    original = getattr(error, "original", None)
    if original is not None:
        error.__cause__ = original
    return error
