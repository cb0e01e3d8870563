"""Benchmark the explorer in the kernel: slider move -> all plots updated.

Run: ``.venv/bin/python benchmarks/explorer.py``. Moves the slider of the explorer
on the seed regression net across its range, as the front-end would, and prints
the median time per move split into compute (the core's numbers) and draw
(artists updated, canvas repainted and the frame encoded for the browser, with
ipympl's canvas and with the PNG fallback). Target: <= 50 ms median in total.

Then the image view on ``keras.applications.MobileNetV2(input_shape=(96, 96, 3),
weights=None)``: the first panel draw (``gm.explore`` on a fresh model, the whole
integrated-gradients path traced and computed; target <= 5 s) and a move of the
path slider to the repainted, encoded figure (target <= 50 ms).
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from gradmagic import examples
from gradmagic.widgets.views import explore


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


def measure_image(use_ipympl: bool, moves: int = 40) -> tuple[float, float, float, float, int]:
    """First draw (s); median compute, draw ms per path-slider move; p90 total ms; full redraws."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), weights=None)
    images = np.random.default_rng(0).uniform(-1, 1, size=(2, 96, 96, 3)).astype("float32")
    start = time.perf_counter()
    panel = explore(model, images, use_ipympl=use_ipympl)
    first = time.perf_counter() - start
    canvas = panel.figure_view.canvas
    compute, draw = [], []
    for value in np.linspace(0.0, 1.0, moves):
        start = time.perf_counter()
        view = panel.compute((0, panel.unit_select.value, 0.0, float(value)))
        middle = time.perf_counter()
        panel.draw(view)
        if use_ipympl:
            canvas.get_diff_image()
        end = time.perf_counter()
        compute.append(middle - start)
        draw.append(end - middle)
    p90 = np.percentile(np.add(compute, draw), 90) * 1e3
    return first, statistics.median(compute) * 1e3, statistics.median(draw) * 1e3, p90, panel.figure_view.full_draws


def main() -> None:
    print(f"load average: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("median per slider move; target: total <= 50 ms")
    print(f"{'canvas':8} {'compute ms':>10} {'draw ms':>8} {'total ms':>9} {'p90 total':>10} {'full redraws':>13}")
    for use_ipympl in (True, False):
        compute, draw, p90, full = measure(use_ipympl)
        name = "ipympl" if use_ipympl else "png"
        print(f"{name:8} {compute:10.2f} {draw:8.2f} {compute + draw:9.2f} {p90:10.2f} {full:>8} of 61")
    print("\nimage view, MobileNetV2 96x96x3 (32 path steps): first draw target <= 5 s, path-slider move <= 50 ms")
    print(
        f"{'canvas':8} {'first s':>8} {'compute ms':>10} {'draw ms':>8} {'total ms':>9} {'p90 total':>10} {'full':>5}"
    )
    for use_ipympl in (True, False):
        first, compute, draw, p90, full = measure_image(use_ipympl)
        name = "ipympl" if use_ipympl else "png"
        print(f"{name:8} {first:8.2f} {compute:10.2f} {draw:8.2f} {compute + draw:9.2f} {p90:10.2f} {full:>5}")
    print(f"load average: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
