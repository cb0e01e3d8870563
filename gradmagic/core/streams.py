"""Whether data is a stream of batches (a dataset, a PyDataset, a generator), on every backend.

Imports no framework: a ``tf.data.Dataset`` or ``tf.Tensor`` can only exist once
TensorFlow is imported, so they are recognised through ``sys.modules`` and a
JAX or PyTorch Keras never loads TensorFlow to ask.
"""

from __future__ import annotations

import collections.abc
import sys
from typing import Any

import keras
import numpy as np


def is_stream(x: Any) -> bool:
    """True for a dataset, a PyDataset or an iterator/generator (not for arrays, tensors or lists)."""
    tf = sys.modules.get("tensorflow")
    dataset = getattr(getattr(tf, "data", None), "Dataset", None)
    if isinstance(x, keras.utils.PyDataset) or (dataset is not None and isinstance(x, dataset)):
        return True
    tensor = getattr(tf, "Tensor", None)
    if tensor is not None and isinstance(x, tensor):
        return False
    return isinstance(x, collections.abc.Iterator) and not isinstance(x, (np.ndarray, str, bytes))
