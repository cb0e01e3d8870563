"""Benchmark the diagnosis (explain, check_gradients) against one steady-state weight_gradients call.

Run: ``.venv/bin/python benchmarks/diagnose.py [--size 96] [--alpha 1.0] [--directions 16]``.
Builds MobileNetV2 (weights=None) at size x size, batch 2, and prints, side by side,
the median seconds of a steady-state ``weight_gradients`` call, the time of one
``explain`` and of one ``check_gradients`` with its defaults (each traces anew, as a
user's first call does), and their ratios to the steady-state call. The targets are
explain <= 5x and check_gradients <= 20x. One run, wall-clock: on a shared machine
report the load beside the numbers.
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


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--directions", type=int, default=None, help="max_directions (default: the default)")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2((args.size, args.size, 3), alpha=args.alpha, weights=None, classes=10)
    model.compile(loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0.0, 1.0, (2, args.size, args.size, 3)).astype("float32")
    y = np.array([1, 7])

    first = _seconds(lambda: gm.weight_gradients(model, x, y))
    steady = statistics.median(_seconds(lambda: gm.weight_gradients(model, x, y)) for _ in range(20))
    explain = _seconds(lambda: gm.explain(model, x, y))
    options = {} if args.directions is None else {"max_directions": args.directions}
    result = {}
    check = _seconds(lambda: result.setdefault("c", gm.check_gradients(model, x, y, verbose=False, **options)))
    c = result["c"]

    print(f"MobileNetV2 alpha={args.alpha} {args.size}x{args.size} batch 2, load average {os.getloadavg()[0]:.2f}")
    print(f"{'':28s}{'seconds':>10s}{'x steady':>10s}{'target':>8s}")
    rows = [
        ("weight_gradients (first)", first, ""),
        ("weight_gradients (steady)", steady, ""),
        ("explain", explain, "<= 5"),
        ("check_gradients" + (f" ({args.directions} dirs)" if args.directions else " (defaults)"), check, "<= 20"),
    ]
    for name, seconds, target in rows:
        print(f"{name:28s}{seconds:10.3f}{seconds / steady:10.1f}{target:>8s}")
    print(
        f"check: passed={c.passed}, {len(c.rows)} rows, {len(c.failed)} failed, "
        f"{len(c.not_smooth)} not smooth here, dtype {c.dtype}"
    )


if __name__ == "__main__":
    main()
