"""Where NaN/Inf is made, as a result: one op that turned finite inputs into NaN/Inf (every backend)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NonfiniteOrigin:
    """An op that made NaN/Inf from finite inputs (or an input or weight that holds them already).

    Attributes:
        op_type: The framework's op type: on TensorFlow e.g. ``"RealDiv"`` or
            ``"Log"``, ``"Placeholder"`` for an input, ``"ReadVariableOp"`` for a
            weight; on JAX the jaxpr primitive (``"div"``, ``"log"``); on
            PyTorch the torch function (``"div"``, ``"log"``).
        op_name: Its name in the traced graph.
        layer_index: Index in ``model.layers`` of the layer whose call created the
            op (for a backward op: the forward op it differentiates), or None.
        layer: That layer's name; ``"loss"`` for the loss, the model's name for
            ops between layers, ``"unknown"`` for a backward op that could not be
            traced back to a forward op.
        backward: Whether the op belongs to the backward pass (a gradient op).
        source: ``"file:line (function): code"`` of the user code that created
            the op (for a backward op: the forward op it differentiates), when a
            line of user code did (not for a built-in layer's own ops).
    """

    op_type: str
    op_name: str
    layer_index: int | None
    layer: str
    backward: bool
    source: str | None

    def describe(self) -> str:
        """One sentence: which op, in which layer, in which pass, from which line."""
        if self.op_type in ("Placeholder", "input"):
            return f"the input {self.op_name!r} (it holds NaN/Inf already)"
        if self.op_type in ("ReadVariableOp", "weight"):
            return f"a weight of layer {self.layer!r} (it holds NaN/Inf already: {self.op_name})"
        text = f"{self.op_type} ({self.op_name}) in layer {self.layer!r}, "
        if not self.backward:
            return text + "forward pass" + (f", created at {self.source}" if self.source else "")
        return text + "backward pass" + (f", differentiating the op created at {self.source}" if self.source else "")
