"""One saved CNN, three backends: the same attributions; on JAX and PyTorch without TensorFlow importable.

A small image model with fixed weights is saved as ``.keras`` from this
process's backend and loaded in a fresh interpreter per backend (Keras fixes
its backend at import), where integrated gradients (blur baseline), SmoothGrad
and Grad-CAM run on the same images, token gradients and their integrated
gradients on the same ids of a small text model. On JAX and PyTorch that interpreter
blocks ``import tensorflow`` first, as if it were not installed. Every backend
must agree with the one that saved the model.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from .backend_truths import run_on_backend

BACKENDS = ("tensorflow", "jax", "torch")

# argv: image model path, data path (.npz with x), result path, token model path.
_COMPUTE = """
import sys
import keras
if keras.backend.backend() != "tensorflow":
    sys.modules["tensorflow"] = None  # as if not installed: importing it raises ModuleNotFoundError
import numpy as np
import gradmagic as gm

model = keras.saving.load_model(sys.argv[1])
x = np.load(sys.argv[2])["x"]
ig = gm.integrated_gradients(model, x, output=1, baseline="blur", steps=12)
smooth = gm.saliency(model, x, smooth=0.1, samples=4, seed=2)
cam = gm.gradcam(model, x, "conv", output=0)
text = keras.saving.load_model(sys.argv[3])
ids = np.array([[1, 2, 3, 4], [5, 6, 0, 7]])
tokens = gm.token_gradients(text, ids, output=1)
token_ig = gm.token_integrated_gradients(text, ids, output=0, steps=8)
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow" and sys.modules[m] is not None)
np.savez(sys.argv[4], backend=keras.backend.backend(), tensorflow=str(loaded), ig=ig.array, baseline=ig.baseline,
         smooth=smooth.array, units=smooth.output, cam=cam.array, cam_at_input=cam.array_at_input,
         tokens=tokens.array, token_ig=token_ig.array)
"""


def _model() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((7, 7, 2)),
            keras.layers.Conv2D(3, 3, activation="tanh", name="conv"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="head"),
        ],
        name="small_cnn",
    )
    rng = np.random.default_rng(11)
    model.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32") for w in model.get_weights()])
    return model


def _token_model() -> keras.Model:
    model = keras.Sequential(
        [keras.Input((4,), dtype="int32"), keras.layers.Embedding(8, 3), keras.layers.GRU(3), keras.layers.Dense(2)],
        name="small_text",
    )
    rng = np.random.default_rng(13)
    model.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32") for w in model.get_weights()])
    return model


def _compute(backend: str, model_path: Path, data_path: Path, out: Path) -> dict[str, np.ndarray]:
    found = run_on_backend(backend, _COMPUTE, [str(model_path), str(data_path), str(_text_path(model_path))], out)
    if backend != "tensorflow":
        assert str(found["tensorflow"]) == "[]"  # no TensorFlow module was loaded
    return {key: value for key, value in found.items() if key != "tensorflow"}


def _text_path(model_path: Path) -> Path:
    return model_path.parent / "small_text.keras"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attribution_cross_backend")
    model_path, data_path = folder / "small_cnn.keras", folder / "data.npz"
    _model().save(model_path)
    _token_model().save(_text_path(model_path))
    np.savez(data_path, x=np.random.default_rng(12).normal(size=(2, 7, 7, 2)).astype("float32"))
    here = keras.backend.backend()
    return model_path, data_path, _compute(here, model_path, data_path, folder / f"{here}.npz")


@pytest.mark.parametrize("other", [b for b in BACKENDS if b != keras.backend.backend()])
def test_every_backend_gives_the_same_attributions(saved, other, require_framework, tmp_path):
    require_framework(other)
    model_path, data_path, here = saved
    there = _compute(other, model_path, data_path, tmp_path / f"{other}.npz")
    assert sorted(there) == sorted(here)
    np.testing.assert_array_equal(there["units"], here["units"])  # the predicted classes
    for key in sorted(here):
        # Two frameworks' float32 kernels sum in different orders: a few float32 ulps of the largest entry.
        scale = float(np.max(np.abs(here[key]))) if here[key].size else 0.0
        np.testing.assert_allclose(
            there[key], here[key], rtol=1e-4, atol=1e-5 * max(scale, 1e-3), err_msg=f"{key} ({other} vs saving backend)"
        )
