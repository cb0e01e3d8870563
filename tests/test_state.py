"""Every gradient question leaves the model, its metrics and its optimizer bit-identical."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import assert_unchanged, fingerprint

import gradmagic as gm


@pytest.fixture
def stateful_model():
    """BatchNormalization + Dropout, Adam with state after one real training step."""
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, name="dense_in"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dropout(0.3, name="drop"),
            keras.layers.Dense(2, name="dense_out"),
        ]
    )
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4)).astype("float32"), rng.normal(size=(16, 2)).astype("float32")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    return model, x, y


@pytest.mark.parametrize("training", [False, True])
def test_all_three_questions_leave_state_bit_identical(stateful_model, training):
    model, x, y = stateful_model
    before = fingerprint(model)
    iterations = int(model.optimizer.iterations.numpy())
    for _ in range(2):  # the first call traces, the second runs the compiled graph
        gm.weight_gradients(model, x, y, training=training)
        gm.weight_gradients(model, x, y, layer="bn", training=training)
        gm.output_gradients(model, x, y, layer="bn", training=training)
        gm.input_gradients(model, x, training=training)
    assert_unchanged(model, before)
    assert int(model.optimizer.iterations.numpy()) == iterations


def test_training_mode_really_used_batch_statistics(stateful_model):
    model, x, y = stateful_model
    # BN in training mode normalises with the batch's own statistics, so
    # dLoss/d(dense_in) differs from inference mode, which uses the moving ones.
    inference = gm.output_gradients(model, x, y, layer="dense_in").array
    training = gm.output_gradients(model, x, y, layer="dense_in", training=True).array
    assert not np.allclose(inference, training)


def test_multi_output_compiled_loss_trackers_are_untouched():
    a = keras.Input((2,))
    model = keras.Model(a, [keras.layers.Dense(1)(a), keras.layers.Dense(1)(a)])
    model.compile(optimizer="sgd", loss=["mse", "mae"])
    x, y = np.ones((3, 2), "float32"), [np.zeros((3, 1), "float32"), np.ones((3, 1), "float32")]
    before = fingerprint(model)
    gm.weight_gradients(model, x, y)
    gm.weight_gradients(model, x, y)
    after = fingerprint(model)
    # The compiled loss may build its per-output trackers on first use (as fit
    # would); they must read as freshly built, and nothing else may change.
    for key, value in after.items():
        if key in before:
            assert before[key] == value, key
        else:
            assert not np.frombuffer(value, dtype=np.float32).any(), key


def test_failed_calls_leave_state_bit_identical(stateful_model):
    model, x, y = stateful_model
    before = fingerprint(model)
    for bad in (
        lambda: gm.weight_gradients(model, x, y[:3]),
        lambda: gm.weight_gradients(model, x, y, layer=99),
        lambda: gm.weight_gradients(model, x, y, layer="drop"),
        lambda: gm.output_gradients(model, x[:, :3], y, layer=0),
        lambda: gm.weight_gradients(model, x, y, loss="not_a_loss"),
    ):
        with pytest.raises(gm.GradmagicError):
            bad()
    assert_unchanged(model, before)
