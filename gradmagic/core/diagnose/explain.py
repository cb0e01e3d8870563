"""Gradient-path diagnosis: which TensorFlow ops each layer records, and where a gradient stops.

:func:`explain` traces the model once in a ``tf.function`` with every layer's
``call`` wrapped, so each graph op is attributed to the layer whose call created
it (:mod:`~gradmagic.core.diagnose.tracing`). Each op is classified (what does autodiff
pass back through it?) and the graph is walked backwards from a layer's outputs
to its inputs and weights (:mod:`~gradmagic.core.diagnose.op_graph`): a structural
verdict that holds for any data. The same trace computes the real gradients at
x, which give an observed verdict per layer and the weights whose gradient is
``None`` or all zero. The result objects live in :mod:`~gradmagic.core.diagnose.explanation`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradmagic.core.arguments import check_flag
from gradmagic.core.backends.tensorflow import MissingInternal, variable_placeholders
from gradmagic.core.batches import first_batch
from gradmagic.core.diagnose.arguments import refuse_array_loss
from gradmagic.core.diagnose.explanation import DisconnectedWeight, Explanation, LayerPath, OpInfo
from gradmagic.core.diagnose.nonfinite_origin import NonfiniteOrigin, nonfinite_origins, probed_ops
from gradmagic.core.diagnose.op_graph import (
    FLOWS,
    NONE,
    UNCHECKED,
    VERDICTS,
    ZERO,
    carries_gradient,
    diagnose,
    gradient_levels,
    op_gradient,
    path_ops,
)
from gradmagic.core.diagnose.progress import Progress
from gradmagic.core.diagnose.tracing import (
    OWNER_GLUE,
    OWNER_LOSS,
    LayerCall,
    OpRecorder,
    TracingFailed,
    concrete_function,
    run_once,
    tracing_error,
)
from gradmagic.core.questions.compute import dense_gradients
from gradmagic.core.questions.entry import check_model, leaves_no_trace, prepare_loss_args, spec_and_inputs
from gradmagic.core.questions.gradients import weight_gradients
from gradmagic.core.questions.state import preserved_eagerly
from gradmagic.core.questions.targets import (
    LossFn,
    check_loss_argument,
    check_loss_structure,
    model_name,
    resolve_loss,
    weight_slots,
)
from gradmagic.core.questions.trace_errors import function_name, short_error
from gradmagic.errors import ComputeError, GradmagicWarning, InputError

__all__ = ["DisconnectedWeight", "Explanation", "LayerPath", "OpInfo", "explain"]


# --- tracing with gradients --------------------------------------------------------------------------------------


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
    probed: list | None = None  # with probe=True: the ops checked for NaN/Inf, and their flags
    finite: np.ndarray | None = None
    ops: list = field(default_factory=list)  # every op of the traced graph, in creation order

    def __post_init__(self) -> None:
        # Read once: the per-layer analysis slices and indexes these instead of listing the graph per layer.
        self.ops = self.recorder.graph.get_operations()
        self.forward = self.ops[: self.forward_end]
        self.position = {op.name: i for i, op in enumerate(self.ops)}
        self.by_owner: dict[int, list] = {}
        for op, owner in zip(self.forward, self.recorder.owner, strict=False):
            self.by_owner.setdefault(owner, []).append(op)
        self.calls_of: dict[int, list[int]] = {}
        for i, call in enumerate(self.recorder.calls):
            self.calls_of.setdefault(call.layer_index, []).append(i)


def _sum_of_outputs(y_pred: Any) -> tf.Tensor | None:
    floats = [t for t in keras.tree.flatten(y_pred) if isinstance(t, tf.Tensor) and carries_gradient(t)]
    return tf.add_n([tf.reduce_sum(tf.cast(t, tf.float64)) for t in floats]) if floats else None


def _trace(
    model: keras.Model,
    x: Any,
    y: Any,
    sw: Any,
    loss_fn: LossFn | None,
    training: bool,
    gradients: bool,
    probe: bool = False,
) -> _Trace:
    """Run the model once in a tf.function, recording ops per layer and (optionally) every gradient.

    With ``probe``, every op's floating-point outputs are also checked for NaN/Inf
    (see :mod:`gradmagic.core.diagnose.nonfinite_origin`).
    """
    recorder, variables, info = OpRecorder(model.layers), list(model.trainable_weights), {"grad_error": None}

    def probed() -> tf.Tensor | None:
        if not probe:
            return None
        info["probed"], flags = probed_ops(recorder.graph.get_operations())
        return flags

    @tf.function(autograph=False)  # as in Keras's own train step; AutoGraph only adds tracing time
    def run(x: Any, y: Any, sw: Any) -> Any:
        with tf.GradientTape() as tape:
            with recorder.recording(tape):
                y_pred = model(x, training=training)
            recorder.flush(OWNER_GLUE)
            target = _sum_of_outputs(y_pred) if loss_fn is None else loss_fn(model, x, y, y_pred, sw, training)
        info["forward_end"], info["target"] = recorder.flush(OWNER_LOSS), target
        grads = None
        if target is not None and gradients:
            try:
                sources = ([c.inputs for c in recorder.calls], [c.outputs for c in recorder.calls], variables)
                grads = dense_gradients(tape.gradient(target, sources))
            except Exception as exc:  # e.g. PreventGradient raises here; the forward analysis still stands
                info["grad_error"] = short_error(exc)
        return target, grads, probed()

    concrete = concrete_function(run, recorder, x, y, sw)
    with preserved_eagerly(model), run_once():
        value, grads, finite = concrete(x, y, sw)
    in_grads, out_grads, weight_grads = _numpy(grads) if grads is not None else ([], [], None)
    value = None if value is None else float(value)
    trace = _Trace(
        recorder, info["forward_end"], info["target"], value, in_grads, out_grads, weight_grads, info["grad_error"]
    )
    if finite is not None:
        trace.probed, trace.finite = info["probed"], finite.numpy()
    return trace


def _numpy(nested: Any) -> Any:
    return keras.tree.map_structure(lambda t: None if t is None else np.asarray(t), nested)


def _run_trace(model: keras.Model, x: Any, y: Any, sw: Any, loss_fn: LossFn | None, training: bool) -> _Trace:
    """Trace with gradients; if they fail at run time, trace the forward pass alone and say why."""
    try:
        try:
            return _trace(model, x, y, sw, loss_fn, training, gradients=True)
        except tf.errors.OpError as exc:  # e.g. the gradient of a tf.py_function whose body is NumPy
            trace = _trace(model, x, y, sw, loss_fn, training, gradients=False)
            trace.grad_error = short_error(exc)
            return trace
    except TracingFailed as failed:
        raise tracing_error(failed, model, "to explain its gradients") from None


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


def _weight_sources(recorder: OpRecorder, variables: list, notes: list[str]) -> dict[int, list[tf.Tensor]]:
    """For each variable (by id), the tensors its reads produce in the traced graph (none if that is unknown)."""
    try:
        placeholders = variable_placeholders(recorder.graph, variables)
    except MissingInternal as missing:  # the verdicts on inputs still stand; say what is lost
        notes.append(f"{missing}.")
        return {}
    return {
        key: [t for internal in found for op in internal.consumers() for t in op.outputs]
        for key, found in placeholders.items()
    }


def _unchecked_notes(layers: list[LayerPath]) -> list[str]:
    """What the installed TensorFlow could not tell about some ops, once each."""
    reasons = {info.reason for record in layers for info in record.ops if info.reason.startswith(UNCHECKED)}
    return [f"{reason.removeprefix(UNCHECKED)}." for reason in sorted(reasons)]


def _observed(trace: _Trace, calls: list[int], weight_grads: list) -> str:
    if not trace.out_grads:
        return "n/a"
    outs = [g for i in calls for g in trace.out_grads[i] if g is not None]
    float_in = [(g, t) for i in calls for g, t in zip(trace.in_grads[i], trace.recorder.calls[i].inputs, strict=True)]
    grads = [g for g, t in float_in if carries_gradient(t)] + list(weight_grads)
    present = [g for g in grads if g is not None]
    # A loss may read a tensor inside the layer rather than its output (Keras's cross-entropy takes
    # the logits under a final softmax): the gradient then reaches the layer all the same.
    if not any(np.any(g != 0) for g in outs) and not any(np.any(g != 0) for g in present):
        return "not reached"
    if not grads:
        return "n/a"
    if any(not np.all(np.isfinite(g)) for g in present):
        # Where NaN/Inf first appears going backward is where it is made (e.g. a
        # division by zero, even in the branch a tf.where did not pick).
        arrived = any(not np.all(np.isfinite(g)) for g in outs)
        return "NaN/Inf" if arrived else "NaN/Inf starts here"
    if any(np.any(g != 0) for g in present):
        return VERDICTS[FLOWS]
    return VERDICTS[ZERO] if present else VERDICTS[NONE]


def _judge_calls(layer: keras.Layer, calls: list[LayerCall], trace: _Trace, weights: dict) -> tuple[tuple, set[str]]:
    """The worst ``(level, op, reason)`` over a layer's calls (a shared layer runs several) and its on-path ops."""
    ops = trace.ops
    worst: tuple = (FLOWS + 1, None, "")
    on_path: set[str] = set()
    for call in calls:
        section = ops[call.start : call.end]
        names = {op.name for op in section}
        reads = [t for v in layer.trainable_weights for t in weights.get(id(v), []) if t.op.name in names]
        on_path.update(op.name for op in path_ops(section, call.inputs + reads, call.outputs))
        worst = min(worst, diagnose(section, call.inputs + reads, call.outputs), key=lambda v: v[0])
    return worst, on_path


