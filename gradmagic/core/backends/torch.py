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


# --- The training monitor (core/monitor) ------------------------------------
# The training monitor's door to PyTorch: the applied gradients, captured at ``optimizer.apply``.
#
# Keras's PyTorch trainer runs the step eagerly and calls
# ``optimizer.apply(gradients, trainable_weights)`` under ``torch.no_grad()``.
# The monitor wraps that method (an instance attribute, in place only while the
# recording train function runs): the wrapper measures the raw statistics
# (``[5, weights]``, see :mod:`gradmagic.core.monitor.columns`) of the gradients,
# keeps them as a tensor until the host reads them, and hands the very same
# gradient tensors on. Measuring only reads the gradients, so training is unchanged.

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def exact_stats(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Raw statistics ``[5, len(grads)]`` (``RAW_ROWS``) of the finite entries, with NaN/Inf counts.

    The norm is taken of the gradient divided by its largest |entry| and scaled
    back, exact to float32 rounding where squares would underflow or overflow.
    Several passes per gradient: the path of the rare steps :func:`full_stats`
    cannot trust.
    """
    columns = []
    for grad in grads:
        flat = grad.detach().reshape(-1).to(torch.float32)
        if flat.numel() == 0:
            columns.append(torch.zeros(5))
            continue
        finite = torch.isfinite(flat)
        nan = torch.isnan(flat).sum().to(torch.float32)
        inf = flat.numel() - finite.sum().to(torch.float32) - nan
        values = torch.where(finite, flat, torch.zeros((), dtype=flat.dtype))
        peak = values.abs().max()
        unit = torch.where(peak > 0, peak, torch.ones(()))
        norm = unit * torch.sqrt(torch.sum(torch.square(values / unit)))
        columns.append(torch.stack([values.sum(), norm, peak, nan, inf]))
    return torch.stack(columns, dim=1).cpu()


def full_stats(grads: Sequence[torch.Tensor], floors: np.ndarray) -> torch.Tensor:
    """Raw statistics ``[5, len(grads)]``: sum, norm and max |g| in few kernels, exact where suspect.

    One fused norm per gradient (``torch._foreach_norm``), one sum and one
    ``aminmax``. Valid when every result is finite and no sum of squares is below
    its floor (float32 squares may have underflowed) unless the gradient is zero;
    otherwise :func:`exact_stats` is taken instead.
    """
    flat = [g.detach().reshape(-1).to(torch.float32) for g in grads]
    if any(f.numel() == 0 for f in flat):
        return exact_stats(grads)
    norms = torch.stack(torch._foreach_norm(flat))
    total = torch.stack([f.sum() for f in flat])
    extremes = [torch.aminmax(f) for f in flat]
    peak = torch.stack([torch.maximum(e.max, -e.min) for e in extremes])
    n = len(flat)
    quick = torch.stack([total, norms, peak, torch.zeros(n), torch.zeros(n)]).cpu()
    squares = quick[1].double() ** 2
    trusted = bool(torch.isfinite(quick).all()) and bool(
        torch.all((squares >= torch.from_numpy(floors)) | (quick[2] == 0))
    )
    return quick if trusted else exact_stats(grads)


def norm_stats(grads: Sequence[torch.Tensor], full: bool, floors: np.ndarray) -> torch.Tensor:
    """The norm of each gradient (one fused norm per gradient), and :func:`full_stats` when ``full`` or suspect.

    A non-finite sum of squares, or one below its floor (squares may have
    underflowed), takes the full branch. Where only the norm is measured, the sum
    and the counts are 0 and max |g| is -1, the mark ``finish_stats`` reads. The
    check is one read of ``len(grads)`` floats (a synchronisation on an accelerator).
    """
    if full:
        return full_stats(grads, floors)
    flat = [g.detach().to(torch.float32) for g in grads]
    # torch._foreach_norm is the one-kernel-per-dtype norm torch.nn.utils.clip_grad_norm_ uses.
    norms = torch.stack(torch._foreach_norm(flat)) if flat else torch.zeros(0)
    sums = norms.double() ** 2
    trusted = bool(torch.all((sums >= torch.from_numpy(floors)) & (sums <= _FLOAT32_MAX)))
    if not trusted:
        return full_stats(grads, floors)
    n = len(grads)
    return torch.stack([torch.zeros(n), norms, torch.full((n,), -1.0), torch.zeros(n), torch.zeros(n)]).cpu()


class ApplyHook:
    """A recording ``optimizer.apply``, put in place and removed around each train-function call.

    Args:
        optimizer: The model's optimizer.
        buffer: Has ``columns`` (``variable.path`` -> column), ``floors``, ``mode``,
            ``full_next()`` and ``append(raw, missing)``.
    """

    def __init__(self, optimizer: Any, buffer: Any) -> None:
        self.optimizer = optimizer
        self._had_own = "apply" in vars(optimizer)
        original = optimizer.apply

        def recording_apply(grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> Any:
            grads = list(grads)
            # Keras's trainer passes the variables; without them, the gradients follow
            # model.trainable_variables, which is the buffer's column order.
            paths = [v.path for v in trainable_variables] if trainable_variables is not None else list(buffer.columns)
            n = len(buffer.columns)
            columns, present = [], []
            for grad, path in zip(grads, paths, strict=False):
                column = buffer.columns.get(path)
                if column is not None and grad is not None:
                    columns.append(column)
                    present.append(grad)
            missing = np.ones(n, bool)
            missing[columns] = False
            full = buffer.full_next()
            scale = _loss_scale(optimizer)
            with torch.no_grad():
                if not present:
                    raw = torch.zeros(5, n)
                else:
                    floors = np.asarray(buffer.floors, np.float64)[columns]
                    measured = (
                        full_stats(present, floors) if buffer.mode == "full" else norm_stats(present, full, floors)
                    )
                    raw = torch.zeros(5, n)
                    raw[:, columns] = measured.cpu()
                    if scale is not None:
                        # Sum, norm and max |g| scale with the loss scale, the counts do not.
                        raw[:3] /= scale
            buffer.append(raw, missing)
            return original(grads, trainable_variables)

        self._original, self._recording = original, recording_apply

    def install(self) -> None:
        # A plain instance attribute: Keras's tracking __setattr__ has nothing to track in a function.
        object.__setattr__(self.optimizer, "apply", self._recording)

    def remove(self) -> None:
        optimizer = self.optimizer
        if optimizer.__dict__.get("apply") is not self._recording:
            return
        if self._had_own:
            object.__setattr__(optimizer, "apply", self._original)
        else:
            object.__delattr__(optimizer, "apply")


def _loss_scale(optimizer: Any) -> float | None:
    """The factor a ``LossScaleOptimizer``'s gradients are scaled by (read before it updates), else None."""
    import keras

    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return None
    # What scale_loss used for this step's loss.
    scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
    return float(keras.ops.convert_to_numpy(scale))


def recording_train_function(model: Any, plain: Any, buffer: Any) -> tuple[Callable[..., Any], Any]:
    """The model's own train function ``plain``, and the hook that makes it record into ``buffer``.

    Returns:
        ``(function, hook)``: Keras's train function (unchanged), and the
        :class:`ApplyHook` the guard installs around each of its calls.
    """
    return plain, ApplyHook(model.optimizer, buffer)


def current_weights(model: Any) -> list[np.ndarray]:
    """``model.get_weights()`` in the middle of ``fit`` (PyTorch updates the variables in place)."""
    return model.get_weights()


def host_array(value: Any) -> np.ndarray:
    """A tensor as a NumPy array."""
    return value.detach().cpu().numpy()
