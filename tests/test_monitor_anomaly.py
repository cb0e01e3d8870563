"""Gradient anomalies: NaN/Inf located by layer, exploding and vanishing norms, warn/stop/raise."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import mlp
from monitor_helpers import division_data, division_model, sample_data

from gradmagic.core.monitor.anomaly import GradientAnomalyError, NormTracker
from gradmagic.core.monitor.callback import GradientMonitor
from gradmagic.errors import GradmagicError


def test_nan_in_lambda_is_pinned_on_lambda_at_right_batch():
    model, (x, y) = division_model(), division_data()
    monitor = GradientMonitor(read_every=4)
    with pytest.warns(UserWarning, match="'divide'"):
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    first = monitor.anomalies[0]
    assert (first.kind, first.layer, first.epoch, first.batch, first.step) == ("nonfinite", "divide", 0, 2, 2)
    assert first.weight == "d1/kernel" and first.suspects == ("divide",)
    # Independent check that batch 2 is the first with a NaN gradient.
    cols = monitor.to_dict()
    bad_batches = sorted({b for b, n in zip(cols["batch"], cols["nan"], strict=True) if n})
    assert bad_batches[0] == 2


def test_stop_ends_fit_and_keeps_last_good_weights():
    model, (x, y) = division_model(), division_data()
    start = model.get_weights()
    monitor = GradientMonitor(on_anomaly="stop")
    with pytest.warns(UserWarning, match="Training stopped"):
        history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[monitor])
    assert len(history.history["loss"]) == 1 and model.stop_training
    assert monitor.last_good_step == 2
    # Truth: the same model trained on the two good batches only.
    reference = division_model()
    reference.set_weights(start)
    reference.fit(x[:16], y[:16], batch_size=8, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(monitor.last_good_weights, reference.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    monitor.restore_last_good()
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_raise_raises_gradmagic_error_and_restores():
    model, (x, y) = division_model(), division_data()
    with pytest.raises(GradmagicError, match="'divide'") as info:
        model.fit(
            x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[GradientMonitor(on_anomaly="raise")]
        )
    assert isinstance(info.value, GradientAnomalyError) and info.value.anomaly.batch == 2
    assert "apply" not in vars(model.optimizer)
    # Raising skips on_train_end; the model must still have its plain train function back.
    assert getattr(model.train_function, "gradmagic_functions", None) is None


def test_backward_only_nan_keeps_its_pinning_with_stop():
    # The guarded division: the forward pass is finite, the gradient of the hidden Inf is NaN.
    model, (x, y) = division_model(), division_data()
    monitor = GradientMonitor(on_anomaly="stop")
    with pytest.warns(UserWarning, match="'divide'"):
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    first = monitor.anomalies[0]
    assert (first.kind, first.layer, first.batch, first.weight) == ("nonfinite", "divide", 2, "d1/kernel")
    assert first.suspects == ("divide",)


def test_exploding_and_vanishing():
    model, (x, y) = mlp(), sample_data()
    monitor = GradientMonitor(explode_threshold=1e-6, vanish_threshold=1e9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    kinds = {a.kind for a in monitor.anomalies}
    assert kinds == {"exploding", "vanishing"}


def test_norm_tracker_checks_a_block_as_step_by_step():
    rng = np.random.default_rng(1)
    norms = np.exp(rng.normal(size=(120, 3)) * 2)
    norms[rng.random(norms.shape) < 0.05] = np.nan
    norms[70, 1] = 1e6
    one, block = NormTracker(3, 20, 30.0, None, 0.05), NormTracker(3, 20, 30.0, None, 0.05)
    stepwise = [(t, *found) for t in range(len(norms)) for found in one.check(norms[t])]
    blockwise = block.check_steps(norms[:7]) + [(t + 7, *f) for t, *f in block.check_steps(norms[7:])]
    assert stepwise == blockwise and ("exploding", 1) in {(k, w) for _, k, w, _ in stepwise}


def test_find_nonfinite_blames_the_single_layer_between_finite_and_not():
    from gradmagic.core.monitor.anomaly import find_nonfinite
    from gradmagic.core.monitor.columns import BUFFER_COLUMNS, column_index
    from gradmagic.core.questions.targets import WeightSlot

    # Layers: 0 d1 (weights), 1 divide (Lambda), 2 out (weights); backward order: out, divide, d1.
    slots = [WeightSlot(0, "d1", "d1/kernel", "kernel", (3, 4)), WeightSlot(2, "out", "out/kernel", "kernel", (4, 1))]
    names, types = ["d1", "divide", "out"], ["Dense", "Lambda", "Dense"]
    stats = np.zeros((2, len(BUFFER_COLUMNS)), np.float32)
    assert find_nonfinite(stats, slots, names, types) is None
    stats[0, column_index("nan")] = 3  # d1's gradient is NaN, out's (nearer the output) finite
    row, index, layer, suspects, _ = find_nonfinite(stats, slots, names, types)
    assert (row, index, layer, suspects) == (0, 1, "divide", ("divide",))
    stats[1, column_index("inf")] = 1  # every gradient non-finite: no layer in between to blame
    row, index, layer, suspects, why = find_nonfinite(stats, slots, names, types)
    assert (row, index, layer, suspects) == (1, 2, "out", ()) and "every weight gradient" in why
