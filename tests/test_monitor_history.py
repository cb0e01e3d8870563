"""What the monitor hands back: columns, records, the per-layer summary and the printed lines."""

from __future__ import annotations

import numpy as np
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


def _slots():
    from gradmagic.core.questions.targets import WeightSlot

    return [
        WeightSlot(0, "d1", "d1/kernel", "kernel", (3, 4)),
        WeightSlot(0, "d1", "d1/bias", "bias", (4,)),
        WeightSlot(2, "out", "out/kernel", "kernel", (4, 1)),
    ]


def _rows(values):
    """Host rows ``[steps, weights, BUFFER_COLUMNS]`` from ``{column: [steps, weights]}``."""
    from gradmagic.core.monitor.columns import BUFFER_COLUMNS, column_index

    steps, weights = np.shape(next(iter(values.values())))
    rows = np.zeros((steps, weights, len(BUFFER_COLUMNS)), np.float32)
    for name, value in values.items():
        rows[..., column_index(name)] = value
    return rows


def test_history_columns_and_layer_norms_from_hand_made_rows():
    from gradmagic.core.monitor.history import MonitorHistory

    history = MonitorHistory(_slots())
    norm = [[3.0, 4.0, 1.0], [6.0, 8.0, 2.0]]
    full = [[1, 1, 1], [0, 0, 0]]
    history.append(np.array([7, 8]), np.array([0, 0]), np.array([3, 4]), _rows({"norm": norm, "full": full}))
    names, layers = history.layer_norms()
    assert names == ["d1", "out"]
    np.testing.assert_allclose(layers, [[5.0, 1.0], [10.0, 2.0]])  # sqrt(3^2 + 4^2), sqrt(6^2 + 8^2)
    cols = history.to_dict()
    assert cols["step"] == [7, 7, 7, 8, 8, 8] and cols["batch"] == [3, 3, 3, 4, 4, 4]
    assert cols["norm"] == [3.0, 4.0, 1.0, 6.0, 8.0, 2.0]
    assert cols["full"] == [True] * 3 + [False] * 3


def test_layer_lines_combine_a_layers_weights_and_mark_what_was_not_measured():
    from gradmagic.core.monitor.history import layer_lines

    rows = _rows({"norm": [[3.0, 4.0, 1.0]], "max_abs": [[0.5, 2.0, 0.25]], "nan": [[0, 2, 0]], "full": [[1, 1, 1]]})
    lines = layer_lines(0, 4, 9, _slots(), rows[0])
    assert lines[0].split() == [
        "epoch",
        "1",
        "batch",
        "5",
        "|",
        "d1",
        "norm",
        "5.000e+00",
        "max|g|",
        "2.000e+00",
        "NaN/Inf",
        "x2",
    ]
    assert lines[1].split() == ["epoch", "1", "batch", "5", "|", "out", "norm", "1.000e+00", "max|g|", "2.500e-01"]
    unmeasured = _rows({"norm": [[3.0, 4.0, 1.0]]})
    assert "max|g| -" in layer_lines(0, 4, 9, _slots(), unmeasured[0])[0]
