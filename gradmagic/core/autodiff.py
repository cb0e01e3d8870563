"""Gradient-path diagnosis: which TensorFlow ops each layer records, and where a gradient stops.

:func:`explain` traces the model once in a ``tf.function`` with every layer's
``call`` wrapped, so each graph op is attributed to the layer whose call created
it. Each op is classified (what does autodiff pass back through it?) and the
graph is walked backwards from a layer's outputs to its inputs and weights: a
structural verdict that holds for any data. The same trace computes the real
gradients at x, which give an observed verdict per layer and the weights whose
gradient is ``None`` or all zero.
"""

from __future__ import annotations

import contextlib
import html
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import keras
import numpy as np
import tensorflow as tf

# No public TensorFlow API answers "is a gradient registered for this op?";
# ``get_gradient_function`` is what ``tf.GradientTape`` itself consults.
from tensorflow.python.framework.ops import get_gradient_function

from gradmagic.core.gradients import check_model, spec_and_inputs, weight_gradients
from gradmagic.core.inputs import prepare_targets
from gradmagic.core.state import preserved_eagerly
from gradmagic.core.targets import LossFn, model_name, resolve_loss, weight_slots
from gradmagic.core.trace_errors import diagnose_trace_error, function_name, short_error
from gradmagic.errors import ComputeError, LayerError, brief

#: Gradient levels, ordered: a path is as good as its worst op.
NONE, ZERO, FLOWS = 0, 1, 2
VERDICTS = {NONE: "no gradient", ZERO: "zero gradient", FLOWS: "flows"}

_GLUE, _LOSS = -1, -2  # owners of ops outside any layer: model plumbing, and the loss
_PIECEWISE_CONSTANT = {"Round", "Rint", "Floor", "Ceil", "FloorDiv", "TruncateDiv", "ArgMax", "ArgMin"}
_NUMPY = "tf.numpy_function runs Python/NumPy, which TensorFlow cannot differentiate"
_EXPLICIT = {
    "StopGradient": "tf.stop_gradient blocks the gradient on purpose",
    "PreventGradient": "the gradient is explicitly disabled (PreventGradient): asking for it raises",
    "PyFunc": _NUMPY,
    "PyFuncStateless": _NUMPY,
    "EagerPyFunc": "tf.py_function: a gradient exists only if the Python function computes with TensorFlow ops",
}


# --- classifying ops and walking the graph -----------------------------------------------------------------------


def _carries_gradient(tensor: tf.Tensor) -> bool:
    return tensor.dtype.is_floating or tensor.dtype.is_complex


def op_gradient(op: tf.Operation) -> tuple[int, str]:
    """Return ``(level, reason)``: what autodiff passes back through one graph op.

    The level is :data:`FLOWS`, :data:`ZERO` or :data:`NONE`; the reason is empty
    for an ordinary differentiable op.
    """
    if not op.inputs or not op.outputs:
        return FLOWS, ""  # sources (constants, captures) and sinks (state updates): nothing to pass back
    if op.type in _EXPLICIT:
        return NONE, _EXPLICIT[op.type]
    if op.type in _PIECEWISE_CONSTANT:
        return NONE, f"{op.type} is piecewise constant: TensorFlow defines its gradient as None"
    if op.type == "Sign":
        return ZERO, "Sign is piecewise constant: its gradient is defined as zeros"
    if not any(_carries_gradient(t) for t in op.outputs):
        dtype = op.outputs[0].dtype.name
        what = f"cast to {dtype}" if op.type == "Cast" else f"{dtype} output"
        return NONE, f"{what}: integer and bool tensors carry no gradient"
    try:
        function = get_gradient_function(op)
    except LookupError:
        return NONE, f"no gradient is registered for op type {op.type}"
    if function is None:
        return NONE, f"{op.type} is registered as not differentiable"
    if op.type == "Cast" and not _carries_gradient(op.inputs[0]):
        return NONE, f"cast from {op.inputs[0].dtype.name}: integer and bool tensors carry no gradient"
    try:
        op.get_attr("_gradient_op_type")  # set by tf.custom_gradient
        return FLOWS, "custom gradient"
    except ValueError:
        return FLOWS, ""


