"""GradientMonitor overhead, side by side in one run.

MLP 784-256-256-10, batch 32, 2 epochs on 8,192 random samples (512 steps):
  plain        fit without callbacks (besides the epoch timer all runs have)
  monitor      fit with GradientMonitor() (default stats="norm": per-batch norms of every
               weight, every statistic every 100 batches)
  full         fit with GradientMonitor(stats="full") (every statistic every batch)
  recompute    fit with a baseline callback that recomputes the gradients of the
               same batch with a GradientTape in on_train_batch_end
  panel        fit with the monitor and a headless TrainingPanel (PNG redraws, default
               time budget: at most 3% of the training time, plus the final redraw)

Every run builds a fresh model, so "fit" includes tracing the train function;
"epoch 2" is the steady state. A second table times what a notebook does: the
same model and callbacks fit again and again on short runs (after a warm-up fit,
10 fits of 8 steps each), where the fixed cost of each ``fit`` counts. Runs are interleaved round by round (the order
alternates), so a load change on the machine hits every kind alike. The table
shows, per kind, the median and the minimum time, the ratio of medians to plain,
and the median of the per-round ratios (each run against the plain run of the
same round). Machine load is printed: the load average before and after (which
counts this benchmark too) and the CPU time other processes used during the run.
On a shared machine, trust a run only if the other processes stayed near 0.

Usage: TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/monitor.py [--repeats 7] [--kinds plain monitor]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

from gradmagic.core.monitor.callback import GradientMonitor

N, BATCH, EPOCHS = 8192, 32, 2


class RecomputeBaseline(keras.callbacks.Callback):
    """The naive alternative: a second forward+backward pass per batch, in the callback."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        super().__init__()
        self.x, self.y = x, y
        self.norms: list[np.ndarray] = []
        self._grad = None

    def on_train_begin(self, logs=None):
        model = self.model
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        @tf.function
        def grads(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            return [tf.norm(g) for g in tape.gradient(loss, model.trainable_variables)]

        self._grad = grads

    def on_train_batch_end(self, batch, logs=None):
        # Same batch as the step just taken (shuffle=False); after the update, as a
        # callback can only see it - which is also why this baseline is not exact.
        start = batch * BATCH
        norms = self._grad(self.x[start : start + BATCH], self.y[start : start + BATCH])
        self.norms.append(np.array([n.numpy() for n in norms]))


def build() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def data() -> tuple[np.ndarray, np.ndarray]:
    """The benchmark's N random samples: 784 features, 10 classes."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 784)).astype("float32"), rng.integers(0, 10, size=N)


class EpochTimer(keras.callbacks.Callback):
    """Wall time per epoch (no batch hooks, so Keras keeps its async dispatch)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def run(kind: str, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    model = build()
    timer = EpochTimer()
    callbacks: list = [timer]
    if kind in ("monitor", "full", "panel"):
        monitor = GradientMonitor(stats="full" if kind == "full" else "norm")
        callbacks.append(monitor)
        if kind == "panel":
            from gradmagic.widgets.training_panel import TrainingPanel

            TrainingPanel(monitor, use_ipympl=False)  # the default time budget
    elif kind == "recompute":
        callbacks.append(RecomputeBaseline(x, y))
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=callbacks)
    return time.perf_counter() - start, timer.times[-1]


def short_fits(kind: str, x: np.ndarray, y: np.ndarray, fits: int = 10, steps: int = 8) -> float:
    """Seconds for ``fits`` repeated fits of ``steps`` batches each, same model and callbacks, after a warm-up fit."""
    model = build()
    callbacks: list = []
    if kind in ("monitor", "full", "panel"):
        monitor = GradientMonitor(stats="full" if kind == "full" else "norm")
        callbacks.append(monitor)
        if kind == "panel":
            from gradmagic.widgets.training_panel import TrainingPanel

            TrainingPanel(monitor, use_ipympl=False)
    elif kind == "recompute":
        callbacks.append(RecomputeBaseline(x, y))
    x, y = x[: BATCH * steps], y[: BATCH * steps]
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    start = time.perf_counter()
    for _ in range(fits):
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    return time.perf_counter() - start


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min), {fifteen:.2f} (15 min) on {os.cpu_count()} CPUs"


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class _OtherLoad:
    """CPUs used by *other* processes while the benchmark ran (its own use subtracted)."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), _busy_cpu_seconds(), time.process_time())

    def __str__(self) -> str:
        wall0, busy0, own0 = self.start
        busy = _busy_cpu_seconds()
        if busy is None or busy0 is None:
            return "unknown (no /proc/stat)"
        wall = time.perf_counter() - wall0
        other = (busy - busy0) - (time.process_time() - own0)
        return f"{max(other, 0.0) / wall:.2f} CPUs busy with other processes on average (of {os.cpu_count()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    args = parser.parse_args()
    kinds = ["plain"] + [k for k in args.kinds if k != "plain"]
    x, y = data()
    print(f"before: {_load()}")
    other = _OtherLoad()
    for kind in kinds:  # warm-up: imports, first traces of shared functions
        run(kind, x[: BATCH * 4], y[: BATCH * 4])
    fits: dict[str, list[float]] = {k: [] for k in kinds}
    epochs: dict[str, list[float]] = {k: [] for k in kinds}
    shorts: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.repeats):
        order = kinds if r % 2 == 0 else kinds[::-1]  # interleave, alternate order
        for kind in order:
            total, last = run(kind, x, y)
            fits[kind].append(total)
            epochs[kind].append(last)
            shorts[kind].append(short_fits(kind, x, y))
    print(f"after:  {_load()}")
    print(f"during: {other}")
    print(
        f"MLP 784-256-256-10, batch {BATCH}, {EPOCHS} epochs, {N} samples; {args.repeats} interleaved rounds; "
        "times in s: median (min); ratio = median / plain median; paired = median of per-round ratios"
    )
    header = f"{'run':<10} {'fit':>14} {'ratio':>6} {'paired':>7}   {'epoch 2':>14} {'ratio':>6} {'paired':>7}"
    print(header)
    print("-" * len(header))
    for kind in kinds:
        cells = []
        for times in (fits, epochs):
            median, base = statistics.median(times[kind]), statistics.median(times["plain"])
            paired = statistics.median(t / p for t, p in zip(times[kind], times["plain"], strict=True))
            cells.append(f"{median:7.3f} ({min(times[kind]):.3f}) {median / base:5.3f}x {paired:6.3f}x")
        print(f"{kind:<10} {cells[0]}   {cells[1]}")
    print()
    print("Repeated short fits (same model and callbacks, after a warm-up fit): 10 fits of 8 steps")
    header = f"{'run':<10} {'10 fits':>14} {'ratio':>6} {'paired':>7} {'extra ms/fit':>13}"
    print(header)
    print("-" * len(header))
    base = statistics.median(shorts["plain"])
    for kind in kinds:
        median = statistics.median(shorts[kind])
        paired = statistics.median(t / p for t, p in zip(shorts[kind], shorts["plain"], strict=True))
        extra = (median - base) / 10 * 1e3
        print(f"{kind:<10} {median:7.3f} ({min(shorts[kind]):.3f}) {median / base:5.3f}x {paired:6.3f}x {extra:13.1f}")


KINDS = ["plain", "monitor", "full", "recompute", "panel"]

if __name__ == "__main__":
    main()
