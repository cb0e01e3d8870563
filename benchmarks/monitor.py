"""GradientMonitor overhead, side by side in one run.

MLP 784-256-256-10, batch 32, 2 epochs on 8,192 random samples (512 steps):
  plain        fit without callbacks
  monitor      fit with GradientMonitor (per-batch statistics of every weight)
  recompute    fit with a baseline callback that recomputes the gradients of the
               same batch with a GradientTape in on_train_batch_end
  panel        fit with the monitor and a headless TrainingPanel (PNG redraws)
Runs are interleaved and repeated; the table shows medians and ratios to plain,
for the whole fit (first epoch includes tracing the train function) and for the
second epoch alone (steady state, no tracing).

Usage: TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/monitor.py [--repeats 5]
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

from gradmagic.core.monitor import GradientMonitor

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
    if kind in ("monitor", "panel"):
        monitor = GradientMonitor()
        callbacks.append(monitor)
        if kind == "panel":
            from gradmagic.widgets.training_panel import TrainingPanel

            TrainingPanel(monitor, every=64, use_ipympl=False)
    elif kind == "recompute":
        callbacks.append(RecomputeBaseline(x, y))
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=callbacks)
    return time.perf_counter() - start, timer.times[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 784)).astype("float32")
    y = rng.integers(0, 10, size=N)
    kinds = ["plain", "monitor", "recompute", "panel"]
    for kind in kinds:  # warm-up: imports, first traces
        run(kind, x[: BATCH * 4], y[: BATCH * 4])
    fits: dict[str, list[float]] = {k: [] for k in kinds}
    epochs: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.repeats):
        order = kinds if r % 2 == 0 else kinds[::-1]  # interleave, alternate order
        for kind in order:
            total, last = run(kind, x, y)
            fits[kind].append(total)
            epochs[kind].append(last)
    plain_fit, plain_epoch = statistics.median(fits["plain"]), statistics.median(epochs["plain"])
    print(f"MLP 784-256-256-10, batch {BATCH}, {EPOCHS} epochs, {N} samples, median of {args.repeats} (min)")
    print(f"{'run':<10} {'fit s':>7} {'(min)':>7} {'ratio':>6}   {'epoch 2 s':>9} {'(min)':>7} {'ratio':>6}")
    for kind in kinds:
        fit, epoch = statistics.median(fits[kind]), statistics.median(epochs[kind])
        print(
            f"{kind:<10} {fit:7.3f} {min(fits[kind]):7.3f} {fit / plain_fit:5.2f}x   "
            f"{epoch:9.3f} {min(epochs[kind]):7.3f} {epoch / plain_epoch:5.2f}x"
        )


if __name__ == "__main__":
    main()
