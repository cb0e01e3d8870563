"""On JAX and PyTorch explain and check_gradients run where TensorFlow cannot be imported at all."""

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

    inputs = keras.Input((3,))
    cut = keras.layers.Lambda(lambda t: keras.ops.stop_gradient(t), name="cut")(keras.layers.Dense(2)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1)(cut))
    model.compile(loss="mse")
    x, y = np.linspace(-1, 1, 12).reshape(4, 3).astype("float32"), np.zeros((4, 1), "float32")
    e = gm.explain(model, x, y, verbose=False)
    assert [r.name for r in e.blocked] == ["cut"] and len(e.disconnected) == 2
    c = gm.check_gradients(model, x, y, verbose=False)
    assert c.dtype == "float64" and not c.passed  # stop_gradient: the function moves, its gradient does not
    print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow" and sys.modules[m] is not None))
    """
)


def test_explain_and_check_gradients_run_with_tensorflow_blocked(backend):
    if backend == "tensorflow":
        pytest.skip("the TensorFlow backend needs TensorFlow")
    run_without_tensorflow(backend, _SCRIPT)
    assert keras.backend.backend() == backend
