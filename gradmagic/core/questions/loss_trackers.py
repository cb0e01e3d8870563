"""Keep a compiled loss's per-output trackers out of the user's model.

On first use, Keras's compiled loss of a multi-output model builds one ``Mean``
tracker per output (``compile_loss/<output>_loss/total`` and ``/count``), which
then count among the model's metric variables. A gradient question must not add
variables to the model, so until the model's own compiled loss has been built
(by ``fit`` or ``evaluate``), gradmagic computes the compiled loss with a copy
of it - the same losses, weights and output names - that it keeps per model.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import keras

# model -> (the model's compiled-loss object, gradmagic's unbuilt-at-first copy of it)
_copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _copy_of(compiled: object) -> object | None:
    """A fresh compiled loss with the same configuration (Keras has no public constructor for it)."""
    try:
        return type(compiled)(
            compiled._user_loss,
            compiled._user_loss_weights,
            reduction=compiled.reduction,
            output_names=compiled.output_names,
        )
    except Exception:  # another Keras version: fall back to the model's own object
        return None


@contextlib.contextmanager
def own_compile_loss(model: keras.Model) -> Iterator[None]:
    """Within the block, ``model.compute_loss`` uses gradmagic's copy of a not-yet-built compiled loss."""
    compiled = getattr(model, "_compile_loss", None)
    if compiled is None or getattr(compiled, "built", True):
        yield
        return
    known = _copies.get(model)
    if known is None or known[0] is not compiled:  # compile() made a new one
        copy = _copy_of(compiled)
        if copy is None:
            yield
            return
        known = _copies[model] = (compiled, copy)
    # object.__setattr__: Keras's attribute tracking must not adopt the copy into the model.
    object.__setattr__(model, "_compile_loss", known[1])
    try:
        yield
    finally:
        object.__setattr__(model, "_compile_loss", compiled)
