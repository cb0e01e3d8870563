"""The callback as a whole: listeners and their cadence, the live panel, the core staying widget-free."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import pytest
from conftest import mlp
from monitor_helpers import sample_data

from gradmagic.core.monitor.callback import GradientMonitor, MonitorArgumentError


def test_listener_cadence_lowers_the_read_interval():
    model, (x, y) = mlp(), sample_data(64)
    monitor = GradientMonitor()  # reads every 100 batches by default
    seen = []
    monitor.add_listener(lambda m: seen.append(len(m.recorded)), every=3)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    # 16 batches: reads after batches 3, 6, 9, 12, 15, then at the epoch end.
    assert seen == [3, 6, 9, 12, 15, 16]
    with pytest.raises(MonitorArgumentError, match="every=0"):
        monitor.add_listener(print, every=0)


def test_live_panel_updates_during_fit_headless():
    from gradmagic.widgets.training_panel import TrainingPanel

    model, (x, y) = mlp((3, 4, 2)), sample_data(64)
    monitor = GradientMonitor(read_every=2)
    redraws_during_fit = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            redraws_during_fit.append(panel.redraws)

    # No time budget here: this checks that redraws happen while fit runs.
    panel = TrainingPanel(monitor, every=2, use_ipympl=False, max_fraction=1.0, min_interval=0.0)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[monitor, Probe()])
    assert redraws_during_fit[0] >= 1 and panel.redraws > redraws_during_fit[0]
    assert panel.image.value[:8] == b"\x89PNG\r\n\x1a\n" and panel.status.value == ""
    lines = panel.axes.get_lines()
    assert [ln.get_label() for ln in lines] == [model.layers[0].name, model.layers[1].name]
    assert len(lines[0].get_xdata()) == 16


def test_core_monitor_imports_no_ipython_or_widgets():
    # TensorFlow itself may import parts of IPython; gradmagic must add nothing of it.
    code = (
        "import sys, keras, tensorflow\n"
        "before = set(sys.modules)\n"
        "import gradmagic.core.monitor.callback\n"
        "print(any(m.split('.')[0] in ('IPython', 'ipywidgets') for m in set(sys.modules) - before))"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stderr[-1000:]
