"""Which TensorFlow ops pass a gradient back, and where along a graph path it stops.

:func:`op_gradient` classifies one op (differentiable, piecewise constant,
integer-valued, an explicit stop, an escape to Python). :func:`diagnose` walks
a slice of a traced graph backwards from some tensors to others and names the op
that cuts the path. Both hold for any data: they read the graph, not numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from gradmagic.core.backends.tensorflow import MissingInternal, is_custom_gradient, registered_gradient
from gradmagic.core.diagnose.verdicts import FLOWS, NONE, UNCHECKED, VERDICTS, ZERO

__all__ = [
    "FLOWS",
    "NONE",
    "UNCHECKED",
    "VERDICTS",
    "ZERO",
    "carries_gradient",
    "diagnose",
    "gradient_levels",
    "op_gradient",
    "path_ops",
]


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


def carries_gradient(tensor: tf.Tensor) -> bool:
    """True for float and complex tensors, the only ones a gradient can flow through."""
    return tensor.dtype.is_floating or tensor.dtype.is_complex


def _may_carry(tensor: tf.Tensor) -> bool:
    """Float and complex tensors, and variants: a TensorList (how RNN loops hold their steps) carries floats."""
    return carries_gradient(tensor) or tensor.dtype == tf.variant


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
    if not any(_may_carry(t) for t in op.outputs):
        dtype = op.outputs[0].dtype.name
        what = f"cast to {dtype}" if op.type == "Cast" else f"{dtype} output"
        return NONE, f"{what}: integer and bool tensors carry no gradient"
    if op.type == "Cast" and not carries_gradient(op.inputs[0]):
        return NONE, f"cast from {op.inputs[0].dtype.name}: integer and bool tensors carry no gradient"
    try:
        function = registered_gradient(op)
    except LookupError:
        return NONE, f"no gradient is registered for op type {op.type}"
    except MissingInternal as missing:  # a TensorFlow that no longer tells: assume the gradient flows, and say so
        return FLOWS, f"{UNCHECKED}{missing}"
    if function is None:
        return NONE, f"{op.type} is registered as not differentiable"
    return FLOWS, "custom gradient" if is_custom_gradient(op) else ""


def path_ops(section: Sequence[tf.Operation], sources: list, sinks: list) -> list[tf.Operation]:
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


def gradient_levels(section: Sequence[tf.Operation], sinks: list) -> dict[str, int]:
    """The best gradient level that reaches each tensor backwards from ``sinks``.

    Graph ops are created in topological order, so walking them in reverse visits
    every consumer before its producer.
    """
    level = {t.name: FLOWS for t in sinks if _may_carry(t)}
    for op in reversed(section):
        arriving = max((level.get(t.name, -1) for t in op.outputs if _may_carry(t)), default=-1)
        passed = min(arriving, op_gradient(op)[0])
        for t in op.inputs if arriving >= 0 else ():
            if _may_carry(t) and passed > level.get(t.name, -1):
                level[t.name] = passed
    return level


def _blame_rank(op: tf.Operation, reason: str) -> int:
    """Prefer ops that cut a float path (Round, casts) over comparisons feeding e.g. a tf.where."""
    if op.type in _EXPLICIT or op.type in _PIECEWISE_CONSTANT or op.type == "Sign":
        return 0
    return 1 if "cast" in reason else 2


def diagnose(
    section: Sequence[tf.Operation], sources: list, sinks: list, levels: dict[str, int] | None = None
) -> tuple[int, tf.Operation | None, str]:
    """``(level, blocking op or None, reason)`` of the gradient from ``sinks`` back to ``sources``.

    ``levels`` is :func:`gradient_levels` of the same section and sinks, when
    several sources are diagnosed against them (it does not depend on the sources).
    """
    float_sources = [t for t in sources if carries_gradient(t)]
    levels = gradient_levels(section, sinks) if levels is None else levels
    level = max((levels.get(t.name, NONE) for t in float_sources), default=NONE)
    if level == FLOWS:
        return FLOWS, None, ""
    # Only paths from float sources: a bool mask or integer ids beside them block nothing.
    blockers = [(op, *op_gradient(op)) for op in path_ops(section, float_sources, sinks)]
    blockers = [b for b in blockers if b[1] < FLOWS]
    # Blame an op of the kind that decided the level: a Sign for "zero", a Round rather than a Sign for "none".
    blockers = [b for b in blockers if b[1] == level] or blockers
    if not blockers:
        return level, None, "" if float_sources else "no float inputs or trainable weights to pass a gradient to"
    position = {op.name: i for i, op in enumerate(section)}
    op, _, why = min(blockers, key=lambda b: (_blame_rank(b[0], b[2]), position[b[0].name]))
    return level, op, why