def _layer_path(index: int, layer: keras.Layer, trace: _Trace, weights: dict, grads: list) -> LayerPath:
    recorder = trace.recorder
    calls = trace.calls_of.get(index, [])
    function = function_name(layer) if isinstance(layer, keras.layers.Lambda) else None
    record = LayerPath(index, layer.name, type(layer).__name__, function, len(calls), [], "not called")
    if not calls:
        record.verdict = "input" if isinstance(layer, keras.layers.InputLayer) else "not called"
        return record
    (level, op, reason), on_path = _judge_calls(layer, [recorder.calls[i] for i in calls], trace, weights)
    record.ops = _group_ops(trace.by_owner.get(index, []), on_path)
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
    return _owner(model, trace.recorder.owner[trace.position[op.name]])


def _owner(model: keras.Model, owner: int) -> tuple[int | None, str]:
    if owner >= 0:
        return owner, model.layers[owner].name
    return None, "loss" if owner == OWNER_LOSS else model_name(model)


def _has_nonfinite(trace: _Trace, grads: list | None) -> bool:
    arrays = [trace.value, *keras.tree.flatten((trace.in_grads, trace.out_grads, grads))]
    return any(a is not None and not np.all(np.isfinite(a)) for a in arrays)


def _nonfinite_origins(
    model: keras.Model,
    x: Any,
    y: Any,
    sw: Any,
    loss_fn: LossFn | None,
    training: bool,
    gradients: bool,
    notes: list[str],
) -> list[NonfiniteOrigin]:
    """Trace again with every op probed, and name the ops that made NaN/Inf from finite inputs."""
    try:
        trace = _trace(model, x, y, sw, loss_fn, training, gradients=gradients, probe=True)
    except (TracingFailed, tf.errors.OpError) as exc:  # the first trace ran, so this is rare
        notes.append(f"NaN/Inf was seen, but probing every op to find where it is made failed: {short_error(exc)}")
        return []
    owners = [_owner(model, owner) for owner in trace.recorder.owner[: trace.forward_end]]
    return nonfinite_origins(trace.probed, trace.finite, trace.forward, owners)


