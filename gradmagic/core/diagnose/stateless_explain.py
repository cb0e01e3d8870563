"""Gradient-path diagnosis on JAX and PyTorch: where a gradient stops, read from the framework's own graph.

The target (the loss, or the sum of the outputs) is written as a function of
the trainable values, the inputs and a zero added to every float input and
output of each layer call (``model.stateless_call`` with each layer's ``call``
wrapped for the duration). The backend reads that function's graph as
:class:`~gradmagic.core.backends.flow.Node`\\s owned by layers (JAX: the jaxpr,
each equation in its layer's ``jax.named_scope``; PyTorch: the torch functions
one eager run calls), and :mod:`~gradmagic.core.diagnose.flow_graph` walks it:
a structural verdict per layer that holds for any data. The gradients with
respect to the zeros are the real gradients at each layer's inputs and outputs
(the observed verdict). When NaN/Inf appears, the backend's per-op pass names
where it is made. The result is the same
:class:`~gradmagic.core.diagnose.explanation.Explanation` as on TensorFlow.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from gradmagic.core.arguments import check_flag
from gradmagic.core.backends import check_backend, stateless_backend
from gradmagic.core.backends.keras_internals import calls_replaced
from gradmagic.core.batches import first_batch
from gradmagic.core.diagnose.arguments import refuse_array_loss
from gradmagic.core.diagnose.explanation import DisconnectedWeight, Explanation, LayerPath, OpInfo
from gradmagic.core.diagnose.flow_graph import (
    OWNER_GLUE,
    OWNER_LOSS,
    FlowGraph,
    Node,
    diagnose,
    gradient_levels,
    path_nodes,
)
from gradmagic.core.diagnose.origin import NonfiniteOrigin
from gradmagic.core.diagnose.progress import Progress
from gradmagic.core.diagnose.verdicts import FLOWS, NONE, VERDICTS, ZERO
from gradmagic.core.questions.entry import check_model, leaves_no_trace, prepare_loss_args, spec_and_inputs
from gradmagic.core.questions.targets import (
    check_loss_argument,
    check_loss_structure,
    model_name,
    resolve_loss,
    weight_slots,
)
from gradmagic.core.questions.trace_errors import function_name, short_error
from gradmagic.errors import ComputeError, InputError

__all__ = ["DisconnectedWeight", "Explanation", "LayerPath", "OpInfo", "explain"]


def diagnosis_backend() -> Any:
    """The module of the JAX or PyTorch backend in use, whose diagnosis section reads graphs."""
    stateless_backend()  # refuses TensorFlow and unsupported backends with the house error
    return importlib.import_module(f"gradmagic.core.backends.{check_backend()}")


def _is_float(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    return dtype is not None and "float" in keras.backend.standardize_dtype(dtype)


@dataclass
class _Calls:
    """Each layer call's float input and output shapes, found by one forward run (before the traced one)."""

    order: list[tuple[int, int]] = field(default_factory=list)  # (layer index, call) in call order
    inputs: list[list[tuple]] = field(default_factory=list)  # per call: (shape, dtype) of float input leaves
    outputs: list[list[tuple]] = field(default_factory=list)


def _first_argument(args: tuple, kwargs: dict) -> tuple[Any, bool]:
    if args:
        return args[0], True
    name = next(iter(kwargs), None)
    return (kwargs[name], False) if name is not None else (None, False)