def _path_ops(section: Sequence[tf.Operation], sources: list, sinks: list) -> list[tf.Operation]:
    """Ops of ``section`` on some path from a source to a sink (through tensors of any dtype)."""
    reached, forward = {t.name for t in sources}, set()
    for op in section:
        if any(t.name in reached for t in op.inputs):
            forward.add(op.name)
            reached.update(t.name for t in op.outputs)
    needed, on_path = {t.name for t in sinks}, []
    for op in reversed(section):
        if any(t.name in needed for t in op.outputs):
            needed.update(t.name for t in op.inputs)
            if op.name in forward:
                on_path.append(op)
    return on_path[::-1]


def _levels(section: Sequence[tf.Operation], sinks: list) -> dict[str, int]:
    """The best gradient level that reaches each tensor backwards from ``sinks``.

    Graph ops are created in topological order, so walking them in reverse visits
    every consumer before its producer.
    """
    level = {t.name: FLOWS for t in sinks if _carries_gradient(t)}
    for op in reversed(section):
        arriving = max((level.get(t.name, -1) for t in op.outputs if _carries_gradient(t)), default=-1)
        passed = min(arriving, op_gradient(op)[0])
        for t in op.inputs if arriving >= 0 else ():
            if _carries_gradient(t) and passed > level.get(t.name, -1):
                level[t.name] = passed
    return level


def _blame_rank(op: tf.Operation, reason: str) -> int:
    """Prefer ops that cut a float path (Round, casts) over comparisons feeding e.g. a tf.where."""
    if op.type in _EXPLICIT or op.type in _PIECEWISE_CONSTANT or op.type == "Sign":
        return 0
    return 1 if "cast" in reason else 2


def _diagnose(section: Sequence[tf.Operation], sources: list, sinks: list) -> tuple[int, tf.Operation | None, str]:
    """``(level, blocking op or None, reason)`` of the gradient from ``sinks`` back to ``sources``."""
    float_sources = [t for t in sources if _carries_gradient(t)]
    levels = _levels(section, sinks)
    level = max((levels.get(t.name, NONE) for t in float_sources), default=NONE)
    if level == FLOWS:
        return FLOWS, None, ""
    blockers = [(op, *op_gradient(op)) for op in _path_ops(section, sources, sinks)]
    blockers = [b for b in blockers if b[1] < FLOWS]
    # Blame an op of the kind that decided the level: a Sign for "zero", a Round rather than a Sign for "none".
    blockers = [b for b in blockers if b[1] == level] or blockers
    if not blockers:
        return level, None, "" if float_sources else "no float inputs or trainable weights to pass a gradient to"
    position = {op.name: i for i, op in enumerate(section)}
    op, _, why = min(blockers, key=lambda b: (_blame_rank(b[0], b[2]), position[b[0].name]))
    return level, op, why


# --- tracing -----------------------------------------------------------------------------------------------------


@dataclass
class _Call:
    layer_index: int
    start: int
    end: int = -1
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


