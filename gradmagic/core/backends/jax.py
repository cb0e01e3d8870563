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


# --- The training monitor (core/monitor) ------------------------------------
# The training monitor's door to JAX: the applied gradients, captured in Keras's jitted train step.
#
# Keras's JAX trainer runs ``model.train_step(state, data)`` under ``jax.jit``,
# with every variable passed in and returned as state, and calls
# ``optimizer.stateless_apply(optimizer_variables, grads, trainable_variables)``
# inside it. The monitor's recording train function is the same step with one more
# output: while the step is traced, ``stateless_apply`` is wrapped (an instance
# attribute, removed right after) so the gradients it receives are kept as traced
# values, and the step returns their raw statistics (``[5, weights]``, see
# :mod:`gradmagic.core.monitor.columns`) next to Keras's ``(logs, state)``. The
# statistics leave the jitted function as an output, like the state does, and
# stay on the device until the host reads them; Keras's state, optimizer and
# variables are never extended. The gradients ``stateless_apply`` receives are
# those of the global batch: under ``keras.distribution.DataParallel`` they are
# already all-reduced, so the statistics are those of the single-device run.
#
# Keras internals used (each a missing public API, see the functions): the
# trainer's state sharding (``_get_state_sharding_spec``), needed to compile the
# recording step with the shardings Keras gives its own.

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def exact_stats(grads: Sequence[Any]) -> Any:
    """Raw statistics ``[5, len(grads)]`` (``RAW_ROWS``) of the finite entries, with NaN/Inf counts.

    The norm is taken of the gradient divided by its largest |entry| and scaled
    back: exact to float32 rounding even where squares would underflow (|g| <
    1e-19) or overflow float32. Several passes per gradient: the path of the
    rare steps :func:`full_stats` cannot trust.
    """
    columns = []
    for grad in grads:
        flat = jnp.reshape(grad, (-1,)).astype(jnp.float32)
        if flat.size == 0:
            columns.append(jnp.zeros(5, jnp.float32))
            continue
        finite = jnp.isfinite(flat)
        nan = jnp.sum(jnp.isnan(flat), dtype=jnp.float32)
        inf = jnp.float32(flat.size) - jnp.sum(finite, dtype=jnp.float32) - nan
        values = jnp.where(finite, flat, 0.0)
        peak = jnp.max(jnp.abs(values))
        unit = jnp.where(peak > 0, peak, 1.0)
        norm = unit * jnp.sqrt(jnp.sum(jnp.square(values / unit)))
        columns.append(jnp.stack([jnp.sum(values), norm, peak, nan, inf]))
    return jnp.stack(columns, axis=1)


def full_stats(grads: Sequence[Any], floors: np.ndarray) -> Any:
    """Raw statistics ``[5, len(grads)]``: sum, norm and max |g| in reductions XLA can fuse into one pass.

    Valid when every result is finite and no sum of squares is below its floor
    (where float32 squares may have underflowed, see ``square_floors``) unless the
    gradient is exactly zero; otherwise :func:`exact_stats` is taken instead (a
    ``lax.cond``: the step pays for it only when it happens).
    """
    flat = [jnp.reshape(g, (-1,)).astype(jnp.float32) for g in grads]
    zero = jnp.float32(0.0)
    total = jnp.stack([jnp.sum(f) if f.size else zero for f in flat])
    squares = jnp.stack([jnp.sum(f * f) if f.size else zero for f in flat])
    peak = jnp.stack([jnp.maximum(jnp.max(f), -jnp.min(f)) if f.size else zero for f in flat])
    n = len(flat)
    quick = jnp.stack([total, jnp.sqrt(squares), peak, jnp.zeros(n), jnp.zeros(n)])
    trusted = jnp.all(jnp.isfinite(quick)) & jnp.all((squares >= floors) | (peak == 0))
    return jax.lax.cond(trusted, lambda _: quick, exact_stats, flat)


def norm_stats(grads: Sequence[Any], full: Any, floors: np.ndarray) -> Any:
    """The norm of each gradient (one reduction each), and :func:`full_stats` when ``full`` or when one is suspect.

    A sum of squares that is not finite (a NaN or Inf, or an overflow) or below its
    floor (squares may have underflowed; see ``square_floors``) takes the full
    branch, which is exact there. Where only the norm is measured, the sum and the
    counts are 0 and max |g| is -1, the mark ``finish_stats`` reads.
    """
    sums = jnp.stack([jnp.sum(jnp.square(jnp.asarray(g, jnp.float32))) for g in grads])
    n = len(grads)
    trusted = jnp.all((sums >= floors) & (sums <= _FLOAT32_MAX))
    quick = jnp.stack([jnp.zeros(n), jnp.sqrt(sums), jnp.full(n, -1.0), jnp.zeros(n), jnp.zeros(n)]).astype(jnp.float32)
    return jax.lax.cond(
        jnp.logical_or(full, jnp.logical_not(trusted)),
        lambda g: full_stats(g, floors),
        lambda _: quick,
        list(grads),
    )


