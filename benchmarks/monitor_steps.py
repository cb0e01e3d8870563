"""GradientMonitor's steady-state cost per train step, beside the cost of one extra read of the gradients.

Same MLP and data as ``benchmarks/monitor.py`` (imported from it) (784-256-256-10, batch 32, Adam), but instead of
whole fits it times blocks of calls of each model's compiled train function,
interleaved block by block (order alternating), so that slow drifts of a shared
machine cancel in the per-block ratios:

  plain      the train step as Keras builds it
  one pass   the train step plus ONE ``reduce_sum`` over every gradient (a wrapper
             written here): the price of reading every gradient once more
  monitor    the train step with GradientMonitor's default recording (stats="norm": per
             weight one sum of squares, from Adam's g**2, the non-finite check, one
             buffer row write per step; every statistic every 100th step)
  full       GradientMonitor(stats="full"): per weight sum, norm and max |g| every step

"paired" is the median over blocks of (block time / plain block time of the same
round); "extra" turns it into microseconds per step. Tracing is excluded: each
train function is warmed up first.

Usage: TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/monitor_steps.py [--blocks 200] [--steps 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import tensorflow as tf
from monitor import BATCH, _load, _OtherLoad, build, data

from gradmagic.core.monitor.callback import GradientMonitor


def add_one_pass(model: keras.Model) -> None:
    """Make the model's train step also sum every gradient once (into a variable, so it runs)."""
    optimizer = model.optimizer
    original = optimizer.apply
    sink = tf.Variable(tf.zeros([len(model.trainable_variables)]), trainable=False)

    def apply(grads, trainable_variables=None):
        grads = list(grads)
        result = original(grads, trainable_variables)
        sink.assign(tf.stack([tf.reduce_sum(g) for g in grads]))
        return result

    object.__setattr__(optimizer, "apply", apply)


def train_step(kind: str, iterator) -> tuple[Callable[[], object], Callable[[], None]]:
    """A warmed-up train function of a fresh model for ``kind``, and a clean-up function."""
    model = build()
    done = lambda: None  # noqa: E731
    if kind == "one pass":
        add_one_pass(model)
    model.make_train_function()
    if kind in ("monitor", "full"):
        monitor = GradientMonitor(stats="full" if kind == "full" else "norm")
        monitor.set_model(model)
        monitor.on_train_begin()  # what fit does: wraps the train function
        done = monitor.detach
    function = model.train_function
    for _ in range(5):
        function(iterator)
    return (lambda: function(iterator)), done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=200)
    parser.add_argument("--steps", type=int, default=32, help="train steps per block")
    args = parser.parse_args()
    x, y = data()
    print(f"before: {_load()}")
    other = _OtherLoad()
    kinds = ["plain", "one pass", "monitor", "full"]
    steps, cleanups = {}, []
    for kind in kinds:
        iterator = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat().prefetch(4))
        steps[kind], done = train_step(kind, iterator)
        cleanups.append(done)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for block in range(args.blocks):
        for kind in kinds if block % 2 == 0 else kinds[::-1]:
            step = steps[kind]
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[kind].append((time.perf_counter() - start) / args.steps)
    for done in cleanups:
        done()
    print(f"after:  {_load()}")
    print(f"during: {other}")
    plain = statistics.median(times["plain"])
    print(
        f"MLP 784-256-256-10, batch {BATCH}, Adam; {args.blocks} interleaved blocks of {args.steps} train steps; "
        "per step: median (10th percentile); paired = median of per-block ratios to plain"
    )
    header = f"{'run':<10} {'ms/step':>16} {'paired':>8} {'extra us/step':>14}"
    print(header)
    print("-" * len(header))
    for kind in kinds:
        values = sorted(times[kind])
        paired = statistics.median(t / p for t, p in zip(times[kind], times["plain"], strict=True))
        median, low = statistics.median(values) * 1e3, values[len(values) // 10] * 1e3
        print(f"{kind:<10} {median:7.3f} ({low:6.3f}) {paired:7.3f}x {(paired - 1) * plain * 1e6:14.0f}")


if __name__ == "__main__":
    main()
