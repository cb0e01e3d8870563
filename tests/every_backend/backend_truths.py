"""Truths the every-backend tests compare with: NumPy forward passes, finite differences and hand-written autodiff.

No framework is imported at module level: the hand-written autodiff imports
the framework of the Keras backend in use inside the function.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

_ROOT = Path(__file__).resolve().parents[2]


def torch_trace_from_call() -> int:
    """On PyTorch, the call of a question's input signature that traces it (see ``TRACE_FROM_CALL``)."""
    from gradmagic.core.backends import torch as torch_backend

    return torch_backend.TRACE_FROM_CALL


def run_on_backend(backend: str, script: str, arguments: list[str], out: Path) -> dict[str, np.ndarray]:
    """Run ``script`` in a new process on ``backend`` (fixed at Keras's import) and load the ``.npz`` it writes.

    The script gets ``arguments`` in ``sys.argv[1:]`` and must save its arrays to ``out`` (the last argument),
    with a ``backend`` entry naming the backend it ran on, which is checked and left out of the result.
    """
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, *arguments, str(out)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, f"KERAS_BACKEND={backend} failed:\n{done.stderr[-5000:]}"
    with np.load(out) as found:
        assert str(found["backend"]) == backend
        return {key: found[key] for key in found.files if key != "backend"}


def run_without_tensorflow(backend: str, script: str) -> str:
    """Run ``script`` on ``backend`` in a new process and return its output, whose last line must be
    the sorted TensorFlow modules it loaded: ``[]`` (the script blocks TensorFlow's import itself)."""
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(_ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"  # no TensorFlow module was loaded
    return done.stdout


def fingerprint(model: keras.Model) -> str:
    """A hash of every variable of the model and of its optimizer, bit for bit."""
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        variables += list(optimizer.variables)
    digest = hashlib.sha256()
    for v in variables:
        digest.update(v.path.encode())
        digest.update(v.numpy().tobytes())
    return digest.hexdigest()


def clear_grads(model: keras.Model) -> None:
    """On PyTorch, drop the ``.grad`` that ``fit`` (``loss.backward()``) leaves on every parameter."""
    if keras.backend.backend() == "torch":
        for v in model.variables:
            v.value.grad = None


def no_grad_left(model: keras.Model) -> bool:
    """On PyTorch, no parameter holds a ``.grad`` (elsewhere: True)."""
    if keras.backend.backend() != "torch":
        return True
    return all(getattr(v.value, "grad", None) is None for v in model.variables)


def central_differences(f: Callable[[np.ndarray], float], at: np.ndarray, step: float = 1e-5) -> np.ndarray:
    """df/d(at) by central differences in float64, entry by entry."""
    at = np.asarray(at, dtype=np.float64)
    grad = np.zeros_like(at)
    for index in np.ndindex(at.shape):
        up, down = at.copy(), at.copy()
        up[index] += step
        down[index] -= step
        grad[index] = (f(up) - f(down)) / (2 * step)
    return grad


def weights64(model: keras.Model) -> list[np.ndarray]:
    """The model's trainable weights as float64 NumPy arrays, in ``trainable_weights`` order."""
    return [w.numpy().astype(np.float64) for w in model.trainable_weights]


def hand_mse_gradients(model: keras.Model, x: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None) -> list:
    """d mean_i(w_i * mean_j (f(x)_ij - y_ij)^2) / dW, by the framework's own autodiff written out here.

    TensorFlow: ``tf.GradientTape``; JAX: ``jax.grad`` over ``model.stateless_call``;
    PyTorch: ``torch.autograd.grad`` (which returns gradients, leaving no ``.grad``).
    """
    backend = keras.backend.backend()
    w = np.ones(len(x), "float32") if weight is None else np.asarray(weight, "float32")
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            pred = model(x, training=False)
            loss = tf.reduce_mean(w * tf.reduce_mean(tf.square(pred - y), axis=-1))
        return [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_of(trainable: list) -> jax.Array:
            pred, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            return jnp.mean(w * jnp.mean(jnp.square(pred - y), axis=-1))

        return [np.asarray(g) for g in jax.grad(loss_of)([v.value for v in model.trainable_variables])]
    import torch

    params = [v.value for v in model.trainable_variables]
    pred = model(torch.as_tensor(x), training=False)
    loss = torch.mean(torch.as_tensor(w) * torch.mean(torch.square(pred - torch.as_tensor(y)), dim=-1))
    return [g.detach().cpu().numpy() for g in torch.autograd.grad(loss, params)]


def hand_unit_gradient(fn: Callable, at: np.ndarray, unit: int) -> np.ndarray:
    """d sum_i fn(v)[i, unit] / dv at ``at`` (per row, as rows are independent), by the framework's own autodiff.

    TensorFlow: ``tf.GradientTape``; JAX: ``jax.grad``; PyTorch: ``torch.autograd.grad``.
    """
    backend = keras.backend.backend()
    at = np.asarray(at)
    if backend == "tensorflow":
        import tensorflow as tf

        v = tf.constant(at)
        with tf.GradientTape() as tape:
            tape.watch(v)
            out = tf.reduce_sum(fn(v)[:, unit])
        return tape.gradient(out, v).numpy()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        return np.asarray(jax.grad(lambda v: jnp.sum(fn(v)[:, unit]))(jnp.asarray(at)))
    import torch

    v = torch.tensor(at, requires_grad=True)
    (grad,) = torch.autograd.grad(torch.sum(fn(v)[:, unit]), [v])
    return grad.numpy()