class OpRecorder:
    """Attribute the ops of a traced forward pass to the layers whose calls create them.

    Each layer's ``call`` is replaced by an instance attribute for the duration of
    the trace (as in :func:`gradmagic.core.compute.capture_calls`). Ops go to the
    innermost running layer, so a layer called inside another keeps its own ops.
    """

    def __init__(self, layers: Sequence[keras.Layer]) -> None:
        self.layers = list(layers)
        self.calls: list[_Call] = []
        self.owner: list[int] = []
        self.failed: int | None = None  # the innermost layer running when tracing raised
        self.graph: Any = None
        self._stack: list[int] = []

    def flush(self, owner: int | None = None) -> int:
        """Give every op created since the last flush to ``owner`` (default: the running layer)."""
        if owner is None:
            owner = self._stack[-1] if self._stack else _GLUE
        count = len(self.graph.get_operations())
        self.owner.extend([owner] * (count - len(self.owner)))
        return count

    def _wrap(self, index: int, original: Any, tape: tf.GradientTape | None) -> Any:
        def recording_call(*args: Any, **kwargs: Any) -> Any:
            call = _Call(index, self.flush())
            call.inputs = [t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, tf.Tensor)]
            self._stack.append(index)
            try:
                if tape is not None:
                    tape.watch([t for t in call.inputs if _carries_gradient(t)])
                outputs = original(*args, **kwargs)
            except Exception:
                self.failed = index if self.failed is None else self.failed
                raise
            finally:
                call.end = self.flush()
                self._stack.pop()
            call.outputs = [t for t in keras.tree.flatten(outputs) if isinstance(t, tf.Tensor)]
            if tape is not None:
                tape.watch([t for t in call.outputs if _carries_gradient(t)])
            self.calls.append(call)
            return outputs

        return recording_call

    @contextlib.contextmanager
    def recording(self, tape: tf.GradientTape | None = None) -> Iterator[None]:
        """Wrap every layer's ``call`` (watching its tensors on ``tape``); unwrap afterwards."""
        self.graph = tf.compat.v1.get_default_graph()
        installed = []
        try:
            for index, layer in enumerate(self.layers):
                installed.append((layer, "call" in vars(layer), layer.call))
                object.__setattr__(layer, "call", self._wrap(index, layer.call, tape))
            yield
        finally:
            for layer, had_own, original in installed:
                if had_own:
                    object.__setattr__(layer, "call", original)
                else:
                    object.__delattr__(layer, "call")


class TracingFailed(Exception):
    """Tracing the model raised; carries the innermost layer that was running."""

    def __init__(self, cause: Exception, layer_index: int | None) -> None:
        super().__init__(str(cause))
        self.cause, self.layer_index = cause, layer_index


def concrete_function(function: Any, recorder: OpRecorder, *args: Any) -> Any:
    """Trace ``function`` once; a failure raises :class:`TracingFailed` naming the layer that was running.

    One concrete function, called directly: tf.function's retracing warning is
    meant for functions called repeatedly, not for a trace made on purpose.
    """
    try:
        return function.get_concrete_function(*args)
    except Exception as exc:
        raise TracingFailed(exc, recorder.failed) from None


@dataclass
class _Trace:
    recorder: OpRecorder
    forward_end: int
    target: Any
    value: float | None
    in_grads: list
    out_grads: list
    weight_grads: list | None
    grad_error: str | None = None


def _sum_of_outputs(y_pred: Any) -> tf.Tensor | None:
    floats = [t for t in keras.tree.flatten(y_pred) if isinstance(t, tf.Tensor) and _carries_gradient(t)]
    return tf.add_n([tf.reduce_sum(tf.cast(t, tf.float64)) for t in floats]) if floats else None


