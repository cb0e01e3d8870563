"""On JAX and PyTorch the gradient questions run where TensorFlow cannot be imported at all."""

from __future__ import annotations

import textwrap

import keras
import pytest

from .backend_truths import run_without_tensorflow

_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["tensorflow"] = None  # as if not installed: importing it raises ModuleNotFoundError
    import numpy as np
    import keras
    import gradmagic as gm
    import gradmagic.core as core

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d"), keras.layers.Dense(1)])
    model.compile(loss="mse")
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 1), "float32")
    r = gm.weight_gradients(model, x, y)
    o = gm.output_gradients(model, x, y, layer="d")
    j = gm.input_gradients(model, x)
    assert [a.shape for a in r.arrays()] == [(3, 2), (2,), (2, 1), (1,)]
    assert o.array.shape == (4, 2) and j.array.shape == (4, 1, 3)
    assert core.model_spec(model).inputs[0].shape == (3,) and core.model_name(model) == model.name
    assert core.is_scalar_list([1, 2]) and core.output_labels(["a"], 1) == ["a"]
    assert not core.is_stream(x)
    print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow" and sys.modules[m] is not None))
    """
)


def test_the_questions_import_and_run_with_tensorflow_blocked(backend):
    if backend == "tensorflow":
        pytest.skip("the TensorFlow backend needs TensorFlow")
    run_without_tensorflow(backend, _SCRIPT)
    assert keras.backend.backend() == backend
