"""One saved model, three backends: the same weight, layer-output and input gradients.

A small two-input model (a Conv1D branch and a Dense branch) with fixed weights is
saved as ``.keras`` from the backend this process runs on, then loaded in a fresh
interpreter per backend (Keras fixes its backend at import), where
``gm.weight_gradients``, ``gm.output_gradients`` and ``gm.input_gradients`` run
on the same x and y. Every backend must agree with the one that saved the model.
A framework that is not installed skips its case (fails under ``CI``).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from .backend_truths import run_on_backend

BACKENDS = ("tensorflow", "jax", "torch")
#: model.layers index of the hidden Dense layer after the concatenation ("mix").
MIX = 6

# Loads the model on the backend of this interpreter and writes every gradient to an .npz file.
# argv: model path, data path (.npz with x0, x1, y), result path.
_COMPUTE = """
import sys
import keras
import numpy as np
import gradmagic as gm

model = keras.saving.load_model(sys.argv[1])
data = np.load(sys.argv[2])
x, y = [data["x0"], data["x1"]], data["y"]
weights = gm.weight_gradients(model, x, y)
output = gm.output_gradients(model, x, y, layer=int(sys.argv[3]))
inputs = gm.input_gradients(model, x)
found = {"loss": np.float64(weights.loss), "output_loss": np.float64(output.loss), "output": output.array}
found.update({f"weight_{i}": a for i, a in enumerate(weights.arrays())})
found.update({f"input_{i}": a for i, a in enumerate(inputs.array)})
np.savez(sys.argv[4], backend=keras.backend.backend(), **found)
"""


def _model() -> keras.Model:
    """Conv1D over a (6, 2) sequence and Dense over a (3,) vector, concatenated, two outputs; fixed weights."""
    sequence = keras.Input((6, 2), name="sequence")
    vector = keras.Input((3,), name="vector")
    conv = keras.layers.Conv1D(3, 3, activation="tanh", name="conv")(sequence)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(conv)
    dense = keras.layers.Dense(4, activation="tanh", name="dense")(vector)
    joined = keras.layers.Concatenate(name="join")([pooled, dense])
    mixed = keras.layers.Dense(5, activation="tanh", name="mix")(joined)
    out = keras.layers.Dense(2, name="out")(mixed)
    model = keras.Model([sequence, vector], out, name="two_inputs")
    assert model.layers[MIX].name == "mix"
    rng = np.random.default_rng(7)
    model.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32") for w in model.get_weights()])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(8)
    return {
        "x0": rng.normal(size=(4, 6, 2)).astype("float32"),
        "x1": rng.normal(size=(4, 3)).astype("float32"),
        "y": rng.normal(size=(4, 2)).astype("float32"),
    }


def _compute(backend: str, model_path: Path, data_path: Path, out: Path) -> dict[str, np.ndarray]:
    return run_on_backend(backend, _COMPUTE, [str(model_path), str(data_path), str(MIX)], out)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The model saved from this process's backend, the data, and the gradients computed here in a subprocess."""
    folder = tmp_path_factory.mktemp("cross_backend")
    model_path, data_path = folder / "two_inputs.keras", folder / "data.npz"
    _model().save(model_path)
    np.savez(data_path, **_data())
    here = keras.backend.backend()
    return model_path, data_path, _compute(here, model_path, data_path, folder / f"{here}.npz")


def test_the_saving_backend_answers_every_question(saved):
    _, _, found = saved
    model, data = _model(), _data()
    # Shapes as the public contract gives them; the values are compared across backends below.
    assert [found[f"weight_{i}"].shape for i in range(len(model.trainable_weights))] == [
        tuple(w.shape) for w in model.trainable_weights
    ]
    assert found["output"].shape == (4, 5)
    assert found["input_0"].shape == (4, 2, 6, 2) and found["input_1"].shape == (4, 2, 3)
    # The loss is the model's compiled MSE at (x, y): a forward pass here is an independent check of it.
    predicted = keras.ops.convert_to_numpy(model([data["x0"], data["x1"]]))
    assert float(found["loss"]) == pytest.approx(float(np.mean((predicted - data["y"]) ** 2)), rel=1e-5)


@pytest.mark.parametrize("other", [b for b in BACKENDS if b != keras.backend.backend()])
def test_every_backend_gives_the_same_gradients(saved, other, require_framework, tmp_path):
    require_framework(other)
    model_path, data_path, here = saved
    there = _compute(other, model_path, data_path, tmp_path / f"{other}.npz")
    assert sorted(there) == sorted(here)
    for key in sorted(here):
        # Two frameworks, two sets of float32 kernels (XLA, Eigen/oneDNN, ATen) that sum in different orders
        # and fuse differently: they agree to a few float32 ulps of the largest entry, not bit for bit.
        scale = float(np.max(np.abs(here[key]))) if here[key].size else 0.0
        np.testing.assert_allclose(
            there[key], here[key], rtol=1e-4, atol=1e-5 * max(scale, 1e-3), err_msg=f"{key} ({other} vs saving backend)"
        )