def _trace(model: keras.Model, x: Any, y: Any, loss_fn: LossFn | None, training: bool, gradients: bool) -> _Trace:
    """Run the model once in a tf.function, recording ops per layer and (optionally) every gradient."""
    recorder, variables, info = OpRecorder(model.layers), list(model.trainable_weights), {"grad_error": None}

    @tf.function
    def run(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            with recorder.recording(tape):
                y_pred = model(x, training=training)
            recorder.flush(_GLUE)
            target = _sum_of_outputs(y_pred) if loss_fn is None else loss_fn(model, x, y, y_pred, None, training)
        info["forward_end"], info["target"] = recorder.flush(_LOSS), target
        if target is None or not gradients:
            return target, None
        try:
            sources = ([c.inputs for c in recorder.calls], [c.outputs for c in recorder.calls], variables)
            return target, dense(tape.gradient(target, sources))
        except Exception as exc:  # e.g. PreventGradient raises here; the forward analysis still stands
            info["grad_error"] = short_error(exc)
            return target, None

    concrete = concrete_function(run, recorder, x, y)
    with preserved_eagerly(model):
        value, grads = concrete(x, y)
    in_grads, out_grads, weight_grads = _numpy(grads) if grads is not None else ([], [], None)
    value = None if value is None else float(value)
    return _Trace(
        recorder, info["forward_end"], info["target"], value, in_grads, out_grads, weight_grads, info["grad_error"]
    )


def dense(nested: Any) -> Any:
    """Gradients with ``tf.IndexedSlices`` (from gathers, e.g. Embedding) turned into plain tensors."""
    return tf.nest.map_structure(
        lambda g: tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g, nested, expand_composites=False
    )


def _numpy(nested: Any) -> Any:
    return keras.tree.map_structure(lambda t: None if t is None else np.asarray(t), nested)


def text_table(title: str, headers: Sequence[str], rows: list[list[Any]]) -> str:
    """A plain-text table with padded columns (``None`` shows as empty)."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells])


def html_table(title: str, headers: Sequence[str], rows: list[list[Any]], styles: list[tuple[str, str]]) -> str:
    """An HTML table; ``styles`` gives each row's ``(state, css)``, the state becoming class ``gm-<state>``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        f'<tr class="gm-{state}" style="{css}">'
        + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row)
        + "</tr>"
        for row, (state, css) in zip(rows, styles, strict=True)
    )
    caption = f"<caption style='text-align:left'>{html.escape(title)}</caption>"
    return f'<table class="gradmagic">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


@dataclass(frozen=True)
class OpInfo:
    """The ops of one type that a layer's call recorded.

    Attributes:
        type: The TensorFlow op type (``MatMul``, ``Round``...).
        count: How many such ops the call created.
        gradient: ``"flows"``, ``"zero gradient"`` or ``"no gradient"`` through this kind of op.
        reason: Why not (or a note, e.g. "custom gradient").
        on_path: True when such an op lies between the layer's inputs or weights
            and its outputs; off-path ops (``Shape``...) never matter.
    """

    type: str
    count: int
    gradient: str
    reason: str
    on_path: bool

    @property
    def differentiable(self) -> bool:
        """True when autodiff passes a non-zero gradient through this op."""
        return self.gradient == VERDICTS[FLOWS]


@dataclass
class LayerPath:
    """How the gradient passes through one layer of ``model.layers``.

    Attributes:
        index, name, type: The layer, by its index in ``model.layers``.
        function: A Lambda layer's Python function name (``<lambda>`` for a lambda), else ``None``.
        calls: How many times one forward pass called the layer.
        ops: The ops its call recorded, grouped by type, in order of appearance.
        verdict: From the graph, for any data: ``"flows"``, ``"zero gradient"`` or
            ``"no gradient"``; ``"input"`` for an ``InputLayer``, ``"not called"``
            for a layer the forward pass never runs.
        op, op_name: Type and graph name of the op responsible for a verdict other than ``"flows"``.
        reason: Why that op stops the gradient.
        observed: The real gradients at x: ``"flows"``, ``"zero gradient"``, ``"no
            gradient"``, ``"not reached"`` (nothing arrives at the layer's output) or ``"n/a"``.
    """

    index: int
    name: str
    type: str
    function: str | None
    calls: int
    ops: list[OpInfo]
    verdict: str
    op: str | None = None
    op_name: str | None = None
    reason: str = ""
    observed: str = "n/a"

    def ops_text(self) -> str:
        """The ops as ``Mul, Round!, ReadVariableOp×2`` (``!``: blocks the gradient on the layer's path)."""
        marks = [(i.type, "!" if i.on_path and not i.differentiable else "", i.count) for i in self.ops]
        return ", ".join(f"{t}{m}" + (f"×{n}" if n > 1 else "") for t, m, n in marks)


