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
import linecache
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.func
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gradmagic.core.backends.flow import FLOWS, NONE, OWNER_GLUE, ZERO, FlowGraph, Node
from gradmagic.core.backends.tensors import check_no_foreign

# --- The gradient questions (core/questions) ---------------------------------


def _indices(argnums: int | Sequence[int]) -> tuple[int, ...]:
    return (argnums,) if isinstance(argnums, int) else tuple(argnums)


# The arguments differentiated here are lists (the variables' values) or the user's x: lists, tuples and dicts
# of tensors. A plain walk of those costs microseconds; ``keras.tree`` on PyTorch (torch's pytree) costs about
# a millisecond per call, which eager PyTorch pays on every call.


def _leaves(structure: Any) -> list[Any]:
    """The leaves of nested lists, tuples and dicts (dicts by sorted key, as ``keras.tree`` orders them)."""
    if isinstance(structure, (list, tuple)):
        return [leaf for item in structure for leaf in _leaves(item)]
    if isinstance(structure, dict):
        return [leaf for key in sorted(structure) for leaf in _leaves(structure[key])]
    return [structure]


def _pack(structure: Any, leaves: Sequence[Any]) -> Any:
    """``leaves`` in the shape of ``structure`` (the inverse of :func:`_leaves`)."""
    found = iter(leaves)

    def rebuild(node: Any) -> Any:
        if isinstance(node, (list, tuple)):
            items = [rebuild(item) for item in node]
            return type(node)(*items) if hasattr(node, "_fields") else type(node)(items)
        if isinstance(node, dict):
            return type(node)((key, rebuild(node[key])) for key in sorted(node))
        return next(found)

    return rebuild(structure)


def _differentiable(value: Any) -> Any:
    """A fresh autograd leaf with ``value``'s data (floating tensors only; others pass as they are)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_(True)
    return value


class TorchBackend:
    """Compile, differentiate and convert with PyTorch."""

    name = "torch"

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` traced once per input signature into a graph of PyTorch operations, which later calls run.

        See :class:`TracedPerSignature`. Where ``fn`` cannot be traced (it reads
        a tensor's value in Python, e.g. a seeded random layer or an ``if`` on a
        tensor), that signature runs ``fn`` eagerly, as it is.
        """
        return TracedPerSignature(fn)

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
                # A value that does not require grad (every path from the leaves cut, e.g. by a detach) has no
                # gradient to take: every leaf is disconnected.
                connected = asked and value.requires_grad
                found = iter(torch.autograd.grad(value, asked, allow_unused=True) if connected else [None] * len(asked))
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

    def host_gradients(self, fn: Callable[..., Any]) -> Callable[..., tuple[float, list[np.ndarray | None]]]:
        """``fn`` (a scalar of its arguments) as ``(*args) -> (value, [dValue/d leaf of args[0]])`` in NumPy.

        A leaf of the first argument that the value does not depend on gets
        ``None`` (``torch.autograd.grad`` with ``allow_unused``), and so does
        one it reaches only through round, floor or ceil, as on TensorFlow (see
        :func:`attribution_value_and_grad`; autograd's zeros there would read
        as a genuinely zero gradient).
        """
        step = self.compile(attribution_value_and_grad(lambda first, *rest: (fn(first, *rest), None)))

        def run(*args: Any) -> tuple[float, list[np.ndarray | None]]:
            (value, _), grads = step(*args)
            return float(value), [None if g is None else g.detach().cpu().numpy() for g in _leaves(grads)]

        return run

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
        """NumPy arrays as tensors on Keras' device (``None`` stays ``None``), the structure kept."""
        import keras

        leaves = [None if a is None else keras.ops.convert_to_tensor(a) for a in _leaves(structure)]
        return _pack(structure, leaves)

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


