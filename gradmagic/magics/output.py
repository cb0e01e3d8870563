"""Show ``%gradients`` results: the list of per-layer results, arrays, extras after the cell, layer summary.

No gradient math here: everything shown was computed by the core.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from IPython.display import display

from gradmagic.plots import NormChart

#: Arrays with more entries than this are summarised (``...``) by ``--full``.
FULL_ARRAY_LIMIT = 10_000


class ResultList(list):
    """The results of several ``--layer`` values: one core result per layer, in order.

    Each element is exactly what the core returns for that one layer (for
    example ``gradmagic.weight_gradients(model, x, y, layer=1)``); the list only
    adds a display that shows their tables one after the other.
    """

    def _repr_html_(self) -> str:
        return "".join(result._repr_html_() for result in self)

    def __repr__(self) -> str:
        return "\n\n".join(repr(result) for result in self)


def _results(result: Any) -> list[Any]:
    return list(result) if isinstance(result, ResultList) else [result]


def extras_for(result: Any, args: Any) -> list[Any]:
    """What --full and --plot add under the table, built now so that errors surface in the magic."""
    extras: list[Any] = []
    if args.full:
        extras.append(ArraysView(_results(result)))
    if args.plot:
        extras.append(NormChart(_results(result)))
    return extras


def show_after_cell(shell: Any, objects: list[Any]) -> None:
    """Display objects once the running cell has finished, i.e. under its ``Out``.

    The returned result is displayed by IPython after the magic returns, so extras
    displayed now would land above it. Deferring to ``post_execute`` is what
    matplotlib's inline backend does with figures. Outside a cell (a direct
    ``run_line_magic`` call) they are displayed at once.
    """
    if not objects:
        return
    if getattr(shell.displayhook, "exec_result", None) is None:
        display(*objects)
        return

    def show() -> None:
        shell.events.unregister("post_execute", show)
        display(*objects)

    shell.events.register("post_execute", show)


class ArraysView:
    """The gradient arrays of some results, for ``--full`` (HTML and text)."""

    def __init__(self, results: Sequence[Any]) -> None:
        self.results = list(results)

    def _blocks(self) -> list[tuple[str, list[tuple[str, str]]]]:
        import numpy as np

        blocks = []
        with np.printoptions(threshold=FULL_ARRAY_LIMIT, linewidth=110):
            for result in self.results:
                items = []
                for row in result.rows:
                    label = " / ".join(str(v) for k, v in row.labels.items() if k != "path")
                    text = "disconnected (no gradient path)" if row.array is None else np.array2string(row.array)
                    items.append((label, text))
                blocks.append((result.title, items))
        return blocks

    def _repr_html_(self) -> str:
        import html

        parts = []
        for title, items in self._blocks():
            parts.append(f"<div class='gradmagic-arrays'><b>{html.escape(title)}</b>")
            for label, text in items:
                parts.append(f"<div><i>{html.escape(label)}</i><pre>{html.escape(text)}</pre></div>")
            parts.append("</div>")
        return "".join(parts)

    def __repr__(self) -> str:
        lines = []
        for title, items in self._blocks():
            lines.append(title)
            for label, text in items:
                lines += [f"{label}:", text]
        return "\n".join(lines)


# --- layer summary ------------------------------------------------------------------------------------------------


def layer_summary(model: Any) -> list[dict[str, Any]]:
    """Describe each layer of ``model.layers`` (the indices ``--layer`` takes).

    Args:
        model: A Keras model.

    Returns:
        One dict per layer: ``index``, ``name``, ``type``, ``output shape``
        (``"?"`` when the layer was never called in a graph, e.g. inside a
        subclassed model), ``trainable weights`` (number of tensors) and
        ``params`` (number of trainable scalars).
    """
    rows = []
    for index, layer in enumerate(model.layers):
        weights = list(layer.trainable_weights)
        rows.append(
            {
                "index": index,
                "name": layer.name,
                "type": type(layer).__name__,
                "output shape": _output_shape(layer),
                "trainable weights": len(weights),
                "params": sum(math.prod(tuple(w.shape)) for w in weights),
            }
        )
    return rows


def _output_shape(layer: Any) -> str:
    try:
        shape = tuple(layer.output.shape)
    except (AttributeError, ValueError, RuntimeError):
        # Subclassed models' inner layers and unbuilt models have no symbolic output.
        return "?"
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def format_layer_summary(model: Any, rows: list[dict[str, Any]], token: str = "model") -> str:
    """Format :func:`layer_summary` rows as a text table with example lines.

    Args:
        model: The model (for its name and type).
        rows: What :func:`layer_summary` returned.
        token: How the user wrote the model, for the examples. Defaults to ``"model"``.
    """
    count = f"{len(rows)} layer" + ("" if len(rows) == 1 else "s")
    header = f"Model '{model.name}' ({type(model).__name__}), {count}. --layer takes an index or a name:"
    if not getattr(model, "built", True):
        # Weights and shapes appear only once the model has run; gradmagic builds it from X.
        header += "\n(not built yet: weights and shapes show once it has run on data; %gradients builds it from X)"
    if not rows:
        return header + "\n(no layers)"
    # Imported here: the magics load without TensorFlow, and a model to list means it is loaded already.
    from gradmagic.core import text_table

    columns = list(rows[0])
    lines = [text_table(header, columns, [[row[c] for c in columns] for row in rows])]
    with_weights = [row for row in rows if row["trainable weights"]]
    example = with_weights[-1]["index"] if with_weights else rows[-1]["index"]
    examples = [
        (f"%gradients {token} x y", "dLoss/dW of every layer"),
        (f"%gradients {token} x y --layer {example}", "dLoss/dW of one layer with trainable weights"),
        (f"%gradients {token} x y --wrt output --layer {rows[-1]['index']}", "dLoss/d(output of a layer)"),
        (f"%gradients {token} x --wrt input", "d(model output)/d(x), per sample"),
        (f"%gradients {token} x --explain", "where a gradient stops, and which op stops it"),
        (f"%gradients {token} x y --check", "autodiff against finite differences"),
    ]
    width = max(len(line) for line, _ in examples)
    lines += ["", *(f"{line.ljust(width)}  # {what}" for line, what in examples)]
    return "\n".join(lines)