@dataclass(frozen=True)
class DisconnectedWeight:
    """A trainable weight whose gradient is ``None`` or all zero at x.

    Attributes:
        index, layer: The owning layer in ``model.layers``.
        weight, path: The variable's name and unique path.
        gradient: ``"None"`` or ``"zero"``.
        cut_index, cut_layer, cut_op: Where the path is cut: the first blocking op
            downstream of the weight, and the layer whose call created it. An op
            outside every layer gives ``cut_index=None`` and ``cut_layer="loss"``
            or the model's name (its own ``call``); all three are ``None`` when
            no op blocks the path.
        reason: Why, in words.
    """

    index: int
    layer: str
    weight: str
    path: str
    gradient: str
    cut_index: int | None
    cut_layer: str | None
    cut_op: str | None
    reason: str

    def describe(self) -> str:
        """One line: the weight, its gradient, where and why the path is cut."""
        if self.cut_op is None:
            cut = ""
        elif self.cut_index is not None:
            cut = f", cut in layer {self.cut_index} '{self.cut_layer}' by op {self.cut_op}"
        else:
            where = "the loss" if self.cut_layer == "loss" else f"the call of model '{self.cut_layer}' itself"
            cut = f", cut in {where} by op {self.cut_op}"
        return f"layer {self.index} '{self.layer}' {self.weight}: gradient {self.gradient}{cut}: {self.reason}"


_COLUMNS = ("index", "layer", "type", "function", "ops", "verdict", "op", "reason", "observed")
_STYLES = {"no gradient": "background:#ffd6d6;color:#900", "zero gradient": "background:#fff1c6;color:#7a5b00"}


@dataclass(eq=False)
class Explanation:
    """The gradient-path report of one model at one input, from :func:`explain`.

    Attributes:
        model: The model's name.
        target: What was differentiated: ``"loss"`` or ``"sum of outputs"``.
        value: Its value at x (``None`` if it could not be computed).
        layers: One :class:`LayerPath` per entry of ``model.layers``.
        disconnected: The :class:`DisconnectedWeight` entries.
        notes: Anything that limited the analysis (e.g. autodiff itself failed).
    """

    model: str
    target: str
    value: float | None
    layers: list[LayerPath]
    disconnected: list[DisconnectedWeight] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, key: int | str) -> LayerPath:
        """One layer's record, by ``model.layers`` index or by name."""
        for record in self.layers:
            if key in (record.index, record.name):
                return record
        names = ", ".join(repr(r.name) for r in self.layers)
        raise LayerError(f"Received: {key!r}. Expected a layer index or one of {names} of model '{self.model}'.")

    @property
    def blocked(self) -> list[LayerPath]:
        """The layers whose verdict is ``"zero gradient"`` or ``"no gradient"``."""
        return [r for r in self.layers if r.verdict in (VERDICTS[NONE], VERDICTS[ZERO])]

    def _row(self, r: LayerPath) -> list[Any]:
        return [r.index, r.name, r.type, r.function, r.ops_text(), r.verdict, r.op, r.reason, r.observed]

    def to_dict(self) -> dict[str, Any]:
        """``{"layers": columns, "disconnected": columns, "target", "value", "notes"}``.

        Both tables are dicts of equal-length lists: ``pandas.DataFrame(e.to_dict()["layers"])``.
        """
        rows = [self._row(r) for r in self.layers]
        layers = {name: [row[i] for row in rows] for i, name in enumerate(_COLUMNS)}
        disconnected = {f.name: [getattr(d, f.name) for d in self.disconnected] for f in fields(DisconnectedWeight)}
        return {"layers": layers, "disconnected": disconnected, "target": self.target, "value": self.value,
                "notes": list(self.notes)}  # fmt: skip

    def _title(self) -> str:
        value = "" if self.value is None else f" = {self.value:.6g}"
        return f"Gradient paths of model '{self.model}' (differentiating the {self.target}{value})"

    def __repr__(self) -> str:
        lines = [text_table(self._title(), _COLUMNS, [self._row(r) for r in self.layers])]
        if self.disconnected:
            lines += ["Disconnected weights (gradient None or all zero at x):"]
            lines += [f"  {d.describe()}" for d in self.disconnected]
        return "\n".join(lines + [f"Note: {n}" for n in self.notes])

    def _repr_html_(self) -> str:
        styles = [(r.verdict.replace(" ", "-"), _STYLES.get(r.verdict, "")) for r in self.layers]
        parts = [html_table(self._title(), _COLUMNS, [self._row(r) for r in self.layers], styles)]
        if self.disconnected:
            items = "".join(f"<li>{html.escape(d.describe())}</li>" for d in self.disconnected)
            parts.append(f"<p>Disconnected weights (gradient None or all zero at x):</p><ul>{items}</ul>")
        return "".join(parts + [f"<p><em>Note: {html.escape(n)}</em></p>" for n in self.notes])