# --- Compiled functions: one traced graph per input signature ---------------
# Eager Keras on PyTorch spends most of a small model's gradient in Python: the
# layers' ``__call__`` machinery, the compiled loss, the stateless scope
# (cProfile of the 1-64-32-32-1 MLP: 58% layer calls, 15% loss, 6% autograd).
# ``make_fx`` runs ``fn`` once on fake tensors (shapes and dtypes, no data) and
# records the ATen operations it reaches, forward and backward alike, as an FX
# graph; later calls of that signature run only those operations. It is what
# ``jax.jit`` is to JAX: Python control flow is fixed at tracing, and reading a
# tensor's value in Python (``.item()``, ``if t:``, ``int(seed)``), of an
# argument or of any other tensor (see :class:`_NoValueReads`), fails the trace
# instead of fixing a value, so that signature stays eager. Measured with
# ``benchmarks/backends.py``: see the README.
# ``torch.compile`` was measured too (``benchmarks/backends.py`` times it): 2-36 s to
# compile per model and signature, a recompile limit shared by every model, and
# with ``backend="eager"`` its guards cost more than the Python they save.

#: Traced graphs kept per function (one per input signature), oldest dropped first.
MAX_TRACED_SIGNATURES = 8
#: The call of an input signature that traces it: 2 (the first repeat; the default), 1 (the first call),
#: 0 (never: every call runs eagerly). Read when a function is compiled, so set it before asking.
TRACE_FROM_CALL = 2


class _Untraceable(Exception):
    """An argument a graph cannot take as an input (e.g. a NumPy array or an object): run eagerly."""


def _signature(node: Any) -> Any:
    """What a traced graph is specific to: the structure, each tensor's shape, dtype and device, other values.

    Raises:
        _Untraceable: A leaf that is neither a tensor nor a plain Python value.
    """
    if isinstance(node, torch.Tensor):
        # The strides too: a graph traced on a C-ordered x keeps views that a transposed or Fortran-ordered x
        # of the same shape cannot take.
        return (node.shape, node.stride(), node.dtype, node.device, node.requires_grad)
    if isinstance(node, (list, tuple)):
        return (type(node), tuple(_signature(item) for item in node))
    if isinstance(node, dict):
        return (type(node), tuple((key, _signature(node[key])) for key in sorted(node)))
    if node is None or type(node) in (bool, int, float, str):
        return (type(node), node)
    raise _Untraceable(type(node).__name__)


class TracedPerSignature:
    """``fn`` run eagerly on a signature's first call, then as a graph traced at its second call.

    A question asked once (one notebook cell) costs one eager run: tracing a
    large model costs many eager runs (MobileNetV2 at 96x96: 1.2 s against
    0.1 s). A question asked again (a loop, a slider) is traced when it is
    first repeated, and from then on runs about twice as fast as eager PyTorch
    on large models and several times as fast on small ones (see
    :data:`TRACE_FROM_CALL` to trace at the first call, or never). At most
    :data:`MAX_TRACED_SIGNATURES` signatures are kept, the oldest dropped first.

    Attributes:
        graphs: Signature -> the traced ``GraphModule``; ``None`` where ``fn``
            cannot be traced (or is never to be) and runs eagerly; otherwise the
            number of eager calls so far.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.trace_from_call = TRACE_FROM_CALL
        self.graphs: dict[Any, Any] = {}

    def __call__(self, *args: Any) -> Any:
        try:
            signature = _signature(args)
        except _Untraceable:
            return self.fn(*args)
        state = self.graphs.get(signature, 0)
        if type(state) is int:  # called eagerly that many times: count this call, or trace now
            if signature not in self.graphs and len(self.graphs) >= MAX_TRACED_SIGNATURES:
                del self.graphs[next(iter(self.graphs))]
            if self.trace_from_call <= 0:
                state = None
            elif state + 1 >= self.trace_from_call:
                state = self._traced(args)
            else:
                state += 1
            self.graphs[signature] = state
            if type(state) is int:
                return self.fn(*args)
        if state is None:
            return self.fn(*args)
        try:
            with torch.no_grad():  # the graph holds its backward pass: record none for it (x may require grad)
                return state(*args)
        except Exception:
            # E.g. an Embedding id out of range: the graph's error names an operation, not the layer. The graph
            # wrote nothing, so an eager run raises the error as the layer gives it (and the caller explains it).
            return self.fn(*args)

    def _traced(self, args: tuple) -> Any:
        """The graph of ``fn`` for these arguments' signature, or ``None`` if ``fn`` cannot be traced.

        A failing trace is not an error of its own: the eager run that
        follows raises the user's error, if there is one, as before.
        """
        fn = self.fn

        def refusing_value_reads(*args: Any) -> Any:
            with _NoValueReads():  # innermost: sees the reads of tensors that are not arguments too
                return fn(*args)

        try:
            with torch.random.fork_rng():  # tracing draws no numbers, but keep the user's stream exactly
                graph = make_fx(refusing_value_reads, tracing_mode="fake")(*args)
        except Exception:
            return None
        return _without_detach(graph)


class _ValueRead(Exception):
    """Python read a tensor's value while tracing: the graph would keep that value."""


