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
from collections.abc import Iterator

import keras

from gradmagic.core.backends.keras_internals import compiled_loss, compiled_loss_replaced, fresh_compiled_loss
from gradmagic.core.questions.caches import WeakCache

# model -> (the model's compiled-loss object, gradmagic's unbuilt-at-first copy of it)
_copies = WeakCache()


@contextlib.contextmanager
def own_compile_loss(model: keras.Model) -> Iterator[None]:
    """Within the block, ``model.compute_loss`` uses gradmagic's copy of a not-yet-built compiled loss."""
    compiled = compiled_loss(model)
    if compiled is None or getattr(compiled, "built", True):
        yield
        return
    known = _copies.lookup(model)
    if known is None or known[0] is not compiled:  # compile() made a new one
        copy = fresh_compiled_loss(compiled)
        if copy is None:
            yield
            return
        known = _copies.store(model, (compiled, copy))
    with compiled_loss_replaced(model, known[1]):
        yield
