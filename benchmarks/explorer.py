"""Benchmark the explorer in the kernel: slider move -> all three plots updated.

Run: ``.venv/bin/python benchmarks/explorer.py``. Moves the slider of the explorer
on the seed regression net across its range, as the front-end would, and prints
the median time per move split into compute (the core's numbers) and draw
(artists updated, canvas repainted and the frame encoded for the browser, with
ipympl's canvas and with the PNG fallback). Target: <= 50 ms median in total.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from gradmagic import examples
from gradmagic.widgets.explorer import explore


def measure(use_ipympl: bool, moves: int = 60) -> tuple[float, float, float, int]:
    """Median compute and draw ms per slider move, 90th-percentile total ms, full redraws needed."""
    model = examples.regression_net(seed=1)
    x, y = examples.regression_data(200)
    model.fit(x, y, epochs=20, batch_size=32, verbose=0)
    panel = explore(model, x, y, examples.regression_target, examples.regression_slope, use_ipympl=use_ipympl)
    canvas = panel.figure_view.canvas
    compute, draw = [], []
    for value in np.linspace(0.5, 9.5, moves):
        start = time.perf_counter()
        panel.point[0] = value
        view = panel.compute(panel._state())
        middle = time.perf_counter()
        panel.draw(view)
        if use_ipympl:
            canvas.get_diff_image()  # what ipympl encodes for the browser after a repaint
        end = time.perf_counter()
        compute.append(middle - start)
        draw.append(end - middle)
    total = np.percentile(np.add(compute, draw), 90) * 1e3
    return statistics.median(compute) * 1e3, statistics.median(draw) * 1e3, total, panel.figure_view.full_draws


def main() -> None:
    print("median per slider move; target: total <= 50 ms")
    print(f"{'canvas':8} {'compute ms':>10} {'draw ms':>8} {'total ms':>9} {'p90 total':>10} {'full redraws':>13}")
    for use_ipympl in (True, False):
        compute, draw, p90, full = measure(use_ipympl)
        name = "ipympl" if use_ipympl else "png"
        print(f"{name:8} {compute:10.2f} {draw:8.2f} {compute + draw:9.2f} {p90:10.2f} {full:>8} of 61")


if __name__ == "__main__":
    main()