class _NoValueReads(TorchDispatchMode):
    """Fail any Python read of a tensor's value (``.item()``, ``float(t)``, ``if t:``) while tracing.

    On the traced fake tensors such a read fails by itself; on a real tensor
    the function does not take as an argument (a layer's own ``torch.tensor``,
    a Keras variable the model does not track) it would succeed, and the
    graph would keep the value read at tracing for every later call. Every
    such read reaches the dispatcher as ``aten._local_scalar_dense``.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            raise _ValueRead("a tensor's value was read in Python")
        return func(*args, **(kwargs or {}))


def _without_detach(graph: Any) -> Any:
    """``graph`` without its ``detach`` calls (an eighth of a small model's operations).

    The traced graph holds its backward pass as plain operations and runs
    without autograd, so a ``detach`` there only returns its input.
    """
    detach = torch.ops.aten.detach.default
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target is detach:
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.recompile()
    return graph


BACKEND = TorchBackend()


# --- attribution (core/questions/attribution) --------------------------------
# The attribution functions differentiate one output unit with respect to x
# (or a layer's output) and say so when no gradient path joins them, where
# TensorFlow's tape gives None: through stop_gradient, integer or boolean
# values (a cast to int, argmax), and round, floor and ceil, which TensorFlow
# registers no gradient for. Autograd gives None for the first two itself; for
# the last three its backward passes back zeros, which look like a genuinely
# zero gradient (a dead ReLU, a zero weight): a walk of the autograd graph
# from the value, stopping at their backward nodes, tells the two apart.

#: Backward nodes no attribution passes through (``RoundBackward0``, ``RoundBackward1``...; ``sign``,
#: whose TensorFlow gradient is 0, flows).
_ATTRIBUTION_STOPS = ("RoundBackward", "FloorBackward", "CeilBackward")


def _reached_leaves(value: Any, leaves: Sequence[Any]) -> list[bool]:
    """Whether a backward walk from ``value.grad_fn`` reaches each leaf without passing :data:`_ATTRIBUTION_STOPS`."""
    wanted = {id(t): i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad}
    reached = [False] * len(leaves)
    todo, seen, left = [getattr(value, "grad_fn", None)], set(), len(wanted)
    while todo and left:
        fn = todo.pop()
        if fn is None or fn in seen or type(fn).__name__.startswith(_ATTRIBUTION_STOPS):
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            index = wanted.get(id(variable))
            if index is not None and not reached[index]:
                reached[index], left = True, left - 1
            continue
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return reached


def attribution_value_and_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(first, *rest) -> (value, aux)`` as ``((value, aux), d value / d first)``, ``None`` for unreached leaves.

    ``TorchBackend.value_and_grad`` (``torch.autograd.grad`` on fresh leaves),
    with ``None`` too for each leaf of ``first`` whose every path to the value
    runs through round, floor or ceil (see :data:`_ATTRIBUTION_STOPS`), as on TensorFlow.
    """
    found: list[list[bool]] = []

    def walked(first: Any, *rest: Any) -> tuple:
        value, aux = fn(first, *rest)
        found.append(_reached_leaves(value, _leaves(first)))  # ``first`` holds the fresh leaves here
        return value, aux

    step = BACKEND.value_and_grad(walked, argnums=0, has_aux=True)

    def run(first: Any, *rest: Any) -> tuple:
        found.clear()
        result, grads = step(first, *rest)
        reached = found.pop()
        return result, _pack(grads, [g if r else None for g, r in zip(_leaves(grads), reached)])

    return run


# --- diagnosis ---------------------------------------------------------------
# explain runs the target once eagerly while a TorchFunctionMode records every
# torch function it calls (what it read, what it wrote, whether autograd
# follows): each becomes a Node of a FlowGraph, owned by the layer whose call
# is running. A tensor that autograd reached by a way the mode does not see (a
# torch.autograd.Function such as keras.ops.custom_gradient) is linked through
# its grad_fn to the recorded tensors it was computed from.

_PIECEWISE_CONSTANT = {"round", "floor", "ceil", "sign", "trunc", "fix", "sgn"}
_DETACH = {"detach": "detach (keras.ops.stop_gradient) blocks the gradient on purpose"}
_CASTS = {"to", "type", "long", "int", "short", "bool", "byte", "char", "type_as"}
_LIBRARIES = tuple(f"{os.sep}{name}{os.sep}" for name in ("torch", "keras", "numpy"))
_OWN = f"{os.sep}gradmagic{os.sep}"
_OWNERS: list[tuple[int, int]] = []  # the layer calls running now, innermost last
_NO_GRAD = "run under torch.no_grad: autograd does not record it"
_FUNCTION = "custom gradient (torch.autograd.Function): its backward decides what flows"


@contextlib.contextmanager
def layer_scope(index: int, call: int) -> Iterator[None]:
    """Within the block, the recorded ops belong to call ``call`` of layer ``index``."""
    _OWNERS.append((index, call))
    try:
        yield
    finally:
        _OWNERS.pop()


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func)).strip("_")