class _Wrapping:
    """Wraps every layer's ``call``: counts calls, adds the zero perturbations, names the layer's ops."""

    def __init__(self, model: keras.Model, backend: Any, calls: _Calls | None = None) -> None:
        self.model, self.backend, self.calls = model, backend, calls
        self.found = _Calls()
        self.count: dict[int, int] = {}
        self.z_in: list = []
        self.z_out: list = []
        self.position = 0

    def _add(self, structure: Any, zeros: list) -> Any:
        leaves = keras.tree.flatten(structure)
        floats = iter(zeros)
        mixed = [leaf + next(floats) if _is_float(leaf) else leaf for leaf in leaves]
        return keras.tree.pack_sequence_as(structure, mixed)

    @staticmethod
    def _shapes(structure: Any) -> list[tuple]:
        return [(tuple(leaf.shape), leaf.dtype) for leaf in keras.tree.flatten(structure) if _is_float(leaf)]

    def wrap(self, index: int) -> Any:
        def wrapper(original: Any) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                number = self.count.get(index, 0)
                self.count[index] = number + 1
                first, positional = _first_argument(args, kwargs)
                position = self.position
                self.position += 1
                if self.calls is None:
                    self.found.order.append((index, number))
                    self.found.inputs.append(self._shapes(first))
                elif first is not None and position < len(self.z_in):
                    first = self._add(first, self.z_in[position])
                    if positional:
                        args = (first, *args[1:])
                    else:
                        kwargs = {**kwargs, next(iter(kwargs)): first}
                with self.backend.layer_scope(index, number):
                    out = original(*args, **kwargs)
                if self.calls is None:
                    self.found.outputs.append(self._shapes(out))
                elif position < len(self.z_out):
                    out = self._add(out, self.z_out[position])
                return out

            return call

        return wrapper

    def replacements(self) -> list:
        return [(layer, self.wrap(i)) for i, layer in enumerate(self.model.layers)]


@contextlib.contextmanager
def _values_in_scope(model: keras.Model, trainable: list, non_trainable: list) -> Iterator[None]:
    """Run the block with the model's variables read from the given values; writes stay in the scope, dropped.

    The loss runs in the same scope, so regularization and ``add_loss`` terms see the values passed in.
    """
    mapping = [*zip(model.trainable_variables, trainable), *zip(model.non_trainable_variables, non_trainable)]
    with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
        yield


def _zeros(shapes: list[list[tuple]]) -> list[list[Any]]:
    """Zero tensors of the framework in use, one per float leaf of each call."""
    return [
        [keras.ops.zeros(shape, keras.backend.standardize_dtype(dtype)) for shape, dtype in call] for call in shapes
    ]


@dataclass
class _Run:
    graph: FlowGraph
    calls: _Calls
    value: float | None
    weight_grads: list | None
    in_grads: list | None
    out_grads: list | None
    grad_error: str | None
    target_fn: Any
    args: list


def _run(model: keras.Model, x: Any, y: Any, sw: Any, loss_fn: Any, training: bool, backend: Any) -> _Run:
    """Find the layer calls, read the target's graph, and compute its gradients."""
    base = stateless_backend()
    trainable = base.values(model.trainable_variables)
    non_trainable = base.values(model.non_trainable_variables)
    shapes = _Wrapping(model, backend)
    with calls_replaced(shapes.replacements()), _values_in_scope(model, trainable, non_trainable):
        model(x, training=training)
    calls = shapes.found
    x_leaves = [keras.ops.convert_to_tensor(leaf) for leaf in keras.tree.flatten(x)]

    def target(weights: list, leaves: list, z_in: list, z_out: list) -> Any:
        wrapping = _Wrapping(model, backend, calls)
        wrapping.z_in, wrapping.z_out = z_in, z_out
        inputs = keras.tree.pack_sequence_as(x, leaves)
        with _values_in_scope(model, weights, non_trainable):
            with calls_replaced(wrapping.replacements()):
                y_pred = model(inputs, training=training)
            with backend.layer_scope(OWNER_LOSS if loss_fn is not None else OWNER_GLUE, 0):
                if loss_fn is None:
                    return sum(keras.ops.sum(t) for t in keras.tree.flatten(y_pred) if _is_float(t))
                return loss_fn(model, inputs, y, y_pred, sw, training)

    args = [list(trainable), list(x_leaves), _zeros(calls.inputs), _zeros(calls.outputs)]
    graph = backend.flow_graph(target, args)
    try:
        value, grads = backend.value_and_gradients(target, args)
    except Exception as exc:  # e.g. a pure_callback has no derivative: the graph analysis still stands
        return _Run(graph, calls, None, None, None, None, short_error(exc), target, args)
    to_numpy = base.to_numpy
    weight_grads, _, in_grads, out_grads = keras.tree.map_structure(to_numpy, grads)
    return _Run(graph, calls, float(to_numpy(value)), weight_grads, in_grads, out_grads, None, target, args)


