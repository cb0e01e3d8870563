"""Where NaN/Inf is made: the ops of one forward and backward pass that turn finite inputs into NaN/Inf.

A traced pass is probed op by op (every floating-point output checked with
``is_finite``); an op whose output holds NaN/Inf while all its inputs are
finite is where such values are *made*, in contrast with the ops that only pass
them on. This names the op where ``tf.debugging.check_numerics`` would stop, but
for the forward and the backward pass both, and without a global switch: a
division by zero that a ``tf.where`` hides from the loss still shows up, in the
forward pass (its Inf) and in the backward pass (the NaN its gradient makes).
"""

from __future__ import annotations

import linecache
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

_GRADIENT_SCOPE = "gradient_tape/"
# Frames of these packages are plumbing; the user code that created an op is the last other frame.
_LIBRARY_PARTS = tuple(f"{os.sep}{name}{os.sep}" for name in ("tensorflow", "keras", "gradmagic", "tf_keras"))


@dataclass(frozen=True)
class NonfiniteOrigin:
    """An op that made NaN/Inf from finite inputs.

    Attributes:
        op_type: The TensorFlow op type, e.g. ``"RealDiv"`` or ``"Log"``.
        op_name: Its name in the traced graph.
        layer_index: Index in ``model.layers`` of the layer whose call created the
            op (for a backward op: the forward op it differentiates), or None.
        layer: That layer's name; ``"loss"`` for the loss, the model's name for
            plumbing between layers.
        backward: Whether the op belongs to the backward pass (a gradient op).
        source: ``"file:line (function): code"`` of the user code that created
            the op (for a backward op: the forward op it differentiates), when it
            can be told apart from library code.
    """

    op_type: str
    op_name: str
    layer_index: int | None
    layer: str
    backward: bool
    source: str | None

    def describe(self) -> str:
        """One sentence: which op, in which layer, in which pass, from which line."""
        text = f"{self.op_type} ({self.op_name}) in layer {self.layer!r}, "
        if not self.backward:
            return text + "forward pass" + (f", created at {self.source}" if self.source else "")
        return text + "backward pass" + (f", differentiating the op created at {self.source}" if self.source else "")


def probed_ops(ops: Sequence[tf.Operation]) -> tuple[list[tf.Operation], tf.Tensor | None]:
    """The ops with floating-point outputs, and one bool per op: all its outputs finite (call while tracing)."""
    probed, flags = [], []
    for op in ops:
        outputs = [t for t in op.outputs if t.dtype.is_floating]
        if outputs:
            probed.append(op)
            flags.append(tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(t)) for t in outputs])))
    return probed, tf.stack(flags) if flags else None


def nonfinite_origins(
    probed: Sequence[tf.Operation],
    finite: np.ndarray,
    forward_ops: Sequence[tf.Operation],
    owner_of: Sequence[tuple[int | None, str]],
) -> list[NonfiniteOrigin]:
    """The probed ops that made NaN/Inf from finite inputs, in the order they were created.

    Args:
        probed: Ops checked by :func:`probed_ops`, in creation order.
        finite: Its flags, evaluated.
        forward_ops: The forward pass's ops (the graph's first ops), in creation order.
        owner_of: ``(layer index or None, layer name)`` of each forward op.
    """
    finite_by_name = {op.name: bool(ok) for op, ok in zip(probed, finite, strict=True)}
    forward_index = {op.name: i for i, op in enumerate(forward_ops)}
    found = []
    for op, ok in zip(probed, finite, strict=True):
        if ok or not all(finite_by_name.get(t.op.name, True) for t in op.inputs):
            continue  # finite, or NaN/Inf passed on from an input
        backward = op.name not in forward_index
        made_by = _forward_op(op.name, forward_ops, finite_by_name) if backward else forward_index[op.name]
        index, layer = owner_of[made_by] if made_by is not None else (None, "loss")
        source = _user_source(forward_ops[made_by] if made_by is not None else op)
        found.append(NonfiniteOrigin(op.type, op.name, index, layer, backward, source))
    return found


def _forward_op(name: str, forward_ops: Sequence[tf.Operation], finite_by_name: dict[str, bool]) -> int | None:
    """The forward op a gradient op differentiates, from its name scope.

    TensorFlow puts the gradient of op ``a/b/c`` under ``gradient_tape/a/b/c/``
    or ``gradient_tape/a/b/``. In the longest scope that holds forward ops, the
    op itself is taken if named, else the first with NaN/Inf, else the first.
    """
    parts = name.removeprefix(_GRADIENT_SCOPE).split("/")
    for end in range(len(parts), 0, -1):
        scope = "/".join(parts[:end])
        inside = [i for i, op in enumerate(forward_ops) if op.name == scope or op.name.startswith(scope + "/")]
        exact = [i for i in inside if forward_ops[i].name == scope]
        bad = [i for i in inside if not finite_by_name.get(forward_ops[i].name, True)]
        if inside:
            return (exact or bad or inside)[0]
    return None


def _user_source(op: tf.Operation) -> str | None:
    for frame in reversed(list(op.traceback)):
        if not any(part in frame.filename for part in _LIBRARY_PARTS):
            # linecache also knows IPython's cells, whose "files" exist only in the kernel.
            code = linecache.getline(frame.filename, frame.lineno).strip()
            code = f": {code}" if code else ""
            return f"{os.path.basename(frame.filename)}:{frame.lineno} ({frame.name}){code}"
    return None