def _user_source() -> str | None:
    """``file:line (function): code`` of the innermost user frame now running; None inside a built-in layer."""
    frames = traceback.extract_stack()[::-1]
    while frames and frames[0].filename == __file__:  # the recorder itself
        frames.pop(0)
    for frame in frames:
        if _OWN in frame.filename:
            return None
        if not any(part in frame.filename for part in _LIBRARIES):
            code = linecache.getline(frame.filename, frame.lineno).strip()
            code = f": {code}" if code else ""
            return f"{os.path.basename(frame.filename)}:{frame.lineno} ({frame.name}){code}"
    return None


def _classify(name: str, ins: list, outs: list) -> tuple[int, str]:
    """``(level, reason)`` of one recorded op: what autodiff passes back from its float inputs."""
    if name in _DETACH:
        return NONE, _DETACH[name]
    floats_out = [t for t in outs if t.is_floating_point()]
    if not floats_out:
        dtype = str(outs[0].dtype).removeprefix("torch.")
        what = f"cast to {dtype}" if name in _CASTS else f"{name}: {dtype} output"
        return NONE, f"{what}: integer and bool values carry no gradient"
    if not torch.is_grad_enabled():
        return NONE, _NO_GRAD
    if any(t.requires_grad for t in ins if t.is_floating_point()) and not any(t.requires_grad for t in floats_out):
        return NONE, f"{name} has no derivative: its output does not require grad"
    if name in _PIECEWISE_CONSTANT:
        return ZERO, f"{name} is piecewise constant: PyTorch defines its derivative as zero"
    return FLOWS, ""