# --- per layer ---------------------------------------------------------------------------------------------------


def _sources(graph: FlowGraph, nodes: list[Node]) -> list[Hashable]:
    """The values a call's nodes read from outside it: made by other nodes, or arguments (not constants)."""
    made = {v for n in nodes for v in n.outputs}
    elsewhere = {v for n in graph.nodes for v in n.outputs} | graph.arguments
    return list(dict.fromkeys(v for n in nodes for v in n.inputs if v not in made and v in elsewhere))


def _sinks(graph: FlowGraph, nodes: list[Node]) -> list[Hashable]:
    """The values a call makes that something after it reads (or that the target is)."""
    own = {id(n) for n in nodes}
    outside = {v for n in graph.nodes if id(n) not in own for v in n.inputs}
    outside.add(graph.target)
    return list(dict.fromkeys(v for n in nodes for v in n.outputs if v in outside))


def _group(nodes: list[Node], on_path: set[int]) -> list[OpInfo]:
    """Group by op kind; a group shows its worst op on the path (else its worst op anywhere)."""
    groups: dict[str, list] = {}
    for node in nodes:
        rank = (id(node) in on_path, -node.level)
        group = groups.setdefault(node.kind, [0, (False, -FLOWS - 1), FLOWS, ""])
        group[0] += 1
        if rank > group[1]:
            group[1:] = [rank, node.level, node.reason]
    return [OpInfo(kind, n, VERDICTS[lv], why, path) for kind, (n, (path, _), lv, why) in groups.items()]


def _observed(run: _Run, positions: list[int], weight_grads: list) -> str:
    if run.out_grads is None:
        return "n/a"
    outs = [g for p in positions for g in run.out_grads[p] if g is not None]
    ins = [g for p in positions for g in run.in_grads[p]]
    grads = ins + list(weight_grads)
    present = [g for g in grads if g is not None]
    if not any(np.any(g != 0) for g in outs) and not any(np.any(g != 0) for g in present):
        return "not reached"
    if not grads:
        return "n/a"
    if any(not np.all(np.isfinite(g)) for g in present):
        arrived = any(not np.all(np.isfinite(g)) for g in outs)
        return "NaN/Inf" if arrived else "NaN/Inf starts here"
    if any(np.any(g != 0) for g in present):
        return VERDICTS[FLOWS]
    return VERDICTS[ZERO] if present else VERDICTS[NONE]


def _layer_path(index: int, layer: keras.Layer, run: _Run, grads: list) -> LayerPath:
    positions = [p for p, (i, _) in enumerate(run.calls.order) if i == index]
    function = function_name(layer) if isinstance(layer, keras.layers.Lambda) else None
    record = LayerPath(index, layer.name, type(layer).__name__, function, len(positions), [], "not called")
    if not positions:
        record.verdict = "input" if isinstance(layer, keras.layers.InputLayer) else "not called"
        return record
    graph, worst, on_path = run.graph, (FLOWS + 1, None, ""), set()
    for call in {run.calls.order[p][1] for p in positions}:
        nodes = graph.layer_nodes(index, call, aliases=True)  # a nested function's renamings carry the path
        if not nodes:
            continue
        sources, sinks = _sources(graph, nodes), _sinks(graph, nodes)
        on_path.update(id(n) for n in path_nodes(nodes, sources, sinks))
        worst = min(worst, diagnose(nodes, graph.floats, sources, sinks), key=lambda v: v[0])
    level, node, reason = worst if worst[0] <= FLOWS else (FLOWS, None, "")
    record.ops = _group(graph.layer_nodes(index), on_path)
    record.verdict, record.reason, record.observed = VERDICTS[level], reason, _observed(run, positions, grads)
    record.op, record.op_name = (node.kind, f"{node.kind} in call {node.call}") if node is not None else (None, None)
    return record


# --- weights and NaN/Inf -----------------------------------------------------------------------------------------

_DATA_ZERO = (
    "no op blocks the path: the gradient is zero for this data (e.g. inactive ReLU units, saturated activations, "
    "a zero residual)"
)


