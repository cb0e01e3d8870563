"""How results and messages name a model's inputs and outputs.

Inputs are named after their ``InputLayer`` where the model declares them
(``"pixels"``), else by position (``"x"``, ``"x[1]"``) or, for x given as a
dict, by its keys. Outputs are named by the keys of a dict output (in
``keras.tree.flatten`` order, i.e. sorted) or by ``model.output_names``; where
no name fits, by position (``"output 1"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras


def positional_names(count: int, stem: str = "x") -> list[str]:
    """``["x"]`` for one leaf, ``["x[0]", "x[1]", ...]`` for several."""
    return [stem] if count == 1 else [f"{stem}[{i}]" for i in range(count)]


def declared_input_names(model: keras.Model, flat_inputs: Sequence[Any]) -> list[str]:
    """Names of the model's declared input tensors: their ``InputLayer``'s name, else by position.

    Args:
        model: The model.
        flat_inputs: ``model.inputs``, flattened.
    """
    by_tensor = {id(lay.output): lay.name for lay in model.layers if isinstance(lay, keras.layers.InputLayer)}
    return [by_tensor.get(id(t), auto) for t, auto in zip(flat_inputs, positional_names(len(flat_inputs)))]


def input_labels(declared: Sequence[str] | None, x: Any) -> list[str]:
    """Labels of the leaves of x (in ``keras.tree.flatten`` order).

    Args:
        declared: The model's declared input names (see
            :func:`declared_input_names`), or ``None`` when it declares none.
        x: The inputs as given (after conversion): a leaf, list or dict.

    Returns:
        The declared names when they match the leaves one to one; else a dict's
        sorted keys; else names by position.
    """
    count = len(keras.tree.flatten(x))
    if declared is not None and len(declared) == count:
        return list(declared)
    if isinstance(x, dict):
        return sorted(x)
    return positional_names(count)


def output_names(model: keras.Model, structure: Any = None) -> list[str]:
    """Names of the model's outputs in ``keras.tree.flatten`` order.

    Args:
        model: The model.
        structure: The model's output structure (symbolic or computed), if
            known: a dict output is named by its keys.
    """
    if isinstance(structure, dict):
        return [str(k) for k in sorted(structure)]
    return [str(n) for n in (getattr(model, "output_names", None) or [])]


def output_labels(names: Sequence[str], count: int) -> list[str]:
    """``names`` when there is one per output, else ``"output 0"``, ``"output 1"``, ..."""
    return list(names) if len(names) == count else [f"output {i}" for i in range(count)]