class _Recorder(TorchFunctionMode):
    """Records each torch function called as a Node; optionally notes those that make NaN/Inf from finite inputs."""

    def __init__(self, probe: bool) -> None:
        super().__init__()
        self.nodes: list[Node] = []
        self.floats: set = set()
        self.keep: list = []  # every recorded tensor stays alive, so that its id stays unique
        self.made_by: dict[int, tuple[Node, Any]] = {}  # tensor id -> (node, its grad_fn when made)
        self.by_grad_fn: dict[Any, int] = {}
        self.probe, self.nonfinite = probe, []

    def tensor_id(self, tensor: torch.Tensor) -> int:
        self.keep.append(tensor)
        if tensor.is_floating_point():
            self.floats.add(id(tensor))
        if tensor.grad_fn is not None:
            self.by_grad_fn.setdefault(tensor.grad_fn, id(tensor))
        return id(tensor)

    def leaf(self, tensor: torch.Tensor) -> int:
        """Register an argument of the traced function (a weight, an input, a perturbation)."""
        return self.tensor_id(tensor)

    def _link(self, tensor: torch.Tensor) -> None:
        """A tensor autograd reached without a recorded op: a Node from the recorded tensors its grad_fn reads."""
        sources, seen, todo = [], set(), [tensor.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            variable = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
            if variable is not None:
                sources.append(id(variable))
            elif fn in self.by_grad_fn and fn is not tensor.grad_fn:
                sources.append(self.by_grad_fn[fn])
            else:
                todo.extend(next_fn for next_fn, _ in fn.next_functions)
        kind = type(tensor.grad_fn).__name__
        made = self.made_by.get(id(tensor))
        # The Function ran inside the call that recorded its forward ops (untracked, under no_grad): its
        # layer, and those ops are its forward, not a stop.
        owner = (made[0].owner, made[0].call) if made else _OWNERS[-1] if _OWNERS else (OWNER_GLUE, -1)
        if made:
            self._inside_function(made[0])
        source = _user_source() if self.probe else None
        node = Node(kind, sources, [self.tensor_id(tensor)], FLOWS, _FUNCTION, owner[0], owner[1], source)
        self.nodes.append(node)
        self.made_by[id(tensor)] = (node, tensor.grad_fn)

    def _inside_function(self, last: Node) -> None:
        """Mark ``last`` and the untracked ops feeding it as a torch.autograd.Function's forward."""
        todo = [last]
        while todo:
            node = todo.pop()
            if node.reason != _NO_GRAD:
                continue
            node.level, node.reason = FLOWS, _FUNCTION
            todo.extend(self.made_by[v][0] for v in node.inputs if v in self.made_by)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [t for t in _leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        ins_ids = {id(t) for t in ins}
        # An op may return one of its inputs itself (``to`` the dtype it has): that makes no new value.
        outs = [t for t in _leaves(out) if isinstance(t, torch.Tensor) and id(t) not in ins_ids]
        if not outs:
            return out  # shape, dtype, size, a no-op conversion...: no values made
        for t in ins:
            made = self.made_by.get(id(t))
            if t.grad_fn is not None and (made is None or made[1] is not t.grad_fn):
                self._link(t)
        name = _name(func)
        level, reason = _classify(name, ins, outs)
        owner = _OWNERS[-1] if _OWNERS else (OWNER_GLUE, -1)
        in_ids, out_ids = [self.tensor_id(t) for t in ins], [self.tensor_id(t) for t in outs]
        source = _user_source() if self.probe else None  # reading the stack per op is slow: only for NaN/Inf
        node = Node(name, in_ids, out_ids, level, reason, owner[0], owner[1], source)
        self.nodes.append(node)
        for t in outs:
            self.made_by[id(t)] = (node, t.grad_fn)
        if self.probe:
            self._check(node, ins, outs)
        return out

    def _check(self, node: Node, ins: list, outs: list) -> None:
        def finite(tensors: list) -> bool:
            return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())

        with torch.no_grad():
            if not finite(outs) and finite(ins):
                self.nonfinite.append((node.kind, node.owner, False, node.source))
            if not finite(ins):
                return  # its backward reads NaN/Inf of the forward pass: it can pass it on, not make it
            for t in outs:
                if t.grad_fn is not None and t.requires_grad:
                    t.grad_fn.register_hook(self._backward_hook(node))

    def _backward_hook(self, node: Node) -> Callable:
        """Note the node when its backward makes NaN/Inf from a finite gradient (its forward inputs were finite)."""

        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            def finite(tensors: tuple) -> bool:
                return all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor))

            entry = (node.kind, node.owner, True, node.source)
            if not finite(grad_inputs) and finite(grad_outputs) and entry not in self.nonfinite:
                self.nonfinite.append(entry)

        return hook