def _owner(model: keras.Model, owner: int) -> tuple[int | None, str]:
    if owner >= 0:
        return owner, model.layers[owner].name
    return None, "loss" if owner == OWNER_LOSS else model_name(model)


def _disconnected(model: keras.Model, run: _Run) -> list[DisconnectedWeight]:
    """Weights with a None or all-zero gradient (from the graph alone when the gradients failed)."""
    graph, sinks = run.graph, [run.graph.target]
    levels = gradient_levels(graph.nodes, graph.floats, sinks) if graph.target is not None else {}
    found = []
    for i, (slot, source) in enumerate(zip(weight_slots(model), graph.weights, strict=True)):
        grad = None if run.weight_grads is None else run.weight_grads[i]
        if grad is not None and np.any(grad != 0):
            continue
        if graph.target is not None:
            level, node, reason = diagnose(graph.nodes, graph.floats, [source], sinks, levels)
        else:
            level, node, reason = NONE, None, ""
        if run.weight_grads is None and level == FLOWS:
            continue  # no numbers (autodiff failed): report what the graph alone proves
        # JAX returns zeros where autodiff sees no dependence (PyTorch: None): the graph tells them apart.
        kind = "None" if (grad is None or level == NONE) else "zero"
        if node is None:
            on_path = path_nodes(graph.nodes, [source], sinks)
            reason = _DATA_ZERO if on_path else "the weight does not reach the target at all"
        cut_index, cut_layer = _owner(model, node.owner) if node is not None else (None, None)
        found.append(DisconnectedWeight(slot.layer_index, slot.layer_name, slot.name, slot.path, kind, cut_index,
                                        cut_layer, None if node is None else node.kind, reason))  # fmt: skip
    return found


def _has_nonfinite(run: _Run) -> bool:
    arrays = [run.value, *keras.tree.flatten((run.weight_grads, run.in_grads, run.out_grads))]
    return any(a is not None and not np.all(np.isfinite(a)) for a in arrays)


def _nonfinite_origins(model: keras.Model, run: _Run, backend: Any, notes: list[str]) -> list[NonfiniteOrigin]:
    try:
        found = backend.nonfinite_equations(run.target_fn, run.args)
    except Exception as exc:  # the first pass ran, so this is rare
        notes.append(f"NaN/Inf was seen, but checking every op to find where it is made failed: {short_error(exc)}")
        return []
    origins = []
    for kind, owner, backward, source in found:
        index, layer = _owner(model, owner)
        origins.append(NonfiniteOrigin(kind, kind, index, layer, backward, source))
    return sorted(origins, key=lambda o: o.backward)  # forward pass first, each in the order it ran


# --- the public function -----------------------------------------------------------------------------------------


def keeps_random_state(function: Callable) -> Callable:
    """Make a public function leave the framework's global random state as it found it.

    In training mode Keras on PyTorch draws Dropout masks from PyTorch's global
    generator: the function must not advance the user's random stream (see the
    backends' ``random_state_kept``).
    """

    @functools.wraps(function)
    def kept(*args: Any, **kwargs: Any) -> Any:
        with stateless_backend().random_state_kept():
            return function(*args, **kwargs)

    return kept


