"""Take one batch from a ``tf.data.Dataset``, a ``keras.utils.PyDataset`` or a Python generator.

Users hand the gradient questions what they hand ``fit``. The first element
is read as ``fit`` reads it (``keras.utils.unpack_x_y_sample_weight``): a
tuple ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``, anything else is x
alone. Drawing from a generator or iterator is a side effect: it advances by
one batch, which the result's ``source`` says.
"""

from __future__ import annotations

import collections.abc
import sys
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from gradmagic.core.backends.tensors import is_tf_tensor
from gradmagic.errors import InputError


@dataclass(frozen=True)
class Batch:
    """The data of one question, and where it came from.

    Attributes:
        x, y, sample_weight: The data.
        source: ``None`` when x was given as data; else a sentence such as
            ``"the first batch of a tf.data.Dataset"``.
    """

    x: Any
    y: Any
    sample_weight: Any
    source: str | None = None


def is_stream(x: Any) -> bool:
    """True for a dataset, a PyDataset or an iterator/generator (not for arrays, tensors or lists)."""
    if _is_tf_dataset(x) or isinstance(x, keras.utils.PyDataset):
        return True
    return isinstance(x, collections.abc.Iterator) and not (isinstance(x, (np.ndarray, str, bytes)) or is_tf_tensor(x))


def _is_tf_dataset(x: Any) -> bool:
    """True for a ``tf.data.Dataset`` (Keras takes one on every backend); False when TensorFlow is not loaded."""
    tf = sys.modules.get("tensorflow")
    data = getattr(tf, "data", None)
    return data is not None and isinstance(x, data.Dataset)


def first_batch(x: Any, y: Any = None, sample_weight: Any = None, takes_y: bool = True) -> Batch:
    """Return ``x`` (and ``y``, ``sample_weight``) as data, drawing the first batch from a stream.

    Args:
        x: Data, or a dataset / PyDataset / generator yielding batches.
        y: Targets given beside x; must be ``None`` when x is a stream.
        sample_weight: Sample weights given beside x; ``None`` when x is a stream.
        takes_y: Whether the question uses targets (``input_gradients`` does not).

    Raises:
        InputError: x is a stream and y or sample_weight is given too, or the
            stream is empty.
    """
    if not is_stream(x):
        return Batch(x, y, sample_weight)
    kind = _kind(x)
    given = [name for name, value in (("y", y), ("sample_weight", sample_weight)) if value is not None]
    if given:
        raise InputError(
            f"Received: x as {kind} and {' and '.join(given)} as well. Expected the targets inside its "
            f"elements, as fit reads them: (x, y) or (x, y, sample_weight). Fix: drop "
            f"{' and '.join(given)}=..., or pass x as arrays."
        )
    try:
        if _is_tf_dataset(x):
            element = next(iter(x.take(1)))
            if keras.backend.backend() != "tensorflow":  # as Keras' own fit reads a dataset on JAX or PyTorch
                element = keras.tree.map_structure(lambda t: t.numpy() if is_tf_tensor(t) else t, element)
            where = f"the first batch of {kind}"
        elif isinstance(x, keras.utils.PyDataset):
            element = x[0]
            where = f"batch 0 of {kind}"
        else:
            element = next(x)
            where = f"the next batch drawn from {kind} (it has advanced by one batch)"
    except StopIteration:
        raise InputError(f"Received: x as {kind} with no elements left. Expected at least one batch.") from None
    if isinstance(element, tuple) and not 1 <= len(element) <= 3:
        raise InputError(
            f"Received: x as {kind} whose elements are tuples of {len(element)} items. Expected (x,), (x, y) "
            f"or (x, y, sample_weight), as fit reads them. Fix: map the elements to one of those, e.g. "
            f"dataset.map(lambda *t: (t[0], t[1]))."
        )
    bx, by, bsw = keras.utils.unpack_x_y_sample_weight(element)
    if takes_y and by is None:
        where += ", which holds no y"
    return Batch(bx, by, bsw, f"x{', y' if by is not None else ''}: {where}")


def _kind(x: Any) -> str:
    if _is_tf_dataset(x):
        return "a tf.data.Dataset"
    if isinstance(x, keras.utils.PyDataset):
        return f"a PyDataset ({type(x).__name__})"
    return "a generator" if hasattr(x, "gi_frame") else f"an iterator ({type(x).__name__})"
