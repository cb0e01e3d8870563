"""The state of one fit (session.py): where each recorded step falls in training time."""

from __future__ import annotations

import keras
import numpy as np
from conftest import mlp
from monitor_helpers import sample_data

from gradmagic.core.monitor.callback import GradientMonitor
from gradmagic.core.monitor.session import FitSession


def test_steps_and_batches_of_buffer_counts():
    # A buffer that had recorded 10 steps, a model at optimizer step 100, a second epoch from count 14.
    session = FitSession([], [], [], buffer=None, base_step=100, first_count=10, read=10, epoch_first=10)
    np.testing.assert_array_equal(session.steps(np.array([10, 11, 13])), [100, 101, 103])
    session.read = 14
    session.begin_epoch(1)
    assert (session.epoch, session.epoch_first, session.last_read_batch) == (1, 14, 0)
    np.testing.assert_array_equal(session.batches(np.array([14, 15])), [0, 1])


def test_a_session_exists_only_while_fit_runs():
    model, (x, y) = mlp(), sample_data(16)
    monitor = GradientMonitor()
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(monitor._session)

    assert monitor._session is None
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor, Probe()])
    assert all(isinstance(s, FitSession) for s in seen) and seen[0] is seen[1]
    assert monitor._session is None
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor, Probe()])
    assert seen[2] is not seen[0]  # each fit its own
