"""Benchmark the first and the steady-state weight_gradients call against a hand-written tape.

Run: ``.venv/bin/python benchmarks/first_call.py [--rounds 3] [--models mobilenetv2,lstm,gru]``.
A first call pays for tracing and compiling, and both sides pay it once per
process (TensorFlow's lazy start-up too), so every measurement runs in a fresh
process: it builds the model, warms TensorFlow up on an unrelated tiny
``tf.function``, imports gradmagic's compute core (timed apart and printed: as
importing TensorFlow is for the tape, a one-time cost per process, not per
model), then times the first call and the median of 30 steady calls of either
``gm.weight_gradients`` or a hand-written ``tf.function`` around a ``GradientTape``
(the compiled loss through ``model.compute_loss``, as ``benchmarks/core.py``
writes it). Rounds alternate which side runs first. The
targets: first call <= 1.2x and steady state <= 1.2x the hand-written tape,
on the recurrent models as on the others. Compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MODELS = {
    "mobilenetv2": "MobileNetV2 96x96, batch 2",
    "lstm": "LSTM 20x8 -> 32 -> Dense 10, batch 16",
    "gru": "GRU 20x8 -> 32 -> Dense 10, batch 16",
}


def _build(kind: str):
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if kind == "mobilenetv2":
        model = keras.applications.MobileNetV2((96, 96, 3), alpha=1.0, weights=None, classes=10)
        x, y = rng.uniform(0.0, 1.0, (2, 96, 96, 3)).astype("float32"), np.array([1, 7])
        model.compile(loss="sparse_categorical_crossentropy")
    else:
        recurrent = keras.layers.LSTM if kind == "lstm" else keras.layers.GRU
        inputs = keras.Input((20, 8))
        model = keras.Model(inputs, keras.layers.Dense(10)(recurrent(32)(inputs)))
        x, y = rng.normal(size=(16, 20, 8)).astype("float32"), np.arange(16) % 10
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, x, y


def _one(kind: str, who: str) -> dict:
    """Time the first call and the steady state of one side, in this (fresh) process."""
    import keras
    import tensorflow as tf

    import gradmagic as gm

    warm = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    tf.function(lambda t: tf.gradients(warm(t), warm.trainable_weights))(tf.ones((1, 2)))
    model, x, y = _build(kind)
    start = time.perf_counter()
    weight_gradients = gm.weight_gradients  # the lazy import of the compute core
    imported = time.perf_counter() - start
    if who == "gradmagic":

        def call():
            return weight_gradients(model, x, y).arrays()
    else:

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                pred = model(x, training=False)
                loss = model.compute_loss(x=x, y=y, y_pred=pred, training=False)
            return loss, tape.gradient(loss, model.trainable_weights)

        def call():
            loss, grads = step(x, y)
            return [loss.numpy(), *(g.numpy() for g in grads)]

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    steady = []
    for _ in range(30):
        start = time.perf_counter()
        call()
        steady.append(time.perf_counter() - start)
    return {"first": first, "steady": statistics.median(steady), "import": imported}


def _run_one(kind: str, who: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", kind, who], capture_output=True, text=True, check=True, env=os.environ
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="mobilenetv2,lstm,gru")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(*args.one)))
        return
    before = os.getloadavg()
    print(f"{'model':40} {'first: gm / tape (s)':>24} {'ratio':>6} {'steady: gm / tape (ms)':>24} {'ratio':>6}")
    imports = []
    for kind in args.models.split(","):
        firsts, steadies, times = [], [], {"gradmagic": [], "tape": []}
        for r in range(args.rounds):
            order = ("gradmagic", "tape") if r % 2 == 0 else ("tape", "gradmagic")
            got = {who: _run_one(kind, who) for who in order}
            for who in order:
                times[who].append(got[who])
            imports.append(got["gradmagic"]["import"])
            firsts.append(got["gradmagic"]["first"] / got["tape"]["first"])
            steadies.append(got["gradmagic"]["steady"] / got["tape"]["steady"])
        gm_first = statistics.median(t["first"] for t in times["gradmagic"])
        tape_first = statistics.median(t["first"] for t in times["tape"])
        gm_steady = statistics.median(t["steady"] for t in times["gradmagic"]) * 1e3
        tape_steady = statistics.median(t["steady"] for t in times["tape"]) * 1e3
        print(
            f"{MODELS[kind]:40} {gm_first:11.2f} / {tape_first:<10.2f} {statistics.median(firsts):5.2f}x "
            f"{gm_steady:11.2f} / {tape_steady:<10.2f} {statistics.median(steadies):5.2f}x"
        )
    print(f"importing gradmagic's core (once per process, not in 'first'): {statistics.median(imports):.2f} s")
    print(f"ratios: median over {args.rounds} rounds of paired fresh processes; targets <= 1.2x both")
    print(f"load average before {before[0]:.2f}, after {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