# --- putting it together -----------------------------------------------------------------------------------------


def _group_ops(ops: list[tf.Operation], on_path: set[str]) -> list[OpInfo]:
    """Group by op type; a group shows its worst op on the path (else its worst op anywhere)."""
    groups: dict[str, list] = {}
    for op in ops:
        if op.type == "Placeholder":  # captured variables: not computation of the layer
            continue
        level, reason = op_gradient(op)
        rank = (op.name in on_path, -level)
        group = groups.setdefault(op.type, [0, (False, -FLOWS - 1), FLOWS, ""])
        group[0] += 1
        if rank > group[1]:
            group[1:] = [rank, level, reason]
    return [OpInfo(t, n, VERDICTS[lv], why, path) for t, (n, (path, _), lv, why) in groups.items()]


def _weight_sources(recorder: OpRecorder, variables: list) -> dict[int, list[tf.Tensor]]:
    """For each variable (by id), the tensors its reads produce in the traced graph."""
    by_handle = {id(v.value.handle): id(v) for v in variables if hasattr(v.value, "handle")}
    found: dict[int, list[tf.Tensor]] = {}
    for external, internal in recorder.graph.captures:
        if id(external) in by_handle:
            reads = [t for op in internal.consumers() for t in op.outputs]
            found.setdefault(by_handle[id(external)], []).extend(reads)
    return found


def _observed(trace: _Trace, calls: list[int], weight_grads: list) -> str:
    if not trace.out_grads:
        return "n/a"
    outs = [g for i in calls for g in trace.out_grads[i] if g is not None]
    if not any(np.any(g != 0) for g in outs):
        return "not reached"
    float_in = [(g, t) for i in calls for g, t in zip(trace.in_grads[i], trace.recorder.calls[i].inputs, strict=True)]
    grads = [g for g, t in float_in if _carries_gradient(t)] + list(weight_grads)
    present = [g for g in grads if g is not None]
    if not grads:
        return "n/a"
    if any(np.any(g != 0) for g in present):
        return VERDICTS[FLOWS]
    return VERDICTS[ZERO] if present else VERDICTS[NONE]


def _judge_calls(layer: keras.Layer, calls: list[_Call], trace: _Trace, weights: dict) -> tuple[tuple, set[str]]:
    """The worst ``(level, op, reason)`` over a layer's calls (a shared layer runs several) and its on-path ops."""
    ops = trace.recorder.graph.get_operations()
    worst: tuple = (FLOWS + 1, None, "")
    on_path: set[str] = set()
    for call in calls:
        section = ops[call.start : call.end]
        names = {op.name for op in section}
        reads = [t for v in layer.trainable_weights for t in weights.get(id(v), []) if t.op.name in names]
        on_path.update(op.name for op in _path_ops(section, call.inputs + reads, call.outputs))
        worst = min(worst, _diagnose(section, call.inputs + reads, call.outputs), key=lambda v: v[0])
    return worst, on_path


