"""The result of :func:`gradmagic.explain`: per-layer gradient paths, disconnected weights, tables."""

from __future__ import annotations

import html
from dataclasses import dataclass, field, fields
from typing import Any

from gradmagic.core.diagnose.origin import NonfiniteOrigin
from gradmagic.core.diagnose.verdicts import FLOWS, NONE, VERDICTS, ZERO
from gradmagic.core.display import html_notes, html_table, row_state, text_notes, text_table
from gradmagic.errors import LayerError


@dataclass(frozen=True)
class OpInfo:
    """The ops of one type that a layer's call recorded.

    Attributes:
        type: The op type (TensorFlow: ``MatMul``, ``Round``; JAX: the primitive,
            ``dot_general``, ``round``; PyTorch: the torch function, ``matmul``, ``round``).
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


@dataclass(eq=False)
class Explanation:
    """The gradient-path report of one model at one input, from :func:`explain`.

    Attributes:
        model: The model's name.
        target: What was differentiated: ``"loss"`` or ``"sum of outputs"``.
        value: Its value at x (``None`` if it could not be computed).
        layers: One :class:`LayerPath` per entry of ``model.layers``.
        disconnected: The :class:`DisconnectedWeight` entries.
        notes: Anything that limited the analysis (e.g. autodiff itself failed),
            and where NaN/Inf is made, if anywhere.
        nonfinite: The ops that make NaN/Inf from finite inputs, forward pass first
            (:class:`~gradmagic.core.diagnose.nonfinite_origin.NonfiniteOrigin`); empty when
            every value is finite.
    """

    model: str
    target: str
    value: float | None
    layers: list[LayerPath]
    disconnected: list[DisconnectedWeight] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nonfinite: list[NonfiniteOrigin] = field(default_factory=list)

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
        """``{"layers": columns, "disconnected": columns, "nonfinite": columns, "target", "value", "notes"}``.

        Both tables are dicts of equal-length lists: ``pandas.DataFrame(e.to_dict()["layers"])``.
        """
        rows = [self._row(r) for r in self.layers]
        layers = {name: [row[i] for row in rows] for i, name in enumerate(_COLUMNS)}
        disconnected = {f.name: [getattr(d, f.name) for d in self.disconnected] for f in fields(DisconnectedWeight)}
        nonfinite = {f.name: [getattr(o, f.name) for o in self.nonfinite] for f in fields(NonfiniteOrigin)}
        return {"layers": layers, "disconnected": disconnected, "nonfinite": nonfinite, "target": self.target,
                "value": self.value, "notes": list(self.notes)}  # fmt: skip

    def _title(self) -> str:
        value = "" if self.value is None else f" = {self.value:.6g}"
        return f"Gradient paths of model '{self.model}' (differentiating the {self.target}{value})"

    def __repr__(self) -> str:
        lines = [text_table(self._title(), _COLUMNS, [self._row(r) for r in self.layers])]
        if self.disconnected:
            lines += ["Disconnected weights (gradient None or all zero at x):"]
            lines += [f"  {d.describe()}" for d in self.disconnected]
        return "\n".join(lines + text_notes(self.notes))

    def _repr_html_(self) -> str:
        states = [row_state(r.verdict) for r in self.layers]
        parts = [html_table(self._title(), _COLUMNS, [self._row(r) for r in self.layers], states)]
        if self.disconnected:
            items = "".join(f"<li>{html.escape(d.describe())}</li>" for d in self.disconnected)
            parts.append(f"<p>Disconnected weights (gradient None or all zero at x):</p><ul>{items}</ul>")
        return "".join(parts) + html_notes(self.notes)
