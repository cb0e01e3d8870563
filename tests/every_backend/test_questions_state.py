"""The gradient questions never change the model, and a repeated question re-runs its compiled function."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import gradmagic as gm

from .backend_truths import clear_grads, fingerprint, no_grad_left, torch_trace_from_call

RNG = np.random.default_rng(3)
X = RNG.normal(size=(8, 4)).astype("float32")
Y = RNG.normal(size=(8, 2)).astype("float32")


def _normalized() -> keras.Model:
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(2),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    model.fit(X, Y, epochs=1, verbose=0)  # optimizer state and moving statistics away from their initial values
    clear_grads(model)
    return model


@pytest.mark.parametrize("training", [False, True])
def test_no_question_changes_any_variable_or_leaves_a_grad(training):
    model = _normalized()
    before = fingerprint(model)
    weights = gm.weight_gradients(model, X, Y, training=training)
    gm.weight_gradients(model, X, Y, layer=1, training=training)
    gm.output_gradients(model, X, Y, layer=2, training=training)
    gm.input_gradients(model, X, training=training)
    assert fingerprint(model) == before  # every variable, and the optimizer's, bit for bit
    assert no_grad_left(model)
    assert all(np.all(np.isfinite(g)) for g in weights.arrays())


def test_training_true_uses_batch_statistics_and_dropout():
    # Training mode really runs: BatchNormalization normalises with the batch's own statistics (and
    # Dropout drops), so the loss differs from inference mode; a second call sees the same state.
    model = _normalized()
    inference = gm.weight_gradients(model, X, Y).loss
    first = gm.weight_gradients(model, X, Y, training=True).loss
    second = gm.weight_gradients(model, X, Y, training=True).loss
    assert first != pytest.approx(inference, rel=1e-3)
    assert second == pytest.approx(first, rel=1e-6)  # the same seed state each time: nothing advanced


def _traces_and_entries(model: keras.Model) -> tuple[int, int]:
    """How many times the question was traced, and how many questions the model has cached."""
    if keras.backend.backend() == "tensorflow":
        from gradmagic.core.questions import compute

        entries = compute._cache[model]
        (question, _key), *_ = entries.values()
        return sum(1 for _ in question.concrete), len(entries)
    from gradmagic.core.questions import stateless_functions

    entries = stateless_functions._cache[model]
    (question, _key), *_ = entries.values()
    return question.traces[0], len(entries)


def test_a_repeated_question_reuses_its_compiled_function():
    model = _normalized()
    gm.clear_cache(model)
    first = gm.weight_gradients(model, X, Y)
    traces, entries = _traces_and_entries(model)
    second = gm.weight_gradients(model, X, Y)
    again, entries_again = _traces_and_entries(model)
    assert entries == entries_again == 1
    if keras.backend.backend() == "torch" and torch_trace_from_call() == 2:
        assert traces == 1 and again == 2  # eager at the first call, traced at the second: the question is reused
    else:
        assert again == traces == 1  # traced once, then the compiled function re-runs
    # On PyTorch the first call may run eagerly and the second its traced graph: the same operations, so equal
    # up to float32 round-off.
    np.testing.assert_allclose(first.arrays()[0], second.arrays()[0], rtol=1e-6, atol=1e-7)


def test_recompiling_with_another_loss_gives_a_fresh_function():
    model = _normalized()
    mse = gm.weight_gradients(model, X, Y).loss
    model.compile(optimizer="adam", loss="mae")
    mae = gm.weight_gradients(model, X, Y).loss
    assert mae != pytest.approx(mse, rel=1e-3)
    pred = model.predict(X, verbose=0)
    assert mae == pytest.approx(float(np.mean(np.abs(pred - Y))), rel=1e-5)


def test_clear_cache_drops_the_models_functions():
    model = _normalized()
    gm.weight_gradients(model, X, Y)
    gm.clear_cache(model)
    gm.weight_gradients(model, X, Y)
    traces, entries = _traces_and_entries(model)
    assert entries == 1 and traces == 1
