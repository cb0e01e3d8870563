"""Name the layer whose own ``call`` raised while the model runs, on every backend.

A failure inside a layer reaches the user as a
:class:`~gradmagic.errors.GradmagicError` naming that layer (and, for the
classic tracing mistakes, the fix), with the layer's own exception chained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras

from gradmagic.core.backends.keras_internals import calls_replaced
from gradmagic.core.questions.trace_errors import describe_layer, diagnose_trace_error
from gradmagic.core.questions.user_code import failed
from gradmagic.errors import GradmagicError


@contextlib.contextmanager
def layers_named(model: keras.Model) -> Iterator[None]:
    """While tracing, an exception from a layer's own ``call`` becomes an error that names the layer.

    The layer's exception stays chained (see :mod:`gradmagic.core.questions.user_code`).
    Python control flow or NumPy on a tensor gets its own explanation.
    """

    def wrap_for(index: int) -> Callable[[Callable], Callable]:
        def wrap(original: Callable) -> Callable:
            def named_call(*args: Any, **kwargs: Any) -> Any:
                try:
                    return original(*args, **kwargs)
                except GradmagicError:
                    raise
                except Exception as err:
                    error = diagnose_trace_error(err, model, index)
                    if error is None:
                        error = failed(describe_layer(model, index), err, "in its call")
                    error.original = err
                    raise error from err

            return named_call

        return wrap

    with calls_replaced([(layer, wrap_for(index)) for index, layer in enumerate(model.layers)]):
        yield
