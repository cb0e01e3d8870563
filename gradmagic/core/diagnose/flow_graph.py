"""Where a gradient stops, on a graph read from JAX's jaxpr or PyTorch's recorded ops (no framework here).

The backends (:mod:`gradmagic.core.backends.jax`, :mod:`gradmagic.core.backends.torch`)
turn one forward pass into a list of :class:`Node` in the order they ran, each
with its gradient level (what autodiff passes back from its float inputs to its
outputs) and the layer whose call created it. :func:`gradient_levels` walks them
backwards from a target, :func:`diagnose` names the node that cuts the path
between some values and others: a structural verdict that holds for any data,
as :mod:`~gradmagic.core.diagnose.op_graph` gives on TensorFlow.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from gradmagic.core.backends.flow import ALIAS, OWNER_GLUE, OWNER_LOSS, FlowGraph, Node
from gradmagic.core.diagnose.verdicts import FLOWS, NONE

__all__ = ["ALIAS", "OWNER_GLUE", "OWNER_LOSS", "FlowGraph", "Node", "diagnose", "gradient_levels", "path_nodes"]


def gradient_levels(nodes: Sequence[Node], floats: set[Hashable], sinks: Sequence[Hashable]) -> dict[Hashable, int]:
    """The best gradient level that reaches each float value backwards from ``sinks``.

    Nodes are in execution order, so walking them in reverse visits every
    consumer before its producer.
    """
    level = {s: FLOWS for s in sinks if s in floats}
    for node in reversed(nodes):
        arriving = max((level.get(v, -1) for v in node.outputs if v in floats), default=-1)
        if arriving < 0:
            continue
        passed = min(arriving, node.level)
        for v in node.inputs:
            if v in floats and passed > level.get(v, -1):
                level[v] = passed
    return level


def path_nodes(nodes: Sequence[Node], sources: Sequence[Hashable], sinks: Sequence[Hashable]) -> list[Node]:
    """The nodes on some path from a source to a sink (through values of any dtype), in order."""
    reached, forward = set(sources), set()
    for i, node in enumerate(nodes):
        if any(v in reached for v in node.inputs):
            forward.add(i)
            reached.update(node.outputs)
    needed, on_path = set(sinks), []
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        if any(v in needed for v in node.outputs):
            needed.update(node.inputs)
            if i in forward:
                on_path.append(node)
    return on_path[::-1]


def _blame_rank(node: Node) -> int:
    """Prefer explicit stops and piecewise-constant ops over casts, and casts over comparisons (a mask)."""
    if "cast" in node.reason or "integer" in node.reason:
        return 1 if "cast" in node.reason else 2
    return 0


def diagnose(
    nodes: Sequence[Node],
    floats: set[Hashable],
    sources: Sequence[Hashable],
    sinks: Sequence[Hashable],
    levels: dict[Hashable, int] | None = None,
) -> tuple[int, Node | None, str]:
    """``(level, blocking node or None, reason)`` of the gradient from ``sinks`` back to ``sources``.

    ``levels`` is :func:`gradient_levels` of the same nodes and sinks, when
    several sources are diagnosed against them (it does not depend on the sources).
    """
    float_sources = [v for v in sources if v in floats]
    levels = gradient_levels(nodes, floats, sinks) if levels is None else levels
    level = max((levels.get(v, NONE) for v in float_sources), default=NONE)
    if level == FLOWS:
        return FLOWS, None, ""
    # Only paths from float sources: a bool mask or integer ids beside them block nothing.
    blockers = [n for n in path_nodes(nodes, float_sources, sinks) if n.level < FLOWS]
    # Blame a node of the kind that decided the level: a sign for "zero", a stop rather than a sign for "none".
    blockers = [n for n in blockers if n.level == level] or blockers
    if not blockers:
        return level, None, "" if float_sources else "no float inputs or trainable weights to pass a gradient to"
    order = {id(n): i for i, n in enumerate(nodes)}
    node = min(blockers, key=lambda n: (_blame_rank(n), order[id(n)]))
    return level, node, node.reason
