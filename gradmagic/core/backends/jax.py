"""JAX: the framework calls gradmagic needs on ``KERAS_BACKEND=jax``, behind one small object.

The same method names as :mod:`gradmagic.core.backends.torch` (the einops
``_backends.py`` pattern), so the stateless questions are written once. Keras
on JAX is purely functional at its core: ``model.stateless_call`` takes the
variables' values as arguments and returns the new non-trainable values, which
the callers here drop, so no variable is ever written back.
"""

from __future__ import annotations

import contextlib
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

    def batched_jacobian(
        self, fn: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        """Per-sample Jacobian: ``fn`` maps one sample to an output, the result maps a batch to Jacobians.

        ``jax.vmap(jax.jacrev(fn))``: arguments in ``argnums`` are batched
        along axis 0; the others are shared by every sample (the model's
        variables). With ``has_aux``, ``fn`` returns ``(output, aux)`` and the
        result is ``(Jacobians, batched aux)``.
        """
        argnums = argnums if isinstance(argnums, int) else tuple(argnums)

        def batched(*args: Any) -> Any:
            indices = (argnums,) if isinstance(argnums, int) else argnums
            in_axes = tuple(0 if i in indices else None for i in range(len(args)))
            return jax.vmap(jax.jacrev(fn, argnums=argnums, has_aux=has_aux), in_axes=in_axes)(*args)

        return batched

    def random_state_kept(self) -> contextlib.AbstractContextManager:
        """Nothing to keep: Keras on JAX draws random numbers from seed variables, passed in by value."""
        return contextlib.nullcontext()

    def shapes(self, fn: Callable[..., Any], *args: Any) -> Any:
        """The ``(shape, dtype)`` of each leaf ``fn(*args)`` returns, found abstractly (``jax.eval_shape``)."""
        import keras

        abstract = jax.eval_shape(fn, *args)
        return keras.tree.map_structure(lambda s: (tuple(s.shape), s.dtype), abstract)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """Zeros of ``shape`` and ``dtype`` (the perturbation added to a layer's output)."""
        return jnp.zeros(shape, dtype)

    def tensors(self, structure: Any) -> Any:
        """Arrays as the compiled functions take them: ``jax.jit`` converts NumPy itself."""
        return structure

    def to_numpy(self, value: Any) -> np.ndarray | None:
        """A host NumPy copy of a JAX array (``None`` stays ``None``)."""
        return None if value is None else np.asarray(value)

    def values(self, variables: Sequence[Any]) -> list[Any]:
        """The current values of Keras variables, to pass as function arguments."""
        return [v.value for v in variables]

    # Reading errors raised while tracing (core/questions/trace_errors).

    framework = "JAX"
    #: Where Python cannot read a tensor's value, for messages.
    transforms = "JAX's transforms (jit, grad, vmap)"

    def error_message(self, exc: BaseException) -> str:
        """The error's own message: Keras' bold highlight of an error raised in a layer, else the first paragraph.

        JAX appends a long explanation and a link to its documentation after a
        blank line; the first paragraph says what happened.
        """
        text = str(exc)
        if "\x1b[1m" in text:
            text = text.split("\x1b[1m", 1)[1].split("\x1b[0m", 1)[0]
        return text.strip().split("\n\n", 1)[0]

    def is_python_control_flow_error(self, exc: BaseException) -> bool:
        """True when Python control flow met a traced array (``if t:``, ``bool(t)``, ``int(t)``)."""
        kinds = (jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)
        return isinstance(exc, kinds) or (isinstance(exc, jax.errors.ConcretizationTypeError) and "bool" in str(exc))

    def is_numpy_on_symbolic_error(self, exc: BaseException) -> bool:
        """True when NumPy was called on a traced array (``np.round(t)``)."""
        return isinstance(exc, jax.errors.TracerArrayConversionError)

    def check_input(self, x: Any, argument: str = "x") -> None:
        """Refuse a tensor of another framework in ``x`` (PyTorch, TensorFlow) with a clear error.

        Raises:
            InputError: ``x`` holds a tensor of another framework.
        """
        check_no_foreign(x, self.name, argument)


BACKEND = JaxBackend()
