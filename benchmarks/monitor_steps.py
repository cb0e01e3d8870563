"""GradientMonitor's steady-state cost per train step, beside the cost of one extra read of the gradients.

Same MLP and data as ``benchmarks/monitor.py`` (imported from it) (784-256-256-10, batch 32, Adam), but instead of
whole fits it times blocks of calls of each model's compiled train function,
interleaved block by block (order alternating), so that slow drifts of a shared
machine cancel in the per-block ratios:

  plain      the train step as Keras builds it
  one pass   the train step plus ONE ``reduce_sum`` over every gradient (a wrapper
             written here): the price of reading every gradient once more
  monitor    the train step with GradientMonitor's default recording (stats="norm": per
             weight one sum of squares written as one buffer row, the range test and the
             schedule test of one branch that is taken every 100th step only, where it
             writes every statistic)
  full       GradientMonitor(stats="full"): per weight sum, norm and max |g| every step

"paired" is the median over blocks of (block time / plain block time of the same
round); "extra" turns it into microseconds per step. "cpu paired" is the same ratio of
this process's CPU time (all its threads), which other processes on a shared machine
disturb less than the wall clock. Tracing is excluded: each
train function is warmed up first.

With ``--first N`` it times instead what a fresh model pays once, over N rounds: the
first call of the train function (Python tracing, then TensorFlow's graph
optimization and executor set-up) plain and with the monitor, and with the
monitor the first step that measures every statistic (its not-inlined branch is
optimized and instantiated when first taken) against a later such step. These
one-time costs are what a whole ``fit`` of a fresh model adds to the per-step ratio.

Usage: TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/monitor_steps.py [--blocks 200] [--steps 32] [--first 3]
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


def first_costs(kind: str, x, y) -> tuple[float, float, float]:
    """Seconds of a fresh model's first train-function call, and (monitor only) its first and a later full step."""
    iterator = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat())
    model = build()
    model.make_train_function()
    monitor = None
    if kind == "monitor":
        monitor = GradientMonitor()
        monitor.set_model(model)
        monitor.on_train_begin()
    function = model.train_function
    start = time.perf_counter()
    function(iterator)
    first = time.perf_counter() - start
    full = [0.0, 0.0]
    if monitor is not None:
        buffer = monitor._functions.buffer
        buffer.schedule(int(buffer.count.numpy()), 1)  # from now on every step measures everything
        for i in range(2):
            start = time.perf_counter()
            function(iterator)
            full[i] = time.perf_counter() - start
        monitor.detach()
    return first, full[0], full[1]


def main_first(rounds: int) -> None:
    x, y = data()
    print(f"before: {_load()}")
    other = _OtherLoad()
    for kind in ("plain", "monitor"):
        first_costs(kind, x, y)  # imports, process-wide caches
    runs: dict[str, list[tuple[float, float, float]]] = {"plain": [], "monitor": []}
    for r in range(rounds):
        for kind in ("plain", "monitor") if r % 2 == 0 else ("monitor", "plain"):
            runs[kind].append(first_costs(kind, x, y))
    print(f"after:  {_load()}")
    print(f"during: {other}")
    med = {k: [statistics.median(v[i] for v in runs[k]) * 1e3 for i in range(3)] for k in runs}
    print(f"fresh MLP, {rounds} interleaved rounds, medians in ms")
    print(f"first train-function call: plain {med['plain'][0]:.0f}, monitor {med['monitor'][0]:.0f}")
    print(f"monitor's first full-statistics step {med['monitor'][1]:.1f}, a later one {med['monitor'][2]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=200)
    parser.add_argument("--steps", type=int, default=32, help="train steps per block")
    parser.add_argument("--first", type=int, default=0, help="time one-time costs of fresh models instead")
    args = parser.parse_args()
    if args.first:
        main_first(args.first)
        return
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
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    for block in range(args.blocks):
        for kind in kinds if block % 2 == 0 else kinds[::-1]:
            step = steps[kind]
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step()
            times[kind].append((time.perf_counter() - start) / args.steps)
            cpu[kind].append((time.process_time() - start_cpu) / args.steps)
    for done in cleanups:
        done()
    print(f"after:  {_load()}")
    print(f"during: {other}")
    plain = statistics.median(times["plain"])
    print(
        f"MLP 784-256-256-10, batch {BATCH}, Adam; {args.blocks} interleaved blocks of {args.steps} train steps; "
        "per step: median (10th percentile); paired = median of per-block ratios to plain"
    )
    header = f"{'run':<10} {'ms/step':>16} {'paired':>8} {'extra us/step':>14} {'cpu paired':>11}"
    print(header)
    print("-" * len(header))
    for kind in kinds:
        values = sorted(times[kind])
        paired = statistics.median(t / p for t, p in zip(times[kind], times["plain"], strict=True))
        median, low = statistics.median(values) * 1e3, values[len(values) // 10] * 1e3
        cpu_paired = statistics.median(t / p for t, p in zip(cpu[kind], cpu["plain"], strict=True))
        print(
            f"{kind:<10} {median:7.3f} ({low:6.3f}) {paired:7.3f}x {(paired - 1) * plain * 1e6:14.0f} "
            f"{cpu_paired:10.3f}x"
        )


if __name__ == "__main__":
    main()
