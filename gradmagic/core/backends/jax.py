"""JAX: the framework calls gradmagic needs on ``KERAS_BACKEND=jax``, behind one small object.

The same method names as :mod:`gradmagic.core.backends.torch` (the einops
``_backends.py`` pattern), so the stateless questions are written once. Keras
on JAX is purely functional at its core: ``model.stateless_call`` takes the
variables' values as arguments and returns the new non-trainable values, which
the callers here drop, so no variable is ever written back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradmagic.core.backends.tensors import check_no_foreign

# --- The gradient questions (core/questions) ---------------------------------


class JaxBackend:
    """Compile, differentiate and convert with JAX."""

    name = "jax"

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` compiled with ``jax.jit`` (traced again only for a new input signature)."""
        return jax.jit(fn)

    def value_and_grad(
        self, fn: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        """``fn`` returning ``(value, gradients w.r.t. argnums)`` (``((value, aux), grads)`` with ``has_aux``)."""
        argnums = argnums if isinstance(argnums, int) else tuple(argnums)
        return jax.value_and_grad(fn, argnums=argnums, has_aux=has_aux)

    def batched_jacobian(self, fn: Callable[..., Any], argnums: int | Sequence[int] = 0) -> Callable[..., Any]:
        """Per-sample Jacobian: ``fn`` maps one sample to an output, the result maps a batch to Jacobians.

        Arguments in ``argnums`` are batched along axis 0; the others are shared
        by every sample (the model's variables).
        """
        argnums = argnums if isinstance(argnums, int) else tuple(argnums)

        def batched(*args: Any) -> Any:
            indices = (argnums,) if isinstance(argnums, int) else argnums
            in_axes = tuple(0 if i in indices else None for i in range(len(args)))
            return jax.vmap(jax.jacrev(fn, argnums=argnums), in_axes=in_axes)(*args)

        return batched

    def zeros_like(self, value: Any) -> Any:
        """Zeros of ``value``'s shape and dtype (the perturbation added to a layer's output)."""
        return jnp.zeros_like(value)

    def to_numpy(self, value: Any) -> np.ndarray | None:
        """A host NumPy copy of a JAX array (``None`` stays ``None``)."""
        return None if value is None else np.asarray(value)

    def values(self, variables: Sequence[Any]) -> list[Any]:
        """The current values of Keras variables, to pass as function arguments."""
        return [v.value for v in variables]

    def check_input(self, x: Any, argument: str = "x") -> None:
        """Refuse a tensor of another framework in ``x`` (PyTorch, TensorFlow) with a clear error.

        Raises:
            InputError: ``x`` holds a tensor of another framework.
        """
        check_no_foreign(x, self.name, argument)


BACKEND = JaxBackend()
