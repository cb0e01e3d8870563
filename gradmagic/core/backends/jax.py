"""JAX: the framework calls gradmagic needs on ``KERAS_BACKEND=jax``, behind one small object.

The same method names as :mod:`gradmagic.core.backends.torch` (the einops
``_backends.py`` pattern), so the stateless questions are written once. Keras
on JAX is purely functional at its core: ``model.stateless_call`` takes the
variables' values as arguments and returns the new non-trainable values, which
the callers here drop, so no variable is ever written back.
"""

from __future__ import annotations

import contextlib
import functools
import linecache
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from gradmagic.core.backends.flow import ALIAS, FLOWS, NONE, OWNER_GLUE, UNCHECKED, ZERO, FlowGraph, Node
from gradmagic.core.backends.tensors import check_no_foreign

# --- The gradient questions (core/questions) ---------------------------------


class JaxBackend:
    """Compile, differentiate and convert with JAX."""

    name = "jax"
    #: A compiled call returns once dispatched and computes while Python goes on; reading a result waits for it.
    asynchronous = True

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` compiled with ``jax.jit`` (traced again only for a new input signature)."""
        return jax.jit(fn)

    def value_and_grad(
        self, fn: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        """``fn`` returning ``(value, gradients w.r.t. argnums)`` (``((value, aux), grads)`` with ``has_aux``)."""
        argnums = argnums if isinstance(argnums, int) else tuple(argnums)
        return jax.value_and_grad(fn, argnums=argnums, has_aux=has_aux)

    def host_gradients(self, fn: Callable[..., Any]) -> Callable[..., tuple[float, list[np.ndarray | None]]]:
        """``fn`` (a scalar) compiled as ``(*args) -> (value, [dValue/d leaf of args[0]])``, in NumPy.

        A leaf of the first argument that ``fn``'s value does not depend on gets
        ``None``, as TensorFlow's tape and PyTorch's autograd say (JAX itself
        gives zeros): read from the jaxpr while tracing, by a backward walk from
        the value that stops at ``stop_gradient``, at round, floor and ceil
        (which TensorFlow has no gradient for) and at integer and boolean
        values (see :func:`_reached`). The model is traced once: the jaxpr found
        is what gets differentiated.

        Small results leave the device as one array: the value and every
        gradient of one dtype, concatenated inside the compiled function, then
        split into NumPy views on the host (copying each array out costs
        microseconds of its own; for large gradients the concatenation would
        cost more than it saves).

        The result's ``launch(*args)`` dispatches the computation and returns
        at once a function that waits for it and returns what ``run`` returns.
        """
        from jax.extend.core import jaxpr_as_fun

        def traced(first: Any, *rest: Any) -> Any:
            closed = jax.make_jaxpr(fn)(first, *rest)
            leaves = jax.tree.leaves(first)
            reached = _reached(closed.jaxpr, len(leaves), _ATTRIBUTION_STOPS)  # round etc.: as on TensorFlow
            others = jax.tree.leaves(rest)
            replay = jaxpr_as_fun(closed)
            value, grads = jax.value_and_grad(lambda ls: replay(*ls, *others)[0])(leaves)
            kept = [g for g, r in zip(grads, reached) if r]
            marks = [() if r else None for r in reached]
            if all(g.dtype == value.dtype for g in kept) and sum(g.size for g in kept) <= _PACKED_SIZE:
                return None, jnp.concatenate([jnp.reshape(value, (1,)), *(jnp.ravel(g) for g in kept)]), marks
            return value, None, [g if r else None for g, r in zip(grads, reached)]

        compiled = jax.jit(traced)
        spans: dict[tuple, list] = {}  # per reached-marks: where each gradient sits in the packed array

        def fetch(first: Any, value: Any, packed: Any, marks: list) -> tuple[float, list[np.ndarray | None]]:
            if packed is None:
                return float(value), [None if g is None else np.asarray(g) for g in marks]
            # The first argument's leaves are the same variables on every call (a variable keeps its shape).
            found = spans.get(tuple(marks))
            if found is None:
                found, start = [], 1
                for mark, leaf in zip(marks, jax.tree.leaves(first)):
                    size = math.prod(leaf.shape)
                    found.append(None if mark is None else (start, start + size, tuple(leaf.shape)))
                    start += 0 if mark is None else size
                spans[tuple(marks)] = found
            host = np.asarray(packed)
            return float(host[0]), [None if s is None else host[s[0] : s[1]].reshape(s[2]) for s in found]

        def launch(*args: Any) -> Callable[[], tuple[float, list[np.ndarray | None]]]:
            # jax.jit returns once the computation is dispatched; fetching the result waits for it.
            return functools.partial(fetch, args[0], *compiled(*args))

        def run(*args: Any) -> tuple[float, list[np.ndarray | None]]:
            return launch(*args)()

        run.launch = launch
        return run

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

#: Gradients of at most this many entries in all leave the device as one array (see ``host_gradients``).
_PACKED_SIZE = 1 << 15

#: Equations through which no gradient reaches their inputs (JAX passes back a symbolic zero).
_NO_GRADIENT = frozenset({"stop_gradient"})
#: Call-like equations whose one nested jaxpr runs once on their inputs: walked inside. (A loop's body
#: runs many times, its carry feeding itself: one walk of it would miss paths, so loops count as a whole.)
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat"})


def _reached(jaxpr: Any, count: int, stops: frozenset = _NO_GRADIENT) -> list[bool]:
    """Whether the first output of ``jaxpr`` depends, through float values, on each of its first ``count`` inputs.

    A backward walk over the equations: an equation's inputs are needed when
    one of its float outputs is, except through the primitives in ``stops``
    (defaults to ``stop_gradient``). Nested
    jaxprs of call-like equations (``jit``, ``checkpoint``...) are walked
    inside; any other equation (loops, conditionals, custom derivatives
    included) passes the need to all of its inputs, so a weight is never
    called unreached when it may be reached.
    """
    needed = _needed_inputs(jaxpr, [True] + [False] * (len(jaxpr.outvars) - 1), stops)
    return needed[:count]


def _needed_inputs(jaxpr: Any, wanted: list[bool], stops: frozenset) -> list[bool]:
    needed = {v for v, w in zip(jaxpr.outvars, wanted) if w and not isinstance(v, Literal) and _is_float(v)}
    for eqn in reversed(jaxpr.eqns):
        outs = [v in needed and _is_float(v) for v in eqn.outvars]
        if not any(outs) or eqn.primitive.name in stops:
            continue
        inner = _nested(eqn.params, len(eqn.invars), len(eqn.outvars)) if eqn.primitive.name in _CALLS else None
        flags = [True] * len(eqn.invars) if inner is None else _needed_inputs(_closed(inner)[0], outs, stops)
        needed.update(v for v, f in zip(eqn.invars, flags) if f and not isinstance(v, Literal))
    return [v in needed for v in jaxpr.invars]


# --- attribution (core/questions/attribution) --------------------------------
# The attribution functions differentiate one output unit with respect to x
# (or a layer's output) and say so when no gradient path joins them, where
# TensorFlow's tape gives None: through stop_gradient, integer or boolean
# values (a cast to int, argmax), and round, floor and ceil, which TensorFlow
# registers no gradient for. JAX passes back zeros there instead, which look
# like a genuinely zero gradient (a dead ReLU, a zero weight): the same walk of
# the jaxpr that finds unreached weights (``_reached``) tells the two apart.

#: Primitives no attribution passes through: JAX's symbolic zero of ``stop_gradient``, and the
#: piecewise-constant ops TensorFlow has no gradient for (``sign``, whose TensorFlow gradient is 0, flows).
_ATTRIBUTION_STOPS = _NO_GRADIENT | frozenset({"round", "floor", "ceil"})


def attribution_value_and_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(first, *rest) -> (value, aux)`` as ``((value, aux), d value / d first)``, ``None`` for unreached leaves.

    Each float leaf of ``first`` that no gradient path joins to the value (see
    :data:`_ATTRIBUTION_STOPS`) gets ``None`` instead of JAX's zeros, as on
    TensorFlow; ``first`` itself is ``None`` when it is one such array. ``fn``
    is traced once (``jax.make_jaxpr``), and the jaxpr walked is what gets
    differentiated, as in ``JaxBackend.host_gradients``. The other arguments
    may be arrays or Python values (sizes): they are closed over, not traced.
    """
    from jax.extend.core import jaxpr_as_fun

    def run(first: Any, *rest: Any) -> tuple:
        leaves, tree = jax.tree.flatten(first)
        closed, shape = jax.make_jaxpr(lambda *ls: fn(jax.tree.unflatten(tree, ls), *rest), return_shape=True)(*leaves)
        reached = _reached(closed.jaxpr, len(leaves), _ATTRIBUTION_STOPS)
        replay, out_tree = jaxpr_as_fun(closed), jax.tree.structure(shape)
        result, grads = jax.value_and_grad(lambda ls: jax.tree.unflatten(out_tree, replay(*ls)), has_aux=True)(leaves)
        return result, jax.tree.unflatten(tree, [g if r else None for g, r in zip(grads, reached)])

    return run


# --- diagnosis ---------------------------------------------------------------
# explain reads the jaxpr of the target as a function of the trainable values,
# the inputs and zero perturbations of each layer call's inputs and outputs
# (see gradmagic.core.diagnose.stateless_explain): every equation becomes a
# Node of a FlowGraph, owned by the layer whose call's named scope it carries.

_LAYER_SCOPE = re.compile(r"gradmagic_layer(-?\d+)_call(\d+)")
_STOPS = {
    "stop_gradient": "stop_gradient blocks the gradient on purpose (JAX passes back a symbolic zero)",
    "pure_callback": "jax.pure_callback runs Python, which JAX cannot differentiate",
    "io_callback": "jax.experimental.io_callback runs Python, which JAX cannot differentiate",
    "callback": "a host callback runs Python, which JAX cannot differentiate",
}
_PIECEWISE_CONSTANT = {"round", "floor", "ceil", "sign", "nextafter"}
_CUSTOM = {
    "custom_jvp_call": "custom gradient (jax.custom_jvp): its JVP rule decides what flows",
    "custom_vjp_call": "custom gradient (jax.custom_vjp, keras.ops.custom_gradient): its backward rule decides",
    "custom_vjp_call_jaxpr": "custom gradient (jax.custom_vjp, keras.ops.custom_gradient): its backward rule decides",
}
_LIBRARIES = tuple(f"{os.sep}{name}{os.sep}" for name in ("jax", "jaxlib", "keras", "numpy"))
_OWN = f"{os.sep}gradmagic{os.sep}"


def layer_scope(index: int, call: int) -> Any:
    """A context naming the equations a layer's call creates (``jax.named_scope``: in each one's name stack)."""
    return jax.named_scope(f"gradmagic_layer{index}_call{call}")


def _is_float(var: Any) -> bool:
    dtype = getattr(getattr(var, "aval", None), "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _owner(eqn: Any, inherited: tuple[int, int]) -> tuple[int, int]:
    """``(layer index, call)`` from the innermost layer scope in the equation's name stack, else ``inherited``."""
    found = _LAYER_SCOPE.findall(str(eqn.source_info.name_stack))
    return (int(found[-1][0]), int(found[-1][1])) if found else inherited


def user_source(eqn: Any) -> str | None:
    """``file:line (function): code`` of the user code that created an equation; None for library code.

    Public API missing: JAX keeps an equation's Python traceback in
    ``eqn.source_info.traceback`` (a jaxlib ``Traceback`` whose ``frames`` have
    ``file_name``, ``line_num``, ``function_name``), innermost frame first.
    Falls back to ``None`` (no line shown) if that changes.
    """
    try:
        frames = list(eqn.source_info.traceback.frames)
    except AttributeError:
        return None
    for frame in frames:
        if _OWN in frame.file_name:
            return None  # a built-in layer's own op: the user's code there is the call of gradmagic
        if not any(part in frame.file_name for part in _LIBRARIES):
            code = linecache.getline(frame.file_name, frame.line_num).strip()
            code = f": {code}" if code else ""
            return f"{os.path.basename(frame.file_name)}:{frame.line_num} ({frame.function_name}){code}"
    return None


def _classify(eqn: Any) -> tuple[int, str]:
    """``(level, reason)`` of one first-order equation: what autodiff passes back from its float inputs."""
    name = eqn.primitive.name
    if name in _STOPS:
        return NONE, _STOPS[name]
    if not any(_is_float(v) for v in eqn.outvars):
        dtype = str(eqn.outvars[0].aval.dtype) if eqn.outvars else "no"
        what = f"cast to {dtype}" if name == "convert_element_type" else f"{name}: {dtype} output"
        return NONE, f"{what}: integer and bool values carry no gradient"
    if name in _PIECEWISE_CONSTANT:
        return ZERO, f"{name} is piecewise constant: JAX defines its derivative as zero"
    if name in _CUSTOM:
        return FLOWS, _CUSTOM[name]
    return FLOWS, ""


def _closed(jaxpr: Any) -> tuple[Any, list]:
    """``(open jaxpr, consts)`` of a ClosedJaxpr or a Jaxpr."""
    return (jaxpr.jaxpr, list(jaxpr.consts)) if hasattr(jaxpr, "jaxpr") else (jaxpr, [])


class _Inliner:
    """Flattens a jaxpr and the jaxprs nested in it into Nodes, each value renamed per inlined copy."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.floats: set = set()
        self.copies = 0

    def value(self, env: dict, var: Any) -> Any:
        if isinstance(var, Literal):
            return None
        if var not in env:
            env[var] = (self.copies, id(var))
            if _is_float(var):
                self.floats.add(env[var])
        return env[var]

    def ids(self, env: dict, variables: list) -> list:
        return [i for i in (self.value(env, v) for v in variables) if i is not None]

    def alias(self, source: Any, target: Any, owner: tuple[int, int]) -> None:
        if source is not None and target is not None:
            self.nodes.append(Node(ALIAS, [source], [target], owner=owner[0], call=owner[1]))

    def inline(self, jaxpr: Any, inputs: list, owner: tuple[int, int], outputs: list | None = None) -> list:
        """Append the nodes of ``jaxpr`` reading value ids ``inputs``; return its outputs (aliased to ``outputs``)."""
        jaxpr, _ = _closed(jaxpr)
        self.copies += 1
        env: dict = {}
        for var, given in zip(jaxpr.invars, inputs, strict=False):
            self.alias(given, self.value(env, var), owner)
        for eqn in jaxpr.eqns:
            self.equation(eqn, env, owner)
        found = [self.value(env, v) for v in jaxpr.outvars]
        for inner, outer in zip(found, outputs or [], strict=False):
            self.alias(inner, outer, owner)
        return found

    def equation(self, eqn: Any, env: dict, inherited: tuple[int, int]) -> None:
        owner = _owner(eqn, inherited)
        name, params = eqn.primitive.name, eqn.params
        ins = [self.value(env, v) for v in eqn.invars]
        outs = [self.value(env, v) for v in eqn.outvars]
        if name == "scan":
            self._loop(params["jaxpr"], ins, outs, params["num_consts"], params["num_carry"], owner, xs=True)
        elif name == "while":
            skip, consts = params["cond_nconsts"], params["body_nconsts"]
            self._loop(params["body_jaxpr"], ins[skip:], outs, consts, len(outs), owner, xs=False)
        elif name == "cond":
            for branch in params["branches"]:
                self.inline(branch, ins[1:], owner, outs)
        elif name not in _CUSTOM and _nested(params, len(ins), len(outs)) is not None:
            self.inline(_nested(params, len(ins), len(outs)), ins, owner, outs)
        else:
            level, reason = _classify(eqn)
            if name not in _CUSTOM and any(_closed(j)[0] is not None for j in _jaxprs(params)):
                level, reason = FLOWS, f"{UNCHECKED}what {name} passes back is not inspected"
            node = Node(name, [i for i in ins if i is not None], [o for o in outs if o is not None], level, reason)
            node.owner, node.call, node.source = owner[0], owner[1], user_source(eqn)
            self.nodes.append(node)

    def _loop(self, body: Any, ins: list, outs: list, consts: int, carry: int, owner: tuple, xs: bool) -> None:
        """A scan or while body, inlined twice: the second copy reads the first's carry (one step of the loop)."""
        state = ins[consts : consts + carry]
        for _ in range(2):
            found = self.inline(body, ins[:consts] + state + (ins[consts + carry :] if xs else []), owner)
            state = found[:carry]
            for inner, outer in zip(found, outs, strict=False):
                self.alias(inner, outer, owner)


def _jaxprs(params: dict) -> list:
    return [p for p in params.values() if hasattr(p, "eqns") or hasattr(p, "jaxpr")]


def _nested(params: dict, inputs: int, outputs: int) -> Any:
    """The one nested jaxpr of a call-like equation (jit, checkpoint, closed_call...) taking its inputs, else None."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        found = params.get(key)
        if found is None or not (hasattr(found, "eqns") or hasattr(found, "jaxpr")):
            continue
        inner, _ = _closed(found)
        if len(inner.invars) == inputs and len(inner.outvars) == outputs:
            return found
    return None


def flow_graph(fn: Callable[..., Any], args: Sequence[Any]) -> FlowGraph:
    """The FlowGraph of ``fn(*args)`` (a scalar target) from its jaxpr (``jax.make_jaxpr``).

    The first argument's leaves stand for the trainable weights, the second's for
    the inputs' leaves; the target is the one output.
    """
    closed = jax.make_jaxpr(fn)(*args)
    inliner = _Inliner()
    env: dict = {}
    inputs = [inliner.value(env, v) for v in closed.jaxpr.invars]
    counts = [len(jax.tree.leaves(a)) for a in args]
    found = inliner.inline(closed, inputs, (OWNER_GLUE, -1))
    weights, x = inputs[: counts[0]], inputs[counts[0] : counts[0] + counts[1]]
    target = found[0] if found and found[0] in inliner.floats else None
    return FlowGraph(inliner.nodes, inliner.floats, weights, x, target, arguments=set(inputs))


def value_and_gradients(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, tuple]:
    """``(value, gradients w.r.t. every argument)`` of a scalar ``fn``, run op by op (no compilation)."""
    return jax.value_and_grad(fn, argnums=tuple(range(len(args))))(*args)


def _finite(values: Sequence[Any]) -> bool:
    return all(
        bool(jnp.all(jnp.isfinite(v))) for v in values if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.inexact)
    )


def _evaluate(jaxpr: Any, consts: list, args: list, inherited: tuple, found: list) -> list:
    """Evaluate a jaxpr equation by equation, noting the equations that make NaN/Inf from finite inputs.

    An equation with a nested jit/call jaxpr that makes NaN/Inf is looked into,
    to name the primitive inside; loops and conditionals are named as a whole.
    """
    env: dict = {}

    def read(var: Any) -> Any:
        return var.val if isinstance(var, Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        # As jax.core.eval_jaxpr does: the bind parameters carry a nested jaxpr as a callable.
        with eqn.ctx.manager:
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        outs = list(outs) if eqn.primitive.multiple_results else [outs]
        owner = _owner(eqn, inherited)
        if not _finite(outs) and _finite(invals):
            nested = _nested(eqn.params, len(invals), len(outs)) if eqn.primitive.name not in _CUSTOM else None
            before = len(found)
            if nested is not None:
                inner, inner_consts = _closed(nested)
                _evaluate(inner, inner_consts, invals, owner, found)
            if len(found) == before:
                backward = "transpose" in str(eqn.source_info.name_stack)
                found.append((eqn.primitive.name, owner[0], backward, user_source(eqn)))
        for var, value in zip(eqn.outvars, outs, strict=True):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def nonfinite_equations(fn: Callable[..., Any], args: Sequence[Any]) -> list[tuple[str, int, bool, str | None]]:
    """The equations of ``fn``'s value and gradient that make NaN/Inf from finite inputs, in order.

    A per-equation pass over the jaxpr of ``jax.value_and_grad(fn)`` rather than
    ``jax.debug_nans``: that flag stops at the first NaN only (Inf needs
    ``debug_infs``), raises from wherever it stops, and also stops where NaN is
    only passed on from an input; the pass sees the forward and the backward
    equations both, tells made from passed on, and changes no global setting.

    Returns:
        ``(primitive, layer index or owner code, backward, user source)`` per equation.
    """
    closed = jax.make_jaxpr(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)
    found: list = []
    _evaluate(closed.jaxpr, list(closed.consts), jax.tree.leaves(list(args)), (OWNER_GLUE, -1), found)
    return found


def float64_scope() -> Any:
    """A context in which JAX computes in float64 (x64 mode), restoring the setting it found when it ends.

    ``jax.enable_x64(True)`` is a scoped setting: the user's own
    ``jax_enable_x64`` is back when the block ends, also when it raises.
    """
    return jax.enable_x64(True)


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


def _squares(flat: Sequence[Any]) -> Any:
    """Each flat gradient's sum of squares, one dot product each.

    As a dot product XLA's CPU backend squares and sums in one pass (a ``sum(g * g)``
    first writes the squares out). The gradients pass an optimization barrier
    first, so that XLA reads them as the step made them rather than fusing (and
    recomputing) their producers into these reductions.
    """
    zero = jnp.float32(0.0)
    return jnp.stack([jnp.vdot(f, f) if f.size else zero for f in flat])


def _flat(grads: Sequence[Any]) -> list[Any]:
    return [jnp.reshape(g, (-1,)).astype(jnp.float32) for g in jax.lax.optimization_barrier(list(grads))]


def full_stats(grads: Sequence[Any], floors: np.ndarray) -> Any:
    """Raw statistics ``[5, len(grads)]``: sum, norm and max |g|, one reduction each.

    Valid when every result is finite and no sum of squares is below its floor
    (where float32 squares may have underflowed, see ``square_floors``) unless the
    gradient is exactly zero; otherwise :func:`exact_stats` is taken instead (a
    ``lax.cond``: the step pays for it only when it happens).
    """
    flat = _flat(grads)
    zero = jnp.float32(0.0)
    total = jnp.stack([jnp.sum(f) if f.size else zero for f in flat])
    squares = _squares(flat)
    peak = jnp.stack([jnp.max(jnp.abs(f)) if f.size else zero for f in flat])
    n = len(flat)
    quick = jnp.stack([total, jnp.sqrt(squares), peak, jnp.zeros(n), jnp.zeros(n)])
    trusted = jnp.all(jnp.isfinite(quick)) & jnp.all((squares >= floors) | (peak == 0))
    return jax.lax.cond(trusted, lambda _: quick, exact_stats, flat)


def norm_stats(grads: Sequence[Any], full: Any, floors: np.ndarray) -> Any:
    """The norm of each gradient (one dot product each), and every statistic when ``full`` or when one is suspect.

    A sum of squares that is not finite (a NaN or Inf, or an overflow) or below its
    floor (squares may have underflowed; see ``square_floors``) takes the exact
    branch, :func:`exact_stats`, as do the steps that measure everything (every
    ``full_every``-th): one ``lax.cond``, whose branch the other steps skip. Where
    only the norm is measured, the sum and the counts are 0 and max |g| is -1,
    the mark ``finish_stats`` reads.
    """
    flat = _flat(grads)
    sums = _squares(flat)
    n = len(flat)
    trusted = jnp.all((sums >= floors) & (sums <= _FLOAT32_MAX))
    quick = jnp.stack([jnp.zeros(n), jnp.sqrt(sums), jnp.full(n, -1.0), jnp.zeros(n), jnp.zeros(n)]).astype(jnp.float32)
    return jax.lax.cond(jnp.logical_or(full, jnp.logical_not(trusted)), exact_stats, lambda _: quick, flat)


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


def histograms(grads: Sequence[Any], raw: Any, bins: int, inverse: Any) -> tuple[Any, Any]:
    """Each gradient's histogram over ``[-max|g|, max|g|]`` of its finite entries: ``(counts [n, bins], max|g| [n])``.

    The bins of TensorFlow's ``histogram_fixed_width`` over ``[-1, 1]``, of the
    gradient divided by its largest |entry| (which cannot overflow); NaN and Inf
    entries (counted in ``raw``) are not binned.
    """
    rows, reaches = [], []
    for k, grad in enumerate(grads):
        values = jnp.reshape(grad, (-1,)).astype(jnp.float32) * inverse
        values = jnp.where(jnp.isfinite(values), values, 0.0)
        reach = jnp.maximum(jnp.max(jnp.abs(values)), np.finfo(np.float32).tiny)
        index = jnp.clip(jnp.floor((values / reach + 1.0) * (bins / 2)).astype(jnp.int32), 0, bins - 1)
        counts = jnp.zeros(bins, jnp.float32).at[index].add(1.0)
        # Non-finite entries were moved to 0: take them out of 0's bin again.
        rows.append(counts.at[bins // 2].add(-(raw[3, k] + raw[4, k])))
        reaches.append(reach)
    return jnp.stack(rows), jnp.stack(reaches)


def recording_train_function(model: Any, plain: Any, buffer: Any) -> tuple[Callable[..., Any], Any]:
    """A train function that runs Keras's step and appends each step's raw statistics to ``buffer``.

    Same arguments and results as the one Keras makes (``(state, iterator) ->
    (logs, state)``, with ``steps_per_execution`` steps per call), compiled the
    same way (``jax.jit`` with the state donated, unless ``run_eagerly`` or
    ``jit_compile=False``). Where the buffer keeps bad steps (``buffer.kept``),
    the trainable weights are not donated: each step's pre-step weights and batch
    are then kept as they are (references, no copy) until the host has checked
    the step.

    Args:
        model: The model being fit (compiled, with its train function made).
        plain: Keras's own train function (not used: the recording one is made anew).
        buffer: Has ``floors``, ``mode``, ``full_next()`` (measure every statistic at
            the next step?), ``histogram_next()``, ``histograms`` (None, or
            ``bins`` and ``append(count, counts, ranges)``), ``kept`` (None, or
            ``keep(count, data, weights)``), ``recorded()`` and ``append(raw, missing)``
            (keep one step's raw statistics; JAX differentiates every trainable
            variable, so none is missing).

    Returns:
        ``(function, hook)``: the train function, and the hook the guard puts in
        place around each call (none needed here: the step installs its own).
    """
    step = model.train_step
    hook = _StatelessApplyHook(model.optimizer)
    floors = np.asarray(buffer.floors, np.float32)
    mode = buffer.mode
    bins = None if buffer.histograms is None else buffer.histograms.bins
    kept = buffer.kept

    def recording_step(trainable: Any, others: Any, data: Any, full: Any, binned: Any) -> Any:
        hook.install()
        try:
            logs, state = step((trainable, *others), data)
        finally:
            hook.remove()
        grads, hook.grads = hook.grads, None
        stats = full_stats(grads, floors) if mode == "full" else norm_stats(grads, full, floors)
        inverse = jnp.float32(1.0)
        if hook.scale is not None:
            # Sum, norm and max |g| scale with the loss scale, the counts do not (max |g|'s
            # -1 mark stays negative).
            inverse = 1.0 / hook.scale.astype(jnp.float32)
            stats = stats * jnp.stack([inverse, inverse, inverse, 1.0, 1.0])[:, None]
        if bins is None:
            return logs, state, stats, None
        n = len(grads)
        empty = (jnp.zeros((n, bins), jnp.float32), jnp.zeros(n, jnp.float32))
        binned = jax.lax.cond(binned, lambda g: histograms(g, stats, bins, inverse), lambda _: empty, grads)
        return logs, state, stats, binned

    if not model.run_eagerly and model.jit_compile:
        shardings = state_shardings(model)
        out_shardings = None if shardings is None else (None, shardings, None, None)
        # The trainable weights are donated unless the step's pre-step weights are kept.
        donated = (1,) if kept is not None else (0, 1)
        recording_step = jax.jit(recording_step, donate_argnums=donated, out_shardings=out_shardings)

    # The flags as device arrays made once: a host bool would be copied to the device every step.
    flags = {False: jnp.asarray(False), True: jnp.asarray(True)}

    def one_step(state: Any, data: Any) -> Any:
        count = buffer.recorded()
        if kept is not None:
            kept.keep(count, data, state[0])
        binned = buffer.histogram_next()
        logs, state, stats, histogram = recording_step(
            state[0], state[1:], data, flags[bool(buffer.full_next())], flags[binned]
        )
        buffer.append(stats, None)
        if binned:
            buffer.histograms.append(count, *histogram)
        return logs, state

    def train_function(state: Any, iterator: Any) -> Any:
        # Keras's own loop over steps_per_execution, one recorded row per step.
        logs, state = one_step(state, next(iterator))
        try:
            for _ in range(int(model.steps_per_execution) - 1):
                logs, state = one_step(state, next(iterator))
        except StopIteration:
            pass
        return logs, state

    return train_function, _NoHook()


def sync_variables(model: Any) -> None:
    """Put the trainer's latest state back into the model's variables in the middle of ``fit``.

    During ``fit`` the JAX trainer holds the weights as state and detaches them
    from the variables; ``jax_state_sync()`` (public) reattaches them, as Keras
    documents for callbacks that need the variables.
    """
    model.jax_state_sync()


def current_weights(model: Any) -> list[np.ndarray]:
    """``model.get_weights()`` in the middle of ``fit`` (after :func:`sync_variables`)."""
    sync_variables(model)
    return model.get_weights()


def host_array(value: Any) -> np.ndarray:
    """A device array as a NumPy array (waits for the step that makes it)."""
    return np.asarray(value)
