"""On JAX and PyTorch, gradmagic runs without TensorFlow; on a backend it cannot use, it says so once.

Each case runs in a fresh interpreter, since Keras fixes its backend at import.
There an import hook makes ``import tensorflow`` fail as if it were not
installed, so anything that reaches for it fails loudly: importing gradmagic,
``%load_ext gradmagic`` in a real IPython shell, ``gm.weight_gradients`` and the
same question through ``%gradients``. The gradients are checked against the
analytic derivative of the mean squared error of a linear layer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Prepended to each script: `import tensorflow` (and any submodule) fails as if TensorFlow were not installed.
_BLOCK_TENSORFLOW = """
import importlib.abc, importlib.machinery, sys

class _NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # A spec without origin, whose loader refuses: `import tensorflow` fails as if it were not installed,
    # while a library probing with importlib.util.find_spec (torch._dynamo does) gets no file to read.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (blocked: this process runs without TensorFlow)")

    def exec_module(self, module):
        pass

sys.meta_path.insert(0, _NoTensorFlow())
"""

# A linear layer with fixed weights and data, built after gradmagic and its magics are loaded.
_SETUP = """
import json
import numpy as np
import gradmagic as gm
from IPython.core.interactiveshell import InteractiveShell

shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "gradmagic")
import keras

model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="linear")], name="linear_model")
model.compile(optimizer="sgd", loss="mse")
kernel, bias = np.arange(6, dtype="float32").reshape(3, 2) / 10, np.array([0.1, -0.2], "float32")
model.set_weights([kernel, bias])
x = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0], [2.0, 0.5, -1.0], [-1.0, -1.0, 1.0]], "float32")
y = np.array([[0.5, 1.0], [-1.0, 2.0], [0.0, 0.0], [1.5, -0.5]], "float32")
shell.user_ns.update(model=model, x=x, y=y)
"""

_ASK = """
direct = gm.weight_gradients(model, x, y)
through_magic = shell.run_line_magic("gradients", "model x y")
print(json.dumps({
    "backend": keras.backend.backend(),
    "loss": float(direct.loss),
    "arrays": [a.tolist() for a in direct.arrays()],
    "magic_loss": float(through_magic.loss),
    "magic_arrays": [a.tolist() for a in through_magic.arrays()],
    "tensorflow_imported": "tensorflow" in sys.modules,
}))
"""

_ASK_UNSUPPORTED = """
from gradmagic.errors import GradmagicError

outcome = {"backend": keras.backend.backend(), "tensorflow_imported": "tensorflow" in sys.modules}
try:
    gm.weight_gradients(model, x, y)
except Exception as exc:
    outcome.update(error=type(exc).__name__, is_gradmagic_error=isinstance(exc, GradmagicError), message=str(exc))
try:
    shell.run_line_magic("gradients", "model x y")
except Exception as exc:
    outcome.update(magic_error=type(exc).__name__, magic_message=str(exc))
print(json.dumps(outcome))
"""


def _run(backend: str, script: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _BLOCK_TENSORFLOW + _SETUP + script],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, f"KERAS_BACKEND={backend} without TensorFlow failed:\n{done.stderr[-5000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mse_gradients(x: np.ndarray, y: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> tuple[float, list]:
    """Loss and d/dW, d/db of mean((x W + b - y)^2) over every element, in float64 (the truth)."""
    residual = x @ kernel + bias - y
    scale = 2.0 / residual.size
    return float(np.mean(residual**2)), [scale * x.T @ residual, scale * residual.sum(axis=0)]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_gradients_and_magics_work_with_tensorflow_blocked(backend, require_framework):
    require_framework(backend)
    result = _run(backend, _ASK)
    assert result["backend"] == backend
    assert not result["tensorflow_imported"]
    x = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0], [2.0, 0.5, -1.0], [-1.0, -1.0, 1.0]])
    y = np.array([[0.5, 1.0], [-1.0, 2.0], [0.0, 0.0], [1.5, -0.5]])
    loss, expected = _mse_gradients(x, y, np.arange(6.0).reshape(3, 2) / 10, np.array([0.1, -0.2]))
    # float32 arithmetic against float64 analytic values: agreement to a few float32 ulps.
    for prefix in ("", "magic_"):
        assert result[f"{prefix}loss"] == pytest.approx(loss, rel=1e-5)
        for got, want in zip(result[f"{prefix}arrays"], expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_an_unsupported_backend_gets_one_clear_error_at_first_use(require_framework):
    result = _run("numpy", _ASK_UNSUPPORTED)
    assert result["backend"] == "numpy" and not result["tensorflow_imported"]
    # Importing gradmagic and loading the magics worked (the script got this far); the first question is refused.
    assert result["error"] == "GradmagicError" or result["is_gradmagic_error"], result
    message = result["message"]
    for name in ("'numpy'", "'tensorflow'", "'jax'", "'torch'", "KERAS_BACKEND"):
        assert name in message, f"{name} missing from: {message}"
    assert "Traceback" not in message and len(message.splitlines()) == 1
    # The magic turns the same refusal into IPython's one-line UsageError.
    assert result["magic_error"] == "UsageError" and "'numpy'" in result["magic_message"], result