class _StatelessApplyHook:
    """Keeps the gradients the trainer hands to ``optimizer.stateless_apply`` (while the step runs or is traced)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.grads: list[Any] | None = None
        self.scale: Any = None
        self._had_own = "stateless_apply" in vars(optimizer)
        original = optimizer.stateless_apply

        def recording(optimizer_variables: Any, grads: Any, trainable_variables: Any) -> Any:
            self.grads = list(grads)
            # A LossScaleOptimizer gets scaled gradients: its scale's value in this step, to undo it.
            self.scale = None
            scale = loss_scale_variable(optimizer)
            if scale is not None:
                index = next(i for i, v in enumerate(optimizer.variables) if v is scale)
                self.scale = optimizer_variables[index]
            return original(optimizer_variables, grads, trainable_variables)

        self._original, self._recording = original, recording

    def install(self) -> None:
        # A plain instance attribute: Keras's tracking __setattr__ has nothing to track in a function.
        object.__setattr__(self.optimizer, "stateless_apply", self._recording)

    def remove(self) -> None:
        optimizer = self.optimizer
        if optimizer.__dict__.get("stateless_apply") is not self._recording:
            return
        if self._had_own:
            object.__setattr__(optimizer, "stateless_apply", self._original)
        else:
            object.__delattr__(optimizer, "stateless_apply")


def loss_scale_variable(optimizer: Any) -> Any:
    """The loss-scale variable of a ``LossScaleOptimizer`` (built), else None."""
    import keras

    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and optimizer.built:
        return optimizer.dynamic_scale
    return None


class _NoHook:
    """The JAX step installs its own hook inside the (traced) step: nothing to do around each call."""

    def install(self) -> None:
        pass

    def remove(self) -> None:
        pass


def state_shardings(model: Any) -> Any:
    """The shardings Keras compiles its own train step with, or None without a distribution.

    Public API missing: Keras gives its jitted train step ``out_shardings`` from
    the trainer's private ``_get_state_sharding_spec()``; the recording step must
    return the state laid out the same way. Falls back to None (XLA picks the
    layout) where that method is gone.
    """
    import keras  # here: the questions' part of this door needs no Keras

    if keras.distribution.distribution() is None:
        return None
    spec = getattr(model, "_get_state_sharding_spec", None)
    return spec() if spec is not None else None


def recording_train_function(model: Any, plain: Any, buffer: Any) -> tuple[Callable[..., Any], Any]:
    """A train function that runs Keras's step and appends each step's raw statistics to ``buffer``.

    Same arguments and results as the one Keras makes (``(state, iterator) ->
    (logs, state)``, with ``steps_per_execution`` steps per call), compiled the
    same way (``jax.jit`` with the state donated, unless ``run_eagerly`` or
    ``jit_compile=False``).

    Args:
        model: The model being fit (compiled, with its train function made).
        plain: Keras's own train function (not used: the recording one is made anew).
        buffer: Has ``floors``, ``mode``, ``full_next()`` (measure every statistic at
            the next step?) and ``append(raw, missing)`` (keep one step's raw statistics;
            JAX differentiates every trainable variable, so none is missing).

    Returns:
        ``(function, hook)``: the train function, and the hook the guard puts in
        place around each call (none needed here: the step installs its own).
    """
    step = model.train_step
    hook = _StatelessApplyHook(model.optimizer)
    floors = np.asarray(buffer.floors, np.float32)
    mode = buffer.mode

    def recording_step(state: Any, data: Any, full: Any) -> Any:
        hook.install()
        try:
            logs, state = step(state, data)
        finally:
            hook.remove()
        grads, hook.grads = hook.grads, None
        stats = full_stats(grads, floors) if mode == "full" else norm_stats(grads, full, floors)
        if hook.scale is not None:
            # Sum, norm and max |g| scale with the loss scale, the counts do not (max |g|'s
            # -1 mark stays negative).
            inverse = 1.0 / hook.scale.astype(jnp.float32)
            stats = stats * jnp.stack([inverse, inverse, inverse, 1.0, 1.0])[:, None]
        return logs, state, stats

    if not model.run_eagerly and model.jit_compile:
        shardings = state_shardings(model)
        out_shardings = None if shardings is None else (None, shardings, None)
        recording_step = jax.jit(recording_step, donate_argnums=0, out_shardings=out_shardings)

    # The flag as device arrays made once: a host bool would be copied to the device every step.
    flags = {False: jnp.asarray(False), True: jnp.asarray(True)}

    def train_function(state: Any, iterator: Any) -> Any:
        # Keras's own loop over steps_per_execution, one recorded row per step.
        logs, state, stats = recording_step(state, next(iterator), flags[bool(buffer.full_next())])
        buffer.append(stats, None)
        try:
            for _ in range(int(model.steps_per_execution) - 1):
                logs, state, stats = recording_step(state, next(iterator), flags[bool(buffer.full_next())])
                buffer.append(stats, None)
        except StopIteration:
            pass
        return logs, state

    return train_function, _NoHook()


def current_weights(model: Any) -> list[np.ndarray]:
    """``model.get_weights()`` in the middle of ``fit``.

    During ``fit`` the JAX trainer holds the weights as state and detaches them
    from the variables; ``jax_state_sync()`` (public) puts the latest state back
    first, as Keras documents for callbacks that need the variables.
    """
    model.jax_state_sync()
    return model.get_weights()


def host_array(value: Any) -> np.ndarray:
    """A device array as a NumPy array (waits for the step that makes it)."""
    return np.asarray(value)
