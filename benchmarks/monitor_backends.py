"""GradientMonitor's per-step cost on the Keras backend in use (TensorFlow, JAX or PyTorch).

The MLP 784-256-256-10, batch 32, Adam (as ``benchmarks/monitor.py``), trained by
whole ``fit`` calls of ``--steps`` batches, one model per kind, warmed up first (each
kind's train function is compiled once and reused, as in a notebook). Rounds are
interleaved, the order alternating, and each round's time is divided by the plain
time of the same round ("paired"), so slow drifts of a shared machine cancel. Both
wall time and the process's CPU time (all threads; steadier on a loaded machine,
where wall time also counts other processes' turns) are reported:

  plain      fit without the monitor
  monitor    GradientMonitor() (stats="norm": one sum of squares per weight and step)
  full       GradientMonitor(stats="full"): sum, norm, max |g|, NaN/Inf counts every step
  callback   (JAX only) no monitor; the same norm statistics sent to the host from
             inside the jitted step by ``jax.debug.callback`` every step: what a
             host-callback design would cost instead of returning them from the step

Usage: KERAS_BACKEND=jax python benchmarks/monitor_backends.py [--rounds 9] [--steps 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import gradmagic as gm

BATCH = 32


def build() -> keras.Model:
    init = keras.initializers.GlorotUniform
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(256, activation="relu", kernel_initializer=init(1)),
            keras.layers.Dense(256, activation="relu", kernel_initializer=init(2)),
            keras.layers.Dense(10, kernel_initializer=init(3)),
        ]
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def host_callback(model: keras.Model) -> None:
    """Send each step's per-weight norms to the host with ``jax.debug.callback`` (inside the jitted step)."""
    import jax
    import jax.numpy as jnp

    received = []
    optimizer = model.optimizer
    original = optimizer.stateless_apply

    def stateless_apply(optimizer_variables, grads, trainable_variables):
        sums = jnp.stack([jnp.sum(jnp.square(g)) for g in grads])
        jax.debug.callback(lambda s: received.append(np.asarray(s)), jnp.sqrt(sums))
        return original(optimizer_variables, grads, trainable_variables)

    object.__setattr__(optimizer, "stateless_apply", stateless_apply)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.steps * BATCH, 784)).astype("float32")
    y = rng.integers(0, 10, size=args.steps * BATCH)
    kinds = ["plain", "monitor", "full"] + (["callback"] if keras.backend.backend() == "jax" else [])
    runs = {}
    for kind in kinds:
        model = build()
        callbacks = []
        if kind == "callback":
            host_callback(model)
        elif kind != "plain":
            callbacks = [gm.GradientMonitor(stats="norm" if kind == "monitor" else "full")]
        runs[kind] = (model, callbacks)

    def fit(kind: str) -> tuple[float, float]:
        model, callbacks = runs[kind]
        wall, cpu = time.perf_counter(), time.process_time()
        model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=callbacks)
        return time.perf_counter() - wall, time.process_time() - cpu

    for kind in kinds:  # compile and warm up
        fit(kind), fit(kind)
    times = {kind: [] for kind in kinds}
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            times[kind].append(fit(kind))
    print(f"backend {keras.backend.backend()}: {args.steps} steps per fit, {args.rounds} interleaved rounds")
    print(f"{'kind':9s} {'clock':5s} {'ms/step':>8s} {'paired':>7s} {'extra us/step':>14s}")
    for clock, index in (("wall", 0), ("cpu", 1)):
        plain = [t[index] for t in times["plain"]]
        for kind in kinds:
            mine = [t[index] for t in times[kind]]
            ratio = statistics.median(t / p for t, p in zip(mine, plain, strict=True))
            step = statistics.median(mine) / args.steps
            extra = (ratio - 1) * statistics.median(plain) / args.steps * 1e6
            print(f"{kind:9s} {clock:5s} {step * 1e3:8.3f} {ratio:7.3f} {extra:14.1f}")


if __name__ == "__main__":
    main()