def _prepared(args: Sequence[Any], recorder: _Recorder) -> list:
    """The arguments with every float tensor a fresh autograd leaf, registered with the recorder."""
    prepared = []
    for arg in args:
        leaves = [_differentiable(torch.as_tensor(t)) if _is_array(t) else t for t in _leaves(arg)]
        for t in leaves:
            if isinstance(t, torch.Tensor):
                recorder.leaf(t)
        prepared.append(_pack(arg, leaves))
    return prepared


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _record(fn: Callable[..., Any], args: Sequence[Any], probe: bool) -> tuple[_Recorder, list, Any]:
    recorder = _Recorder(probe)
    prepared = _prepared(args, recorder)
    with torch.enable_grad(), recorder:
        target = fn(*prepared)
    return recorder, prepared, target


def flow_graph(fn: Callable[..., Any], args: Sequence[Any]) -> FlowGraph:
    """The FlowGraph of ``fn(*args)`` (a scalar target), from the torch functions one eager run calls.

    The first argument's leaves stand for the trainable weights, the second's for
    the inputs' leaves; the target is the one output.
    """
    recorder, prepared, target = _record(fn, args, probe=False)
    weights = [id(t) for t in _leaves(prepared[0])]
    inputs = [id(t) for t in _leaves(prepared[1])]
    if isinstance(target, torch.Tensor) and target.grad_fn is not None and id(target) not in recorder.made_by:
        recorder._link(target)
    is_float = isinstance(target, torch.Tensor) and target.is_floating_point()
    arguments = {id(t) for t in _leaves(prepared) if isinstance(t, torch.Tensor)}
    target_id = id(target) if is_float else None
    return FlowGraph(recorder.nodes, recorder.floats, weights, inputs, target_id, arguments=arguments)


def value_and_gradients(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, tuple]:
    """``(value, gradients w.r.t. every argument)`` of a scalar ``fn``; a disconnected leaf gives ``None``."""
    return BACKEND.value_and_grad(fn, argnums=tuple(range(len(args))))(*args)


def nonfinite_equations(fn: Callable[..., Any], args: Sequence[Any]) -> list[tuple[str, int, bool, str | None]]:
    """The ops of ``fn``'s value and gradient that make NaN/Inf from finite inputs, forward pass first.

    Per-op checks rather than ``torch.autograd.detect_anomaly``: anomaly mode
    raises at the first backward function that returns NaN only (not Inf, not
    in the forward pass) and changes a global setting; here every recorded
    forward op is checked as it runs, and every backward function through a hook
    on its ``grad_fn`` (gradient in finite, gradient out not), so both passes
    are covered and made is told from passed on.

    Returns:
        ``(op, layer index or owner code, backward, user source)`` per op.
    """
    recorder, prepared, target = _record(fn, args, probe=True)
    wrt = [t for t in _leaves(prepared) if isinstance(t, torch.Tensor) and t.requires_grad]
    if isinstance(target, torch.Tensor) and target.requires_grad and wrt:
        torch.autograd.grad(target, wrt, allow_unused=True)  # runs the hooks; no .grad is written
    return recorder.nonfinite


def float64_scope() -> Any:
    """A context in which float64 works: PyTorch computes in float64 whenever its tensors are, so nothing to set."""
    return contextlib.nullcontext()


