"""Where NaN/Inf is made: the ops of one forward and backward pass that turn finite inputs into NaN/Inf.

A traced pass is probed op by op (every floating-point output checked with
``is_finite``); an op whose output holds NaN/Inf while all its inputs are
finite is where such values are *made*, in contrast with the ops that only pass
them on. This names the op where ``tf.debugging.check_numerics`` would stop, but
for the forward and the backward pass both, and without a global switch: a
division by zero that a ``tf.where`` hides from the loss still shows up, in the
forward pass (its Inf) and in the backward pass (the NaN its gradient makes).

Limits: constants are not origins (a ``-inf`` mask is written on purpose), and
the bodies of ``tf.cond``, ``tf.while_loop`` and nested ``tf.function`` calls
are not probed: such an op is reported as the control-flow op around it.
"""

from __future__ import annotations

import linecache
import os
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from gradmagic.core.backends.tensorflow import differentiated_scope
from gradmagic.core.diagnose.origin import NonfiniteOrigin

__all__ = ["NonfiniteOrigin", "nonfinite_origins", "probed_ops"]

_LIBRARIES = tuple(f"{os.sep}{name}{os.sep}" for name in ("tensorflow", "keras", "tf_keras"))
_OWN = f"{os.sep}gradmagic{os.sep}"
_UNKNOWN = (None, "unknown")


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
    forward = _ForwardOps(forward_ops, finite_by_name)
    found = []
    for op, ok in zip(probed, finite, strict=True):
        if ok or op.type == "Const" or not all(finite_by_name.get(t.op.name, True) for t in op.inputs):
            continue  # finite, written on purpose, or NaN/Inf passed on from an input
        backward = op.name not in forward.index
        made_by = forward.differentiated_by(op) if backward else forward.index[op.name]
        index, layer = owner_of[made_by] if made_by is not None else _UNKNOWN
        source = _user_source(forward_ops[made_by]) if made_by is not None else None
        found.append(NonfiniteOrigin(op.type, op.name, index, layer, backward, source))
    return found


class _ForwardOps:
    """The forward ops by name and by name scope, to find the op a gradient op differentiates."""

    def __init__(self, ops: Sequence[tf.Operation], finite_by_name: dict[str, bool]) -> None:
        self.ops = list(ops)
        self.index = {op.name: i for i, op in enumerate(self.ops)}
        self.finite_by_name = finite_by_name
        self.in_scope: dict[str, list[int]] = defaultdict(list)
        for i, op in enumerate(self.ops):
            parts = op.name.split("/")
            for end in range(1, len(parts)):
                self.in_scope["/".join(parts[:end])].append(i)

    def differentiated_by(self, op: tf.Operation) -> int | None:
        """The forward op that ``op`` (a gradient op) belongs to, or None.

        TensorFlow puts the gradient of op ``a/b/c`` in a scope named after
        ``a/b/c`` or ``a/b`` (see
        :func:`~gradmagic.core.backends.tensorflow.differentiated_scope`). Take
        the op named by the longest such scope; in a scope that only holds
        forward ops, the one whose output the gradient op reads (e.g.
        ``SqrtGrad`` reads the ``Sqrt`` it differentiates), else the one with
        NaN/Inf. A gradient op outside the tape's scope (a sum of the gradients
        of a tensor used twice) is not attributed.
        """
        scope = differentiated_scope(op.name)
        if scope is None:
            return None
        parts = scope.split("/")
        for end in range(len(parts), 0, -1):
            scope = "/".join(parts[:end])
            if scope in self.index:
                return self.index[scope]
            inside = set(self.in_scope.get(scope, ()))
            if inside:
                read = sorted(self.index[t.op.name] for t in op.inputs if self.index.get(t.op.name) in inside)
                bad = [i for i in sorted(inside) if not self.finite_by_name.get(self.ops[i].name, True)]
                return (read or bad or [None])[0]
        return None


def _user_source(op: tf.Operation) -> str | None:
    """The line of user code that created ``op``: the innermost frame outside TensorFlow and Keras.

    Ops that gradmagic's own tracing reaches first (a built-in layer's ``call``)
    have no such line: the user's code there is only the call of gradmagic.
    """
    for frame in reversed(list(op.traceback)):
        if _OWN in frame.filename:
            return None
        if not any(part in frame.filename for part in _LIBRARIES):
            # linecache also knows IPython's cells, whose "files" exist only in the kernel.
            code = linecache.getline(frame.filename, frame.lineno).strip()
            code = f": {code}" if code else ""
            return f"{os.path.basename(frame.filename)}:{frame.lineno} ({frame.name}){code}"
    return None
