"""Benchmark the compute core against hand-written TensorFlow doing the same work.

Run: ``.venv/bin/python benchmarks/core.py``. Prints median times per call and the
ratios the core issue sets: steady-state call / compiled GradientTape (<= 1.2x),
eager GradientTape / steady-state call (>= 10x on the seed net), and input Jacobian
at 1,000 points / one compiled batched forward+backward (<= 3x). Numbers are
medians of interleaved rounds in one run; compare ratios, not absolute times.
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
from gradmagic import examples


def _tape_step(model: keras.Model):
    def step(x, y):
        with tf.GradientTape() as tape:
            pred = model(x, training=False)
            loss = model.compute_loss(x=x, y=y, y_pred=pred, training=False)
        return loss, tape.gradient(loss, model.trainable_weights)

    return step


def _to_numpy(outputs) -> None:
    loss, grads = outputs
    loss.numpy()
    for g in grads:
        g.numpy()


def weight_gradient_rows(name: str, model: keras.Model, x: np.ndarray, y: np.ndarray, with_eager: bool) -> list:
    compiled = tf.function(_tape_step(model), reduce_retracing=True)
    eager = _tape_step(model)
    candidates = {
        "gradmagic": lambda: gm.weight_gradients(model, x, y).arrays(),
        "compiled tape": lambda: _to_numpy(compiled(x, y)),
    }
    if with_eager:
        candidates["eager tape"] = lambda: _to_numpy(eager(x, y))
    times = compare(candidates, calls=100 if with_eager else 50)
    rows = [(name, "weight grads: gradmagic / compiled tape", times["gradmagic"] / times["compiled tape"], "<= 1.2")]
    if with_eager:
        rows.append((name, "weight grads: eager tape / gradmagic", times["eager tape"] / times["gradmagic"], ">= 10"))
    return rows, times


def jacobian_rows(model: keras.Model) -> list:
    x = np.linspace(0.0, 10.0, 1000, dtype="float32")[:, None]

    @tf.function
    def forward_backward(points):
        with tf.GradientTape() as tape:
            tape.watch(points)
            out = model(points, training=False)
        return tape.gradient(out, points)

    times = compare(
        {
            "gradmagic jacobian": lambda: gm.input_gradients(model, x).array,
            "forward+backward": lambda: forward_backward(x).numpy(),
        },
        calls=50,
    )
    ratio = times["gradmagic jacobian"] / times["forward+backward"]
    return [("seed net", "input Jacobian @1000 / fwd+bwd", ratio, "<= 3")], times


def main() -> None:
    keras.utils.set_random_seed(1)
    seed = examples.regression_net()
    x_seed, y_seed = examples.regression_data(10)
    mlp = keras.Sequential(
        [keras.Input((784,)), keras.layers.Dense(512, "relu"), keras.layers.Dense(512, "relu"), keras.layers.Dense(10)],
        name="mlp_784_512_512_10",
    )
    mlp.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x_mlp, y_mlp = rng.normal(size=(32, 784)).astype("float32"), rng.normal(size=(32, 10)).astype("float32")

    rows, all_times = [], {}
    for name, model, x, y, eager in (
        ("seed net 1-64-32-32-1, batch 10", seed, x_seed, y_seed, True),
        ("MLP 784-512-512-10, batch 32", mlp, x_mlp, y_mlp, False),
    ):
        new_rows, times = weight_gradient_rows(name, model, x, y, eager)
        rows += new_rows
        all_times[name] = times
    new_rows, times = jacobian_rows(seed)
    rows += new_rows
    all_times["seed net, 1,000 points"] = times

    print("median time per call (ms)")
    for name, times in all_times.items():
        print(f"  {name}: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in times.items()))
    print()
    print(f"{'model':34} {'ratio':42} {'measured':>9}  target")
    for model_name, what, ratio, target in rows:
        print(f"{model_name:34} {what:42} {ratio:9.2f}  {target}")


if __name__ == "__main__":
    main()