def _layer_path(index: int, layer: keras.Layer, trace: _Trace, weights: dict, grads: list) -> LayerPath:
    recorder = trace.recorder
    calls = [i for i, c in enumerate(recorder.calls) if c.layer_index == index]
    function = function_name(layer) if isinstance(layer, keras.layers.Lambda) else None
    record = LayerPath(index, layer.name, type(layer).__name__, function, len(calls), [], "not called")
    if not calls:
        record.verdict = "input" if isinstance(layer, keras.layers.InputLayer) else "not called"
        return record
    (level, op, reason), on_path = _judge_calls(layer, [recorder.calls[i] for i in calls], trace, weights)
    ops = recorder.graph.get_operations()[: trace.forward_end]
    record.ops = _group_ops([o for i, o in enumerate(ops) if recorder.owner[i] == index], on_path)
    record.verdict, record.reason, record.observed = VERDICTS[level], reason, _observed(trace, calls, grads)
    record.op, record.op_name = (op.type, op.name) if op is not None else (None, None)
    if record.op == "EagerPyFunc" and record.observed == VERDICTS[FLOWS]:
        # tf.py_function records its own tape: with TensorFlow ops inside, gradients do pass.
        note = "tf.py_function: its Python code is differentiated on its own tape"
        record.verdict, record.op, record.op_name, record.reason = VERDICTS[FLOWS], None, None, note
        record.ops = [OpInfo(i.type, i.count, VERDICTS[FLOWS], note, i.on_path) if i.type == "EagerPyFunc" else i
                      for i in record.ops]  # fmt: skip
    return record


def _cut_owner(model: keras.Model, trace: _Trace, op: tf.Operation) -> tuple[int | None, str]:
    """``(index, layer name)`` of the layer whose call created ``op``; ``(None, "loss")`` or the model's name."""
    owner = trace.recorder.owner[[o.name for o in trace.recorder.graph.get_operations()].index(op.name)]
    if owner >= 0:
        return owner, model.layers[owner].name
    return None, "loss" if owner == _LOSS else model_name(model)


_DATA_ZERO = (
    "no op blocks the path: the gradient is zero for this data (e.g. inactive ReLU units, saturated activations, "
    "a zero residual)"
)


def _disconnected(model: keras.Model, trace: _Trace, grads: list | None, weights: dict) -> list[DisconnectedWeight]:
    """Weights with a None or all-zero gradient (from the graph alone when ``grads`` is None)."""
    section, sinks = trace.recorder.graph.get_operations()[: trace.forward_end], [trace.target]
    found = []
    for i, (slot, var) in enumerate(zip(weight_slots(model), model.trainable_weights, strict=True)):
        grad, sources = None if grads is None else grads[i], weights.get(id(var), [])
        if grad is not None and np.any(grad != 0):
            continue
        level, op, reason = _diagnose(section, sources, sinks) if trace.target is not None else (NONE, None, "")
        if grads is None:  # no numbers (autodiff failed): report what the graph alone proves
            if level == FLOWS:
                continue
            kind = "None" if level == NONE else "zero"
        else:
            kind = "None" if grad is None else "zero"
        if op is None:
            reason = _DATA_ZERO if _path_ops(section, sources, sinks) else "the weight does not reach the target at all"
        cut_index, cut_layer = _cut_owner(model, trace, op) if op is not None else (None, None)
        found.append(DisconnectedWeight(slot.layer_index, slot.layer_name, slot.name, slot.path, kind, cut_index,
                                        cut_layer, None if op is None else op.type, reason))  # fmt: skip
    return found


