"""What the JAX and PyTorch graph readers return: a recorded forward pass as nodes (no framework here).

:mod:`gradmagic.core.backends.jax` (from the jaxpr) and
:mod:`gradmagic.core.backends.torch` (from the ops one eager pass runs) describe
one forward pass as :class:`Node`\\s with a gradient level each;
:mod:`gradmagic.core.diagnose.flow_graph` walks them.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

#: Gradient levels, ordered: a path is as good as its worst op.
NONE, ZERO, FLOWS = 0, 1, 2
#: Starts the reason of an op that could not be classified (the framework lacks what tells).
UNCHECKED = "not checked: "

#: Owners of nodes outside every layer: between layers (the model's own call) and the loss.
OWNER_GLUE, OWNER_LOSS = -1, -2
#: The kind of a node that only renames a value (a nested function's input or output): never shown.
ALIAS = "="


@dataclass
class Node:
    """One op of a recorded forward pass.

    Attributes:
        kind: The op: a jaxpr primitive (``dot_general``) or a torch function (``matmul``).
        inputs, outputs: Ids of the values it reads and writes (any hashable, unique per value).
        level: What autodiff passes back from its float inputs to its outputs
            (:data:`FLOWS`, :data:`ZERO` or :data:`NONE`).
        reason: Why less than ``FLOWS`` (or a note, e.g. "custom gradient").
        owner: Index in ``model.layers`` of the layer whose call created it, or
            :data:`OWNER_GLUE` / :data:`OWNER_LOSS`.
        call: Which call of that layer (a shared layer runs several), ``-1`` outside layers.
        source: ``"file:line (function): code"`` of the user code that created it, if known.
    """

    kind: str
    inputs: list[Hashable]
    outputs: list[Hashable]
    level: int = FLOWS
    reason: str = ""
    owner: int = OWNER_GLUE
    call: int = -1
    source: str | None = None


@dataclass
class FlowGraph:
    """A recorded forward pass: nodes in the order they ran, and which values can carry a gradient.

    Attributes:
        nodes: In execution order (every producer before its consumers).
        floats: Ids of the values that can carry a gradient (floating point).
        weights: The id standing for each trainable weight, aligned with ``model.trainable_weights``.
        inputs: The ids of the float leaves of x, in flatten order.
        target: The id of the differentiated scalar (``None`` when no float output exists).
        calls: Per layer index, per call: ``(input ids, output ids)``.
        arguments: The ids of every argument leaf of the traced function (weights, inputs, perturbations):
            with the nodes' outputs, the values a gradient can come from (not constants).
    """

    nodes: list[Node]
    floats: set[Hashable]
    weights: list[Hashable]
    inputs: list[Hashable]
    target: Hashable | None
    calls: dict[int, list[tuple[list[Hashable], list[Hashable]]]] = field(default_factory=dict)
    arguments: set[Hashable] = field(default_factory=set)

    def layer_nodes(self, index: int, call: int | None = None, aliases: bool = False) -> list[Node]:
        """The nodes one layer's call created (every call's when ``call`` is None); aliases only if asked."""
        return [
            n
            for n in self.nodes
            if n.owner == index and (call is None or n.call == call) and (aliases or n.kind != ALIAS)
        ]
