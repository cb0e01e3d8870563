"""Read a gradient without changing how the optimizer's update of it is compiled.

TensorFlow's graph optimizer (grappler) rewrites chains of cheap element-wise
ops only where each intermediate result has a single consumer: e.g. the SGD
update ``lr * g`` of a BatchNormalization gamma, where ``g = a * rsqrt(var)``,
is reassociated into ``(lr * a) * rsqrt(var)`` (or similar), which rounds
differently. A monitor that reads ``g`` gives it a second consumer, the rewrite
no longer applies, and the trained weights differ from plain training by an
ulp, then more with every step.

So where a gradient has a single consumer (looking through Keras's ``Identity``
ops) and is made by a short chain of element-wise ops, the monitor does not read
it: it *replays* that chain from the chain's inputs inside a function that is
not inlined (so that grappler cannot merge the copy back into the original), and
reads the copy. The chain's inputs are tensors with other consumers already,
which no such rewrite may fold. The copy is the gradient as the model's math
defines it (the same kernels on the same values); only the applied update is
left to be optimized exactly as without the monitor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from gradmagic.core.backends import tensorflow as backend

#: Element-wise (or reshaping) ops grappler's arithmetic optimizer may fold into a consumer.
_REPLAYED = frozenset({"Mul", "AddV2", "Add", "Sub", "Neg", "AddN", "RealDiv", "Reshape", "Cast"})
_MAX_OPS = 8
_IDENTITIES = ("Identity", "IdentityN")


def real_consumers(tensor: tf.Tensor, depth: int = 4) -> list[Any]:
    """Ops that read ``tensor``, looking through ``Identity``/``IdentityN`` (which grappler removes)."""
    found: dict[str, Any] = {}  # by name: an op reached twice (e.g. via two IdentityN) counts once
    for op in tensor.consumers():
        if op.type in _IDENTITIES and depth:
            for index, t in enumerate(op.inputs):
                if t is tensor:
                    found.update((o.name, o) for o in real_consumers(op.outputs[index], depth - 1))
        else:
            found[op.name] = op
    return list(found.values())


class _Plan:
    """A chain of ops to replay: ``ops`` in execution order, ``leaves`` its outside inputs."""

    def __init__(self) -> None:
        self.ops: list[Any] = []
        self.leaves: list[tf.Tensor] = []

    def visit(self, tensor: tf.Tensor, root: bool) -> bool:
        op = tensor.op
        replay = op.type in _REPLAYED and len(op.outputs) == 1 and len(self.ops) < _MAX_OPS
        if replay and not root:
            replay = len(real_consumers(tensor)) == 1  # its only consumer is the op being replayed
        if not replay:
            if not any(t is tensor for t in self.leaves):
                self.leaves.append(tensor)
            return False
        for t in op.inputs:
            self.visit(t, root=False)
        if op not in self.ops:
            self.ops.append(op)
        return True


def readable(grads: Sequence[Any], before_update: bool = False) -> list[Any]:
    """The gradients to read the statistics from: each one, or its replayed copy (see module doc).

    Call while the train step is traced, after the optimizer's ops are built (so
    that consumer counts are those of the plain step), or before them with
    ``before_update``: the optimizer's consumers are then unknown, and every
    gradient made by a replayable op is replayed (a copy is never wrong, only a
    few element-wise ops more).

    Args:
        grads: The gradients (tensors, or anything else, passed through).
        before_update: Whether the optimizer's ops are not built yet. Defaults to False.
    """
    out = list(grads)
    copy = backend.op_copier()
    if copy is None:
        return out  # this TensorFlow cannot copy ops: read the gradients themselves
    plans: dict[int, _Plan] = {}
    for i, g in enumerate(grads):
        if not isinstance(g, tf.Tensor) or tf.executing_eagerly() or not hasattr(g, "op"):
            continue
        if not before_update and len(real_consumers(g)) != 1:
            continue
        plan = _Plan()
        if plan.visit(g, root=True):
            plans[i] = plan
    if not plans:
        return out
    order = list(plans)
    leaves = [t for i in order for t in plans[i].leaves]
    specs = [tf.TensorSpec(t.shape, t.dtype) for t in leaves]

    def body(*values: tf.Tensor) -> list[tf.Tensor]:
        results = []
        given = iter(values)
        for i in order:
            plan = plans[i]
            known = {id(t): next(given) for t in plan.leaves}
            for op in plan.ops:
                value = copy(op, [known[id(t)] for t in op.inputs])
                known[id(op.outputs[0])] = value
            results.append(known[id(grads[i])])
        return results

    # Not inlined: a copy inlined next to the original would be merged into it again.
    function = backend.not_inlined_function(body, specs)
    for i, value in zip(order, function(*leaves), strict=True):
        out[i] = value
    return out