_DATA_ZERO = (
    "no op blocks the path: the gradient is zero for this data (e.g. inactive ReLU units, saturated activations, "
    "a zero residual)"
)


def _disconnected(model: keras.Model, trace: _Trace, grads: list | None, weights: dict) -> list[DisconnectedWeight]:
    """Weights with a None or all-zero gradient (from the graph alone when ``grads`` is None)."""
    section, sinks = trace.forward, [trace.target]
    levels = gradient_levels(section, sinks) if trace.target is not None else None
    found = []
    for i, (slot, var) in enumerate(zip(weight_slots(model), model.trainable_weights, strict=True)):
        grad, sources = None if grads is None else grads[i], weights.get(id(var), [])
        if grad is not None and np.any(grad != 0):
            continue
        level, op, reason = diagnose(section, sources, sinks, levels) if trace.target is not None else (NONE, None, "")
        if grads is None:  # no numbers (autodiff failed): report what the graph alone proves
            if level == FLOWS:
                continue
            kind = "None" if level == NONE else "zero"
        else:
            kind = "None" if grad is None else "zero"
        if op is None:
            reason = _DATA_ZERO if path_ops(section, sources, sinks) else "the weight does not reach the target at all"
        cut_index, cut_layer = _cut_owner(model, trace, op) if op is not None else (None, None)
        found.append(DisconnectedWeight(slot.layer_index, slot.layer_name, slot.name, slot.path, kind, cut_index,
                                        cut_layer, None if op is None else op.type, reason))  # fmt: skip
    return found


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
    """Explain how the gradient flows through every layer, and why a gradient is None.

    The model is traced once in a ``tf.function`` with every layer's ``call``
    wrapped, which attributes each TensorFlow op to its layer. Each op is marked
    differentiable or not (no registered gradient, integer/bool output,
    ``tf.stop_gradient``, ``tf.numpy_function``/``tf.py_function`` escapes,
    piecewise-constant ops such as ``Round``, ``Floor``, ``Sign``, ``ArgMax``),
    and the graph is walked backwards from each layer's outputs to its inputs and
    weights. The real gradients at x are computed too, in the same traced pass:
    of the loss when y is given, else of the sum of the model's outputs. The
    model is left unchanged.

    Args:
        model: A Keras 3 model (Sequential, Functional or subclassed).
        x: Inputs, as for :func:`gradmagic.weight_gradients`.
        y: Targets. Defaults to ``None``: differentiate the sum of the outputs.
        loss: The loss when y is given. Defaults to ``None``: the compiled loss.
        training: Run layers in training mode. Defaults to ``False``.
        verbose: Show a progress bar over the layers (``keras.utils.Progbar``)
            once the analysis has run for more than 2 seconds. Defaults to ``True``.
        sample_weight: Per-sample weights of the loss (needs y), as ``fit`` takes
            them. Defaults to ``None``. To look again at the step a
            :class:`gradmagic.GradientMonitor` flagged:
            ``x, y, sw = monitor.bad_batch`` then
            ``gradmagic.explain(model, x, y, sample_weight=sw)``.

    Returns:
        An :class:`Explanation`: ``.layers`` (a :class:`LayerPath` per entry of
        ``model.layers``: its ops, verdict, the op responsible, the observed
        gradient), ``.disconnected`` (weights whose gradient is None or all zero
        at x, with where the path is cut), ``.nonfinite`` (the ops that make
        NaN/Inf from finite values, with their layer and line of code, found by
        a second traced pass when NaN/Inf is seen; see
        :mod:`gradmagic.core.diagnose.nonfinite_origin`), ``to_dict()``, text and HTML tables.

    Raises:
        GradmagicError: A bad x, y or loss; or a layer that cannot be traced (a
            Lambda using Python ``if`` or NumPy on a tensor), named with the fix.

    Example:
        >>> e = gradmagic.explain(model, x)
        >>> e.blocked[0].name, e.blocked[0].op     # ('lambda', 'Round')
    """
    check_model(model)
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
    spec, x_in, batch = spec_and_inputs(model, x)
    notes, grads, loss_fn, y_in, sw_in = [data.source] if data.source else [], None, None, None, None
    if y is not None:
        check_loss_structure(model, spec.output_names, loss)
    if y is not None:  # check y and the loss before tracing, so that their mistakes get their own messages
        y_in, sw_in = prepare_loss_args(model, spec, y, sample_weight, batch)
        loss_fn = resolve_loss(model, loss)
    trace = _run_trace(model, x_in, y_in, sw_in, loss_fn, training)
    progress()
    if trace.grad_error is not None:
        notes.append(f"TensorFlow could not compute the gradient, so only the graph was analysed: {trace.grad_error}")
    if y is not None and trace.grad_error is None and trace.weight_grads is None:
        try:
            with warnings.catch_warnings():  # NaN/Inf in x or y is reported below, with its origin
                warnings.simplefilter("ignore", GradmagicWarning)
                grads = weight_gradients(
                    model, x, y, loss=loss, training=training, sample_weight=sample_weight
                ).arrays()
        except ComputeError as exc:
            notes.append(f"computing dLoss/dW failed: {exc}")
    grads = grads if grads is not None else trace.weight_grads
    weights = _weight_sources(trace.recorder, model.trainable_weights, notes)
    slots = weight_slots(model)
    layers = []
    for index, layer in enumerate(model.layers):
        own = [g for s, g in zip(slots, grads, strict=True) if s.layer_index == index] if grads is not None else []
        layers.append(_layer_path(index, layer, trace, weights, own))
        progress()
    disconnected = _disconnected(model, trace, grads, weights)
    progress.done()
    notes.extend(_unchecked_notes(layers))
    origins = []
    if _has_nonfinite(trace, grads):  # a forward pass alone when autodiff itself failed above
        origins = _nonfinite_origins(model, x_in, y_in, sw_in, loss_fn, training, trace.grad_error is None, notes)
    for backward in (False, True):  # the first op that makes NaN/Inf in each pass
        first = next((o for o in origins if o.backward == backward), None)
        if first is not None:
            notes.append(f"NaN/Inf first appears in {first.describe()}.")
    target = "sum of outputs" if loss_fn is None else "loss"
    return Explanation(model_name(model), target, trace.value, layers, disconnected, notes, origins)
