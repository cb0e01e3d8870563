"""Benchmark integrated gradients against the hand-written compiled computation of the same path.

Run: ``.venv/bin/python benchmarks/attribution.py`` (``KERAS_BACKEND=jax`` or
``torch`` for those backends). On a small CNN (28x28x1, two convolutions, a
dense head), prints the median time per call of
``gm.integrated_gradients(model, x, steps=50)`` and of one hand-written
function that builds the same 50-point path, runs one batched forward and
backward pass over it and sums the gradients, and their ratio (the target is
<= 1.5x). The hand-written function is the backend's own: a ``tf.function``
with a ``GradientTape``; ``jax.jit(jax.value_and_grad(...))`` over
``model.stateless_call``; eager ``torch.autograd.grad``. Also for 4 samples at
once (200 points). Numbers are medians of interleaved rounds in one run;
compare ratios, not absolute times.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import keras
import numpy as np
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


def _trapezoid(steps: int) -> tuple[np.ndarray, np.ndarray]:
    alphas = np.linspace(0, 1, steps).astype("float32")
    weights = np.full(steps, 1 / (steps - 1), "float32")
    weights[[0, -1]] /= 2
    return alphas, weights


def hand_written(model: keras.Model, steps: int):
    """The whole trapezoid path in one batched forward + backward pass, written by hand for the backend.

    Returns ``(x, baseline, unit) -> (attribution, values)`` as NumPy arrays.
    """
    alphas, weights = _trapezoid(steps)
    lift = (1, steps, 1, 1, 1)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def integrated_jax(x, baseline, unit):
            points = baseline[:, None] + alphas.reshape(lift) * (x - baseline)[:, None]
            flat = points.reshape(-1, *x.shape[1:])

            def total(flat):
                y, _ = model.stateless_call(trainable, non_trainable, flat, training=False)
                values = jnp.take(y, unit, axis=1)
                return jnp.sum(values), values

            (_, values), grads = jax.value_and_grad(total, has_aux=True)(flat)
            return (x - baseline) * jnp.sum(grads.reshape(points.shape) * weights.reshape(lift), axis=1), values

        return lambda x, baseline, unit: [np.asarray(t) for t in integrated_jax(x, baseline, unit)]
    if backend == "torch":
        import torch

        def integrated_torch(x, baseline, unit):
            x, baseline = torch.as_tensor(x), torch.as_tensor(baseline)
            points = baseline[:, None] + torch.as_tensor(alphas).reshape(lift) * (x - baseline)[:, None]
            flat = points.reshape(-1, *x.shape[1:]).requires_grad_(True)
            values = model(flat, training=False)[:, unit]
            (grads,) = torch.autograd.grad(values.sum(), [flat])
            attribution = (x - baseline) * (grads.reshape(points.shape) * torch.as_tensor(weights).reshape(lift)).sum(1)
            return [attribution.numpy(), values.detach().numpy()]

        return integrated_torch
    import tensorflow as tf

    @tf.function
    def integrated(x, baseline, unit):
        a = tf.constant(alphas)[None, :, None, None, None]
        points = baseline[:, None] + a * (x - baseline)[:, None]
        flat = tf.reshape(points, (-1, *x.shape[1:]))
        with tf.GradientTape() as tape:
            tape.watch(flat)
            values = model(flat, training=False)[:, unit]
        grads = tf.reshape(tape.gradient(values, flat), tf.shape(points))
        return (x - baseline) * tf.reduce_sum(grads * tf.constant(weights)[None, :, None, None, None], axis=1), values

    return lambda x, baseline, unit: [t.numpy() for t in integrated(tf.constant(x), tf.constant(baseline), unit)]


def measure(model: keras.Model, x: np.ndarray) -> tuple[float, float]:
    """Median ms per call of gradmagic and of the hand-written path, after checking they agree."""
    baseline = np.zeros_like(x)
    unit = int(np.argmax(keras.ops.convert_to_numpy(model(x))[0]))
    hand = hand_written(model, 50)
    got = gm.integrated_gradients(model, x, output=unit, steps=50)  # default batching: one call here
    want = hand(x, baseline, unit)[0]
    # Same arithmetic in two compiled programs: equal to float32 rounding.
    np.testing.assert_allclose(got.array, want, rtol=1e-4, atol=1e-6)
    times = compare(
        {
            "gradmagic": lambda: gm.integrated_gradients(model, x, output=unit, steps=50),
            "hand-written": lambda: hand(x, baseline, unit),
        },
        calls=20,
        rounds=9,
    )
    return times["gradmagic"] * 1e3, times["hand-written"] * 1e3


def main() -> None:
    model = small_cnn()
    rng = np.random.default_rng(0)
    print(f"Keras backend: {keras.backend.backend()}")
    print(f"{'samples':>7} {'points':>6} {'gradmagic ms':>12} {'hand ms':>8} {'ratio':>6}  (target <= 1.5)")
    for batch in (1, 4):
        gm_ms, hand_ms = measure(model, rng.random((batch, 28, 28, 1)).astype("float32"))
        print(f"{batch:>7} {50 * batch:>6} {gm_ms:>12.2f} {hand_ms:>8.2f} {gm_ms / hand_ms:>6.2f}")


if __name__ == "__main__":
    main()