# --- The training monitor (core/monitor) ------------------------------------
# The training monitor's door to PyTorch: the applied gradients, captured at ``optimizer.apply``.
#
# Keras's PyTorch trainer runs the step eagerly and calls
# ``optimizer.apply(gradients, trainable_weights)`` under ``torch.no_grad()``.
# The monitor wraps that method (an instance attribute, in place only while the
# recording train function runs): the wrapper measures the raw statistics
# (``[5, weights]``, see :mod:`gradmagic.core.monitor.columns`) of the gradients
# into a host NumPy array (on the CPU, reading a tensor's values costs no copy)
# and hands the very same gradient tensors on. Measuring only reads the
# gradients, so training is unchanged. Where the bad step is kept, the model's
# ``train_step`` is wrapped too (the same way), to see each step's batch.

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _float32(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [g if g.dtype == torch.float32 else g.to(torch.float32) for g in grads]


def exact_stats(grads: Sequence[torch.Tensor]) -> np.ndarray:
    """Raw statistics ``[5, len(grads)]`` (``RAW_ROWS``) of the finite entries, with NaN/Inf counts.

    The norm is taken of the gradient divided by its largest |entry| and scaled
    back, exact to float32 rounding where squares would underflow or overflow.
    Several passes per gradient: the path of the rare steps :func:`full_stats`
    cannot trust.
    """
    columns = []
    for grad in _float32(grads):
        flat = grad.detach().reshape(-1)
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
        columns.append(torch.stack([values.sum(), norm, peak, nan, inf]).cpu())
    return torch.stack(columns, dim=1).numpy()


def full_stats(grads: Sequence[torch.Tensor], floors: np.ndarray) -> np.ndarray:
    """Raw statistics ``[5, len(grads)]``: sum, norm and max |g| in few kernels, exact where suspect.

    One fused norm per gradient (``torch._foreach_norm``), one sum and one
    ``aminmax``. Valid when every result is finite and no sum of squares is below
    its floor (float32 squares may have underflowed) unless the gradient is zero;
    otherwise :func:`exact_stats` is taken instead.
    """
    flat = [g.reshape(-1) for g in _float32(grads)]
    if any(f.numel() == 0 for f in flat):
        return exact_stats(grads)
    norms = torch.stack(torch._foreach_norm(flat))
    total = torch.stack([f.sum() for f in flat])
    extremes = [torch.aminmax(f) for f in flat]
    peak = torch.stack([torch.maximum(e.max, -e.min) for e in extremes])
    quick = np.zeros((5, len(flat)), np.float32)
    quick[:3] = torch.stack([total, norms, peak]).cpu().numpy()
    squares = quick[1].astype(np.float64) ** 2
    trusted = np.isfinite(quick).all() and np.all((squares >= floors) | (quick[2] == 0))
    return quick if trusted else exact_stats(grads)


def norm_stats(grads: Sequence[torch.Tensor], full: bool, floors: np.ndarray) -> np.ndarray:
    """The norm of each gradient (one fused norm per gradient), and :func:`full_stats` when ``full`` or suspect.

    A non-finite sum of squares, or one below its floor (squares may have
    underflowed), takes the full branch. Where only the norm is measured, the sum
    and the counts are 0 and max |g| is -1, the mark ``finish_stats`` reads. The
    check is one read of ``len(grads)`` floats (a synchronisation on an
    accelerator), made on the host: a handful of NumPy operations cost less than
    the same number of torch kernel launches.
    """
    if full or not grads:
        return full_stats(grads, floors) if grads else np.zeros((5, 0), np.float32)
    # torch._foreach_norm is the one-kernel-per-dtype norm torch.nn.utils.clip_grad_norm_ uses.
    norms = torch.stack(torch._foreach_norm(_float32(grads))).cpu().numpy()
    sums = norms.astype(np.float64) ** 2
    if not np.all((sums >= floors) & (sums <= _FLOAT32_MAX)):
        return full_stats(grads, floors)
    raw = np.zeros((5, len(grads)), np.float32)
    raw[1], raw[2] = norms, -1.0
    return raw


def histograms(grads: Sequence[torch.Tensor], raw: np.ndarray, bins: int, scale: float | None) -> tuple:
    """Each gradient's histogram over ``[-max|g|, max|g|]`` of its finite entries: ``(counts [n, bins], max|g| [n])``.

    The bins of TensorFlow's ``histogram_fixed_width`` over ``[-1, 1]``
    (``torch.histc``), of the gradient divided by its largest |entry| (which
    cannot overflow); NaN and Inf entries (counted in ``raw``) are not binned.
    """
    counts, reaches = np.zeros((len(grads), bins), np.float32), np.zeros(len(grads), np.float32)
    for k, grad in enumerate(_float32(grads)):
        values = grad.detach().reshape(-1)
        if scale is not None:
            values = values / scale
        values = torch.where(torch.isfinite(values), values, torch.zeros((), dtype=values.dtype))
        reach = torch.clamp(values.abs().max(), min=float(np.finfo(np.float32).tiny)) if values.numel() else None
        if reach is None:
            continue
        counts[k] = torch.histc(values / reach, bins, -1.0, 1.0).cpu().numpy()
        counts[k, bins // 2] -= raw[3, k] + raw[4, k]  # non-finite entries were moved to 0's bin
        reaches[k] = float(reach)
    return counts, reaches


class ApplyHook:
    """A recording ``optimizer.apply`` (and ``train_step``, to keep a bad step), put in place around each call.

    Args:
        model: The model being fit.
        buffer: Has ``columns`` (``variable.path`` -> column), ``floors``, ``mode``,
            ``full_next()``, ``histogram_next()``, ``histograms``, ``kept``,
            ``recorded()`` and ``append(raw, missing)``.
    """

    def __init__(self, model: Any, buffer: Any) -> None:
        optimizer = model.optimizer
        self.optimizer, self.model = optimizer, model
        self._had_own = "apply" in vars(optimizer)
        self._had_step = "train_step" in vars(model)
        original, step = optimizer.apply, model.train_step
        kept = buffer.kept
        self.data: Any = None

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
            scale = _loss_scale(optimizer)
            raw = np.zeros((5, n), np.float32)
            with torch.no_grad():
                if present:
                    floors = np.asarray(buffer.floors, np.float64)[columns]
                    full = buffer.full_next()
                    measured = (
                        full_stats(present, floors) if buffer.mode == "full" else norm_stats(present, full, floors)
                    )
                    raw[:, columns] = measured
                    if scale is not None:
                        # Sum, norm and max |g| scale with the loss scale, the counts do not.
                        raw[:3] /= scale
                    if buffer.histogram_next():
                        counts, reaches = np.zeros((n, buffer.histograms.bins), np.float32), np.zeros(n, np.float32)
                        counts[columns], reaches[columns] = histograms(present, measured, buffer.histograms.bins, scale)
                        buffer.histograms.append(buffer.recorded(), counts, reaches)
                    if kept is not None and kept.wants() and raw[3:].any():
                        # The first non-finite step: its batch, and the weights before the update (in place).
                        weights = [v.value.detach().clone() for v in model.trainable_variables]
                        kept.keep(buffer.recorded(), self.data, weights)
            buffer.append(raw, missing)
            return original(grads, trainable_variables)

        def train_step(data: Any) -> Any:
            self.data = data  # a reference, for the bad step
            return step(data)

        self._original, self._recording = original, recording_apply
        self._step, self._watching = step, (train_step if kept is not None else None)

    def install(self) -> None:
        # A plain instance attribute: Keras's tracking __setattr__ has nothing to track in a function.
        object.__setattr__(self.optimizer, "apply", self._recording)
        if self._watching is not None:
            object.__setattr__(self.model, "train_step", self._watching)

    def remove(self) -> None:
        _put_back(self.optimizer, "apply", self._recording, self._original, self._had_own)
        if self._watching is not None:
            _put_back(self.model, "train_step", self._watching, self._step, self._had_step)
        self.data = None


def _put_back(owner: Any, name: str, recording: Any, original: Any, had_own: bool) -> None:
    """Undo ``object.__setattr__(owner, name, recording)`` (if still in place)."""
    if owner.__dict__.get(name) is not recording:
        return
    if had_own:
        object.__setattr__(owner, name, original)
    else:
        object.__delattr__(owner, name)


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
    return plain, ApplyHook(model, buffer)


def sync_variables(model: Any) -> None:
    """Nothing to do: PyTorch updates the variables in place during ``fit``."""


def current_weights(model: Any) -> list[np.ndarray]:
    """``model.get_weights()`` in the middle of ``fit`` (PyTorch updates the variables in place)."""
    return model.get_weights()


def host_array(value: Any) -> np.ndarray:
    """A tensor (or a NumPy array, as the recorder keeps its statistics; or a batch's other values) as NumPy."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
