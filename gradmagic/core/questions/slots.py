"""Where each trainable weight sits in a model (framework-free: Keras objects only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WeightSlot:
    """Where one trainable weight sits in the model.

    Attributes:
        layer_index: Index of the owning layer in ``model.layers`` (-1 when the
            weight belongs to the model itself, not to a listed layer).
        layer_name: Name of the owning layer (the model's name for -1).
        path: The variable's unique ``path``.
        name: The variable's short name (``kernel``, ``bias``...).
        shape: The variable's shape.
    """

    layer_index: int
    layer_name: str
    path: str
    name: str
    shape: tuple[int, ...]


def weight_slots(model: Any) -> list[WeightSlot]:
    """Describe every trainable weight of the model, in ``trainable_weights`` order.

    A weight belongs to the first layer of ``model.layers`` that holds it, so a
    nested model listed as one layer owns all of its weights.
    """
    owner: dict[int, tuple[int, str]] = {}
    for index, lay in enumerate(model.layers):
        for var in lay.trainable_weights:
            owner.setdefault(id(var), (index, lay.name))
    slots = []
    for var in model.trainable_weights:
        index, name = owner.get(id(var), (-1, getattr(model, "name", type(model).__name__)))
        slots.append(WeightSlot(index, name, var.path, var.name, tuple(var.shape)))
    return slots
