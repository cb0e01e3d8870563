"""Benchmark integrated gradients against the hand-written compiled computation of the same path.

Run: ``.venv/bin/python benchmarks/attribution.py``. On a small CNN (28x28x1,
two convolutions, a dense head), prints the median time per call of
``gm.integrated_gradients(model, x, steps=50)`` and of one hand-written
``tf.function`` that builds the same 50-point path, runs one batched forward and
backward pass over it and sums the gradients, and their ratio (the target is
<= 1.5x). Also for 4 samples at once (200 points). Numbers are medians of
interleaved rounds in one run; compare ratios, not absolute times.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import keras
import numpy as np
import tensorflow as tf
from _timing import compare

import gradmagic as gm


def small_cnn() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ],
        name="small_cnn",
    )


def hand_written(model: keras.Model, steps: int):
    """The whole trapezoid path in one compiled, batched forward + backward pass, written by hand."""
    alphas = tf.constant(np.linspace(0, 1, steps), tf.float32)
    weights = np.full(steps, 1 / (steps - 1), "float32")
    weights[[0, -1]] /= 2
    weights = tf.constant(weights)

    @tf.function
    def integrated(x, baseline, unit):
        a = alphas[None, :, None, None, None]
        points = baseline[:, None] + a * (x - baseline)[:, None]
        flat = tf.reshape(points, (-1, *x.shape[1:]))
        with tf.GradientTape() as tape:
            tape.watch(flat)
            values = model(flat, training=False)[:, unit]
        grads = tf.reshape(tape.gradient(values, flat), tf.shape(points))
        return (x - baseline) * tf.reduce_sum(grads * weights[None, :, None, None, None], axis=1), values

    return integrated


def measure(model: keras.Model, x: np.ndarray) -> tuple[float, float]:
    """Median ms per call of gradmagic and of the hand-written path, after checking they agree."""
    baseline = np.zeros_like(x)
    unit = int(np.argmax(model(x).numpy()[0]))
    hand = hand_written(model, 50)
    got = gm.integrated_gradients(model, x, output=unit, steps=50)  # default batching: one call here
    want = hand(tf.constant(x), tf.constant(baseline), unit)[0].numpy()
    # Same arithmetic in two compiled graphs: equal to float32 rounding.
    np.testing.assert_allclose(got.array, want, rtol=1e-4, atol=1e-6)
    times = compare(
        {
            "gradmagic": lambda: gm.integrated_gradients(model, x, output=unit, steps=50),
            "hand-written": lambda: [t.numpy() for t in hand(tf.constant(x), tf.constant(baseline), unit)],
        },
        calls=20,
        rounds=9,
    )
    return times["gradmagic"] * 1e3, times["hand-written"] * 1e3


def main() -> None:
    model = small_cnn()
    rng = np.random.default_rng(0)
    print(f"{'samples':>7} {'points':>6} {'gradmagic ms':>12} {'hand ms':>8} {'ratio':>6}  (target <= 1.5)")
    for batch in (1, 4):
        gm_ms, hand_ms = measure(model, rng.random((batch, 28, 28, 1)).astype("float32"))
        print(f"{batch:>7} {50 * batch:>6} {gm_ms:>12.2f} {hand_ms:>8.2f} {gm_ms / hand_ms:>6.2f}")


if __name__ == "__main__":
    main()