def _run_trace(model: keras.Model, x: Any, y: Any, loss_fn: LossFn | None, training: bool) -> _Trace:
    """Trace with gradients; if they fail at run time, trace the forward pass alone and say why."""
    try:
        try:
            return _trace(model, x, y, loss_fn, training, gradients=True)
        except tf.errors.OpError as exc:  # e.g. the gradient of a tf.py_function whose body is NumPy
            trace = _trace(model, x, y, loss_fn, training, gradients=False)
            trace.grad_error = short_error(exc)
            return trace
    except TracingFailed as failed:
        raise diagnose_trace_error(failed.cause, model, failed.layer_index) or ComputeError(
            f"Tracing model '{model_name(model)}' to explain its gradients failed: {brief(failed.cause)} The model "
            f"was left unchanged."
        ) from None


def explain(model: keras.Model, x: Any, y: Any = None, loss: Any = None, training: bool = False) -> Explanation:
    """Explain how the gradient flows through every layer, and why a gradient is None.

    The model is traced once in a ``tf.function`` with every layer's ``call``
    wrapped, which attributes each TensorFlow op to its layer. Each op is marked
    differentiable or not (no registered gradient, integer/bool output,
    ``tf.stop_gradient``, ``tf.numpy_function``/``tf.py_function`` escapes,
    piecewise-constant ops such as ``Round``, ``Floor``, ``Sign``, ``ArgMax``),
    and the graph is walked backwards from each layer's outputs to its inputs and
    weights. The real gradients at x are computed too: of the loss when y is given
    (through :func:`gradmagic.weight_gradients`), else of the sum of the model's
    outputs. The model is left unchanged.

    Args:
        model: A Keras 3 model (Sequential, Functional or subclassed).
        x: Inputs, as for :func:`gradmagic.weight_gradients`.
        y: Targets. Defaults to ``None``: differentiate the sum of the outputs.
        loss: The loss when y is given. Defaults to ``None``: the compiled loss.
        training: Run layers in training mode. Defaults to ``False``.

    Returns:
        An :class:`Explanation`: ``.layers`` (a :class:`LayerPath` per entry of
        ``model.layers``: its ops, verdict, the op responsible, the observed
        gradient), ``.disconnected`` (weights whose gradient is None or all zero
        at x, with where the path is cut), ``to_dict()``, text and HTML tables.

    Raises:
        GradmagicError: A bad x, y or loss; or a layer that cannot be traced (a
            Lambda using Python ``if`` or NumPy on a tensor), named with the fix.

    Example:
        >>> e = gradmagic.explain(model, x)
        >>> e.blocked[0].name, e.blocked[0].op     # ('lambda', 'Round')
    """
    check_model(model)
    spec, x_in, batch = spec_and_inputs(model, x)
    notes, grads, loss_fn, y_in = [], None, None, None
    if y is not None:  # check y and the loss before tracing, so that their mistakes get their own messages
        y_in, loss_fn = prepare_targets(model, y, batch, spec), resolve_loss(model, loss)
    trace = _run_trace(model, x_in, y_in, loss_fn, training)
    if trace.grad_error is not None:
        notes.append(f"TensorFlow could not compute the gradient, so only the graph was analysed: {trace.grad_error}")
    if y is not None and trace.grad_error is None:
        try:
            grads = weight_gradients(model, x, y, loss=loss, training=training).arrays()
        except ComputeError as exc:
            notes.append(f"computing dLoss/dW failed: {exc}")
    grads = grads if grads is not None else trace.weight_grads
    weights = _weight_sources(trace.recorder, model.trainable_weights)
    slots = weight_slots(model)
    layers = []
    for index, layer in enumerate(model.layers):
        own = [g for s, g in zip(slots, grads, strict=True) if s.layer_index == index] if grads is not None else []
        layers.append(_layer_path(index, layer, trace, weights, own))
    disconnected = _disconnected(model, trace, grads, weights)
    target = "sum of outputs" if loss_fn is None else "loss"
    return Explanation(model_name(model), target, trace.value, layers, disconnected, notes)
