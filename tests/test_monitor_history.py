"""What the monitor hands back: columns, records, the per-layer summary and the printed lines."""

from __future__ import annotations

import pytest
from conftest import mlp
from monitor_helpers import sample_data

from gradmagic.core.monitor.callback import GradientMonitor


def test_layers_and_summary():
    model = mlp((3, 4, 2))
    x, y = sample_data()
    monitor = GradientMonitor()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    cols = monitor.to_dict()
    assert cols["layer"][:4] == [model.layers[0].name] * 2 + [model.layers[1].name] * 2
    assert cols["layer_index"][:4] == [0, 0, 1, 1]
    assert monitor.history[0]["weight"] == model.trainable_variables[0].path
    summary = monitor.summary()
    assert model.layers[1].name in repr(summary) and "<table" in summary._repr_html_()


def test_to_dataframe():
    pd = pytest.importorskip("pandas")
    model, (x, y) = mlp(), sample_data()
    monitor = GradientMonitor()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    frame = monitor.to_dataframe()
    assert isinstance(frame, pd.DataFrame) and len(frame) == 2 * 4


def test_print_mode_one_line_per_layer_per_batch(capsys):
    model, (x, y) = mlp((3, 4, 2)), sample_data(16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[GradientMonitor(print_every=1)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * 2  # 2 batches x 2 layers
    first = lines[0].split()
    assert first[:5] == ["epoch", "1", "batch", "1", "|"]
    assert first[5] == model.layers[0].name and first[6] == "norm" and first[8] == "max|g|"
    float(first[7]), float(first[9])
