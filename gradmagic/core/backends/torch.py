"""PyTorch: the framework calls gradmagic needs on ``KERAS_BACKEND=torch``, behind one small object.

The same method names as :mod:`gradmagic.core.backends.jax` (the einops
``_backends.py`` pattern), so the stateless questions are written once. The
variables' values are passed to ``model.stateless_call`` detached from the
``Parameter`` objects, so autograd never reaches a parameter: no ``.grad`` is
ever left on one, and the returned non-trainable values (BatchNorm statistics)
are dropped by the callers, never assigned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.func

from gradmagic.core.backends.tensors import check_no_foreign

# --- The gradient questions (core/questions) ---------------------------------


def _indices(argnums: int | Sequence[int]) -> tuple[int, ...]:
    return (argnums,) if isinstance(argnums, int) else tuple(argnums)


def _leaves(structure: Any) -> list[Any]:
    import keras

    return keras.tree.flatten(structure)


def _pack(structure: Any, leaves: Sequence[Any]) -> Any:
    import keras

    return keras.tree.pack_sequence_as(structure, list(leaves))


def _differentiable(value: Any) -> Any:
    """A fresh autograd leaf with ``value``'s data (floating tensors only; others pass as they are)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_(True)
    return value


class TorchBackend:
    """Compile, differentiate and convert with PyTorch."""

    name = "torch"

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` as it runs fastest correctly: eager PyTorch.

        Measured with ``benchmarks/backends.py`` (PyTorch 2.13 CPU, 2 shared
        cores), a hand-written value-and-gradient step, eager autograd against
        ``torch.compile(dynamic=False)``, steady state: a 1-64-32-32-1 MLP at
        batch 10, 3.1 ms eager / 1.9 ms compiled; the 784-512-512-10 MLP at
        batch 32, 18 ms / 33 ms; a small CNN (two convolutions) at batch 32,
        192 ms / 189 ms. Compiling cost 7 to 15 s per model and input
        signature, and with dynamo's default automatic dynamic shapes Inductor
        failed outright on the second model. A notebook tool asked a question
        once per slider move cannot wait seconds per new batch size for a gain
        only on tiny models, so the function runs eagerly, as it is.
        """
        return fn

    def value_and_grad(
        self, fn: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        """``fn`` returning ``(value, gradients w.r.t. argnums)`` (``((value, aux), grads)`` with ``has_aux``).

        ``torch.autograd.grad`` on fresh leaves: it returns the gradients
        instead of accumulating them into ``.grad``, and a disconnected leaf
        gives ``None``. For one argnum the gradient has that argument's
        structure; for several, a tuple of them.
        """
        indices = _indices(argnums)

        def wrapped(*args: Any) -> Any:
            args = list(args)
            with torch.enable_grad():
                structures = []
                for i in indices:
                    args[i] = _pack(args[i], [_differentiable(t) for t in _leaves(args[i])])
                    structures.append(args[i])
                out = fn(*args)
                value, aux = out if has_aux else (out, None)
                wrt = [leaf for s in structures for leaf in _leaves(s)]
                asked = [leaf for leaf in wrt if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
                found = iter(torch.autograd.grad(value, asked, allow_unused=True)) if asked else iter(())
            grads_flat = [next(found) if (isinstance(w, torch.Tensor) and w.requires_grad) else None for w in wrt]
            grads, start = [], 0
            for s in structures:
                n = len(_leaves(s))
                grads.append(_pack(s, grads_flat[start : start + n]))
                start += n
            grads = grads[0] if isinstance(argnums, int) else tuple(grads)
            value = value.detach()
            return ((value, aux), grads) if has_aux else (value, grads)

        return wrapped

    def batched_jacobian(
        self, fn: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        """Per-sample Jacobian: ``fn`` maps one sample to an output, the result maps a batch to Jacobians.

        ``torch.func.vmap(torch.func.jacrev(fn))``; arguments in ``argnums`` are
        batched along axis 0, the others shared by every sample. Random layers
        (Dropout with ``training=True``) draw a different mask per sample, as in
        one batched call. With ``has_aux``, ``fn`` returns ``(output, aux)`` and
        the result is ``(Jacobians, batched aux)``.
        """
        argnums = argnums if isinstance(argnums, int) else tuple(argnums)

        def batched(*args: Any) -> Any:
            indices = _indices(argnums)
            in_dims = tuple(0 if i in indices else None for i in range(len(args)))
            jac = torch.func.jacrev(fn, argnums=argnums, has_aux=has_aux)
            return torch.func.vmap(jac, in_dims=in_dims, randomness="different")(*args)

        return batched

    def random_state_kept(self) -> contextlib.AbstractContextManager:
        """Within the block, random ops draw from a copy of PyTorch's global generator, restored afterwards.

        Keras on PyTorch drops units (Dropout without a seed) with the global
        generator: a gradient question in training mode would advance the
        user's random stream and draw another mask on every call. With the
        state restored, it does neither.
        """
        return torch.random.fork_rng()

    def shapes(self, fn: Callable[..., Any], *args: Any) -> Any:
        """The ``(shape, dtype)`` of each leaf ``fn(*args)`` returns, from one run without autograd."""
        with torch.no_grad():
            result = fn(*args)
        return _pack(result, [None if t is None else (tuple(t.shape), t.dtype) for t in _leaves(result)])

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """Zeros of ``shape`` and ``dtype`` on Keras' device (the perturbation added to a layer's output)."""
        import keras

        return keras.ops.zeros(shape, dtype)

    def tensors(self, structure: Any) -> Any:
        """NumPy arrays as tensors on Keras' device (``None`` stays ``None``)."""
        import keras

        return keras.tree.map_structure(lambda a: None if a is None else keras.ops.convert_to_tensor(a), structure)

    def to_numpy(self, value: Any) -> np.ndarray | None:
        """A host NumPy copy of a tensor (``None`` stays ``None``)."""
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        return np.asarray(value)

    def values(self, variables: Sequence[Any]) -> list[Any]:
        """The current values of Keras variables, detached from their ``Parameter`` (no ``.grad`` can reach it)."""
        return [v.value.detach() for v in variables]

    # Reading errors raised while running the model (core/questions/trace_errors).

    framework = "PyTorch"
    #: Where Python cannot read a tensor's value, for messages.
    transforms = "torch.func's vmap (the per-sample Jacobian)"

    def error_message(self, exc: BaseException) -> str:
        """The error's own message, without Keras' bold highlight of an error raised in a layer."""
        text = str(exc)
        if "\x1b[1m" in text:
            text = text.split("\x1b[1m", 1)[1].split("\x1b[0m", 1)[0]
        return text.strip()

    def is_python_control_flow_error(self, exc: BaseException) -> bool:
        """True when Python control flow met a batched tensor inside ``torch.func.vmap`` (``if t:``).

        Eager PyTorch runs Python control flow; only the vectorised Jacobian
        cannot, and ``torch.func`` says so in its wording.
        """
        return "data-dependent control flow" in str(exc)

    def is_numpy_on_symbolic_error(self, exc: BaseException) -> bool:
        """True when NumPy was called on a tensor that requires grad, or inside ``torch.func`` transforms."""
        text = str(exc)
        return "Can't call numpy() on Tensor that requires grad" in text or (
            "numpy" in text and ("vmap" in text or "functorch" in text)
        )

    def check_input(self, x: Any, argument: str = "x") -> None:
        """Refuse a tensor of another framework in ``x`` (JAX, TensorFlow) with a clear error.

        Raises:
            InputError: ``x`` holds a tensor of another framework.
        """
        check_no_foreign(x, self.name, argument)


BACKEND = TorchBackend()