@keeps_random_state
@leaves_no_trace
def explain(
    model: keras.Model,
    x: Any,
    y: Any = None,
    loss: Any = None,
    training: bool = False,
    verbose: bool = True,
    sample_weight: Any = None,
) -> Explanation:
    """Explain how the gradient flows through every layer, and why a gradient is None or zero (JAX, PyTorch).

    The target (the loss when y is given, else the sum of the model's outputs)
    is read as a graph of the framework's own ops, each attributed to the layer
    whose call made it: on JAX the jaxpr of ``model.stateless_call``
    (``jax.make_jaxpr``; ``stop_gradient``, ``round``/``floor``/``sign``,
    integer ``convert_element_type``, ``argmax``, comparisons,
    ``pure_callback``/``io_callback`` are what stop a gradient), on PyTorch the
    torch functions one eager run calls (``detach``, integer and bool outputs,
    ops whose output autograd does not follow, ``round``/``floor``/``sign``).
    The graph is walked backwards from each layer's outputs to its inputs and
    weights; the real gradients at x, at every layer's inputs and outputs, are
    computed too. When NaN/Inf appears, a per-op pass names the ops that make it
    from finite values (see the backends' ``nonfinite_equations``). The model
    is left unchanged.

    Args:
        model: A Keras 3 model (Sequential, Functional or subclassed).
        x: Inputs, as for :func:`gradmagic.weight_gradients`.
        y: Targets. Defaults to ``None``: differentiate the sum of the outputs.
        loss: The loss when y is given. Defaults to ``None``: the compiled loss.
        training: Run layers in training mode. Defaults to ``False``.
        verbose: Show a progress bar over the layers once the analysis has run
            for more than 2 seconds. Defaults to ``True``.
        sample_weight: Per-sample weights of the loss (needs y). Defaults to ``None``.

    Returns:
        An :class:`Explanation`, as on TensorFlow: ``.layers``, ``.blocked``,
        ``.disconnected``, ``.nonfinite``, ``to_dict()``, text and HTML tables.
        Op types are the framework's (JAX primitives, torch function names).

    Raises:
        GradmagicError: A bad x, y or loss, or a layer that fails on x.

    Example:
        >>> e = gradmagic.explain(model, x)
        >>> e.blocked[0].name, e.blocked[0].op     # ('lambda', 'round')
    """
    check_model(model)
    backend = diagnosis_backend()
    training = check_flag("training", training)
    progress = Progress(len(model.layers) + 1, check_flag("verbose", verbose), "layer")
    refuse_array_loss(loss, "explain")
    if y is not None:
        check_loss_argument(model, loss)
    data = first_batch(x, y, sample_weight)
    x, y, sample_weight = data.x, data.y, data.sample_weight
    if y is None and sample_weight is not None:
        raise InputError(
            "Received: sample_weight without y. Expected y too: sample weights weigh the loss, and without y "
            "explain differentiates the sum of the outputs. Fix: pass y (and the loss), or drop sample_weight."
        )
    stateless_backend().check_input(x)
    spec, x_in, batch = spec_and_inputs(model, x)
    notes, loss_fn, y_in, sw_in = [data.source] if data.source else [], None, None, None
    if y is not None:
        check_loss_structure(model, spec.output_names, loss)
        y_in, sw_in = prepare_loss_args(model, spec, y, sample_weight, batch)
        loss_fn = resolve_loss(model, loss, stateless=True)
    try:
        run = _run(model, x_in, y_in, sw_in, loss_fn, training, backend)
    except Exception as exc:
        raise ComputeError(
            f"Received: x of shape {[tuple(np.shape(t)) for t in keras.tree.flatten(x_in)]} for model "
            f"'{model_name(model)}', on which running the model to explain its gradients failed: "
            f"{short_error(exc)}. Expected a model that runs on x. Fix that layer (or what feeds it). The model "
            f"was left unchanged."
        ) from None
    progress()
    if run.grad_error is not None:
        notes.append(f"{check_backend()} could not compute the gradient, so only the graph was analysed: "
                     f"{run.grad_error}")  # fmt: skip
    slots = weight_slots(model)
    layers = []
    for index, layer in enumerate(model.layers):
        grads = run.weight_grads or []
        own = [g for s, g in zip(slots, grads, strict=False) if s.layer_index == index]
        layers.append(_layer_path(index, layer, run, own))
        progress()
    disconnected = _disconnected(model, run)
    progress.done()
    origins = []
    if _has_nonfinite(run):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the framework's own warnings about NaN while re-running
            origins = _nonfinite_origins(model, run, backend, notes)
    for backward in (False, True):  # the first op that makes NaN/Inf in each pass
        first = next((o for o in origins if o.backward == backward), None)
        if first is not None:
            notes.append(f"NaN/Inf first appears in {first.describe()}.")
    target = "sum of outputs" if loss_fn is None else "loss"
    return Explanation(model_name(model), target, run.value, layers, disconnected, notes, origins)
