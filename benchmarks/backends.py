"""Benchmark the gradient questions on JAX or PyTorch against hand-written code on the same backend.

Run once per backend (Keras fixes its backend at import)::

    KERAS_BACKEND=jax .venv/bin/python benchmarks/backends.py
    KERAS_BACKEND=torch .venv/bin/python benchmarks/backends.py

Prints median times per call of interleaved rounds and the ratios the targets
are set for: steady-state ``weight_gradients`` / the fastest hand-written
compiled gradient on the same backend (<= 1.2x; JAX: ``jax.jit(jax.value_and_grad)``
over ``model.stateless_call``, its results copied to the host array by array or
as one concatenated array, as gradmagic does for small gradients; PyTorch: eager
``torch.autograd.grad`` and ``torch.compile`` of the same step; the fastest
one counts; PyTorch also shows, for information, the same step traced by hand
into an ATen graph with ``make_fx``, the technique gradmagic uses), and the input
Jacobian at 1,000 points / one batched forward+backward (<= 3x). On JAX a
repeated question runs its proof that the model is unchanged while XLA
computes (see ``gradmagic.core.questions.repeats``): the small net's ratio
needs a second free core; with one (``taskset -c 0``, or another busy process)
the proof's Python time adds to the call. It also times input and output gradients asked
again at 5 points, the short way against the full way. On PyTorch it
also prints eager autograd against ``torch.compile`` on the MLP and a small
CNN: the measurement behind the PyTorch backend's ``compile`` choice. Every
candidate returns NumPy, as gradmagic does. Compare ratios, not absolute times.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import keras
import numpy as np
from _timing import compare

import gradmagic as gm
from gradmagic import examples

BACKEND = keras.backend.backend()


def _mlp() -> keras.Model:
    model = keras.Sequential(
        [keras.Input((784,)), keras.layers.Dense(512, "relu"), keras.layers.Dense(512, "relu"), keras.layers.Dense(10)],
        name="mlp_784_512_512_10",
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def _cnn() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ],
        name="cnn_16_32",
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def _jax_step(model: keras.Model):
    import jax
    import jax.numpy as jnp

    def loss_of(trainable, non_trainable, x, y):
        pred, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        return jnp.mean(jnp.square(pred - y))

    step = jax.jit(jax.value_and_grad(loss_of))

    def run(x, y):
        loss, grads = step(
            [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables], x, y
        )
        return float(loss), [np.asarray(g) for g in grads]

    @jax.jit
    def packed_step(trainable, non_trainable, x, y):
        loss, grads = jax.value_and_grad(loss_of)(trainable, non_trainable, x, y)
        return jnp.concatenate([loss[None], *(jnp.ravel(g) for g in grads)])

    shapes = [tuple(v.shape) for v in model.trainable_variables]
    ends = np.cumsum([1] + [int(np.prod(s)) for s in shapes])

    def run_packed(x, y):
        # The same step bringing loss and gradients to the host as one array (fewer transfers), split there.
        flat = np.asarray(
            packed_step(
                [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables], x, y
            )
        )
        return float(flat[0]), [flat[a:b].reshape(s) for a, b, s in zip(ends[:-1], ends[1:], shapes)]

    return {"jax.jit(value_and_grad)": run, "jax.jit, one transfer": run_packed}


def _torch_steps(model: keras.Model):
    import torch

    params = [v.value for v in model.trainable_variables]

    def step(x, y):
        loss = torch.mean(torch.square(model(x, training=False) - y))
        return loss, torch.autograd.grad(loss, params)

    # Static shapes: one model and batch size per step. (Dynamo keys its cache by the step's code, shared by
    # every model here; "automatic dynamic" shapes on the second model make Inductor fail on this PyTorch.)
    torch._dynamo.reset()
    compiled = torch.compile(step, dynamic=False)

    def runner(fn):
        def run(x, y):
            loss, grads = fn(torch.as_tensor(x), torch.as_tensor(y))
            return float(loss.detach()), [g.numpy() for g in grads]

        return run

    # The technique gradmagic uses, written by hand without its checks and result objects: an ATen graph of the
    # step traced once with make_fx. Reported for information: it is not how PyTorch code is written by hand.
    from torch.fx.experimental.proxy_tensor import make_fx

    variables = model.trainable_variables

    def functional_step(values, x, y):
        values = [v.detach().requires_grad_(True) for v in values]
        with torch.enable_grad(), keras.StatelessScope(state_mapping=list(zip(variables, values))):
            loss = torch.mean(torch.square(model(x, training=False) - y))
            return loss.detach(), torch.autograd.grad(loss, values)

    graphs = {}

    def traced(x, y):
        key = (tuple(x.shape), tuple(y.shape))
        values = [p.detach() for p in params]
        if key not in graphs:
            graphs[key] = make_fx(functional_step, tracing_mode="fake")(values, x, y)
        with torch.no_grad():
            return graphs[key](values, x, y)

    return {"eager autograd": runner(step), "torch.compile": runner(compiled), TRACED: runner(traced)}


#: Timed for information only (see ``_torch_steps``); the target compares with the other hand-written steps.
TRACED = "hand-traced make_fx graph"


def weight_rows(name: str, model: keras.Model, x: np.ndarray, y: np.ndarray) -> tuple[list, dict]:
    hand = _jax_step(model) if BACKEND == "jax" else _torch_steps(model)
    first, failed = {}, {}
    for label, fn in list(hand.items()):
        start = time.perf_counter()
        try:
            _, grads = fn(x, y)  # compile outside the timing; the first call's time is reported
        except Exception as exc:  # torch.compile may fail on a model: say so, time the rest
            failed[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            del hand[label]
            continue
        first[label] = time.perf_counter() - start
        reference = gm.weight_gradients(model, x, y).arrays()
        # A float32 reference from another program: the same numbers up to round-off.
        assert all(np.allclose(g, r, rtol=1e-4, atol=1e-5) for g, r in zip(grads, reference)), label
    candidates = {
        "gradmagic": lambda: gm.weight_gradients(model, x, y).arrays(),
        **{k: (lambda f=f: f(x, y)) for k, f in hand.items()},
    }
    times = compare(candidates, calls=20, rounds=9)
    best = min((k for k in hand if k != TRACED), key=lambda k: times[k])
    rows = [(name, f"weight grads: gradmagic / {best}", times["gradmagic"] / times[best], "<= 1.2")]
    rows += [(name, f"  (gradmagic / {k})", times["gradmagic"] / times[k], "info") for k in hand if k != best]
    if "torch.compile" in times:
        ratio = times["torch.compile"] / times["eager autograd"]
        rows.append((name, "hand-written: torch.compile / eager", ratio, "info"))
    for label, seconds in first.items():
        times[f"{label} first call"] = seconds
    for label, reason in failed.items():
        print(f"  {name}: {label} failed: {reason}")
    return rows, times


def jacobian_rows(model: keras.Model) -> tuple[list, dict]:
    x = np.linspace(0.0, 10.0, 1000, dtype="float32")[:, None]
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        @jax.jit
        def fwd_bwd(trainable, non_trainable, points):
            def total(p):
                out, _ = model.stateless_call(trainable, non_trainable, p, training=False)
                return jnp.sum(out)

            return jax.grad(total)(points)

        def forward_backward():
            values = [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]
            return np.asarray(fwd_bwd(*values, x))
    else:
        import torch

        def forward_backward():
            points = torch.as_tensor(x).requires_grad_(True)
            out = model(points, training=False)
            return torch.autograd.grad(out.sum(), points)[0].numpy()

    times = compare(
        {"gradmagic jacobian": lambda: gm.input_gradients(model, x).array, "forward+backward": forward_backward},
        calls=20,
        rounds=9,
    )
    return [
        ("seed net", "input Jacobian @1000 / fwd+bwd", times["gradmagic jacobian"] / times["forward+backward"], "<= 3")
    ], times


def repeat_rows(model: keras.Model) -> tuple[list, dict]:
    """A slider's question asked again at 5 points: the short way against the full way with the function cached.

    The full way is forced by forgetting the last call before each one (its
    compiled function stays cached), as any changed argument would.
    """
    from gradmagic.core.questions import stateless_functions

    x = np.linspace(0.0, 10.0, 5, dtype="float32")[:, None]
    y = np.zeros((5, 1), "float32")
    asks = {
        "input": lambda: gm.input_gradients(model, x).array,
        "output": lambda: gm.output_gradients(model, x, y, layer=2).array,
    }

    def full_way(kind: str):
        def run():
            stateless_functions.remember_call(model, kind, None)
            return asks[kind]()

        return run

    candidates = {}
    for kind in asks:
        candidates[f"{kind} grads short way"] = asks[kind]
        candidates[f"{kind} grads full way"] = full_way(kind)
    times = compare(candidates, calls=20, rounds=9)
    rows = [
        (
            "seed net, 5 points",
            f"{kind} grads: full way / short way",
            times[f"{kind} grads full way"] / times[f"{kind} grads short way"],
            "info",
        )
        for kind in asks
    ]
    return rows, times


def main() -> None:
    if BACKEND not in ("jax", "torch"):
        raise SystemExit(
            f"Run with KERAS_BACKEND=jax or torch (this is {BACKEND!r}); benchmarks/core.py covers TensorFlow."
        )
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(0)
    seed = examples.regression_net()
    x_seed, y_seed = examples.regression_data(10)
    cases = [
        ("seed net 1-64-32-32-1, batch 10", seed, x_seed.astype("float32"), y_seed.astype("float32")),
        (
            "MLP 784-512-512-10, batch 32",
            _mlp(),
            rng.normal(size=(32, 784)).astype("float32"),
            rng.normal(size=(32, 10)).astype("float32"),
        ),
        (
            "CNN 28x28 16-32, batch 32",
            _cnn(),
            rng.normal(size=(32, 28, 28, 1)).astype("float32"),
            rng.normal(size=(32, 10)).astype("float32"),
        ),
    ]
    rows, all_times = [], {}
    for name, model, x, y in cases:
        new_rows, times = weight_rows(name, model, x, y)
        rows += new_rows
        all_times[name] = times
    new_rows, times = jacobian_rows(seed)
    rows += new_rows
    all_times["seed net, 1,000 points"] = times
    new_rows, times = repeat_rows(seed)
    rows += new_rows
    all_times["seed net, 5 points"] = times

    print(f"Keras {keras.__version__} on {BACKEND}; median time per call (ms)")
    for name, times in all_times.items():
        print(f"  {name}: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in times.items()))
    print()
    print(f"{'model':34} {'ratio':46} {'measured':>9}  target")
    for model_name, what, ratio, target in rows:
        print(f"{model_name:34} {what:46} {ratio:9.2f}  {target}")


if __name__ == "__main__":
    main()
