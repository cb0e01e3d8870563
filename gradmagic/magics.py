"""IPython magics: ``%gradients`` parses a line, looks names up and calls the core.

Load with ``%load_ext gradmagic``. The magic holds no gradient math: each
``--wrt`` mode calls :func:`gradmagic.weight_gradients`,
:func:`gradmagic.output_gradients` or :func:`gradmagic.input_gradients`,
``--explain`` calls :func:`gradmagic.explain` and ``--check`` calls
:func:`gradmagic.check_gradients`; what it returns (or stores with ``-o``) is
exactly that call's result (with several ``--layer`` values, a
:class:`ResultList` of one such result per layer).

Importing this module must stay cheap: TensorFlow, Keras, NumPy and matplotlib
are imported inside the functions that need them, so ``%load_ext gradmagic``
does not load TensorFlow.
"""

from __future__ import annotations

import ast
import keyword
import math
import warnings
from collections.abc import Sequence
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class, no_var_expand, output_can_be_silenced
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display

from gradmagic.errors import GradmagicError, did_you_mean
from gradmagic.plots import NormChart

#: Arrays with more entries than this are summarised (``...``) by ``--full``.
FULL_ARRAY_LIMIT = 10_000

_USAGE = (
    "Usage: %gradients MODEL X [Y] [--wrt weights|output|input] [--layer L] [-o VAR], or %gradients MODEL X [Y] "
    "--explain, or %gradients MODEL X Y --check; see %gradients? for all options."
)
_OPENERS, _CLOSERS = "([{", ")]}"


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


@magics_class
class GradientMagics(Magics):
    """The ``%gradients`` line magic."""

    @magic_arguments()
    @argument("model", metavar="MODEL", help="The Keras model: a name or expression in the notebook namespace.")
    @argument(
        "x", nargs="?", metavar="X", help="Inputs: a name or expression (x_train[:32]). Without X: a layer summary."
    )
    @argument(
        "y", nargs="?", metavar="Y", help="Targets, for --wrt weights and --wrt output (not needed for --wrt input)."
    )
    @argument(
        "--wrt",
        choices=("weights", "output", "input"),
        help="weights: dLoss/dW per layer (default); output: dLoss/d(layer output), needs --layer; "
        "input: d(model output)/d(input), per sample.",
    )
    @argument(
        "--layer",
        action="append",
        metavar="L",
        help="A layer by model.layers index or name; repeat (--layer 1 --layer dense_2) or "
        "separate with commas (--layer 1,3) for several: the result is then a list, one per layer.",
    )
    @argument("--loss", help="A Keras loss name (mae, ...) or a callable in the namespace. Default: the compiled loss.")
    @argument("--training", action="store_true", help="Run layers in training mode (Dropout, BatchNorm).")
    @argument(
        "--output-index",
        type=int,
        metavar="K",
        help="--wrt input only: unit K of the flattened model output. Default: the full Jacobian.",
    )
    @argument("-o", dest="store", metavar="VAR", help="Store the result in VAR and display its table.")
    @argument("--full", action="store_true", help="Also show the gradient arrays, not only the statistics.")
    @argument("--plot", action="store_true", help="Also draw a bar chart of the gradient norm per layer (log scale).")
    @argument(
        "--explain",
        action="store_true",
        help="Instead of --wrt: per layer, where the gradient flows or stops and which op stops it "
        "(gradmagic.explain). With Y the loss is differentiated, else the sum of the outputs.",
    )
    @argument(
        "--check",
        action="store_true",
        help="Instead of --wrt: compare autodiff with finite differences per layer and input, needs Y "
        "(gradmagic.check_gradients).",
    )
    @output_can_be_silenced
    @no_var_expand
    @line_magic
    def gradients(self, line: str) -> Any:
        """Compute and show the gradients of a Keras model.

        MODEL, X and Y are names or Python expressions in the notebook namespace
        (quote an expression or keep its spaces inside brackets). The result is
        what the matching gradmagic function returns; IPython shows it as a
        table of statistics (norm, max |g|, mean, NaN/Inf, zeros per tensor).

        Examples:
          %gradients model                              # layers: index, name, type, shape
          %gradients model x_train[:32] y_train[:32]    # dLoss/dW, every layer
          %gradients model x y --layer 1 --plot         # dLoss/dW of layer 1, norm chart
          %gradients model x y --wrt output --layer 2   # dLoss/d(output of layer 2)
          %gradients model x --wrt input --output-index 0   # d(output unit 0)/d(x)
          %gradients model x --explain                  # where a gradient stops (Round, casts...)
          %gradients model x y --explain -o paths       # the same for the loss, kept in paths
          %gradients model x y --check                  # autodiff against finite differences
          res = %gradients model x y                    # keep the result
          %gradients model x y -o res                   # keep it and show its table

        Without -o the result is returned (shown as Out, or assigned); --full and
        --plot then show their output under it once the cell has run. With
        -o VAR the table is displayed, the result stored in VAR, and nothing
        returned. Several layers give a list with one result per layer.

        --explain and --check replace --wrt: each reports on every layer at
        once (returning what gradmagic.explain / gradmagic.check_gradients
        return), so --wrt, --layer, --output-index, --full and --plot do not
        combine with them; --loss, --training and -o do.
        """
        args = _parse(self.gradients.parser, line)
        if args.x is None:
            return self._summary(args)
        _check_options(args)
        store = _store_name(args.store)
        model = self._model(args.model)
        x = self._evaluate(args.x, "X")
        y = None if args.y is None else self._evaluate(args.y, "Y")
        loss = self._loss(args.loss)
        result = _compute(model, x, y, args, loss)
        extras = _extras(result, args)
        if store is not None:
            self.shell.user_ns[store] = result
            display(result, *extras)
            return None
        _show_after_cell(self.shell, extras)
        return result

    @magic_arguments()
    @argument("model", metavar="MODEL", help="The Keras model: a name or expression in the notebook namespace.")
    @argument("x", metavar="X", help="Data (n, n_features): slider ranges and the samples to reset to.")
    @argument("y", nargs="?", metavar="Y", help="Optional targets: the bars then show dLoss/dW, else d(output)/dW.")
    @argument("--reference", metavar="EXPR", help="A callable f(points) drawn dashed beside the model's output.")
    @argument("--reference-grad", metavar="EXPR", help="A callable: the analytic derivative, drawn dashed.")
    @argument("--training", action="store_true", help="Run the model in training mode (state is restored).")
    @no_var_expand
    @line_magic
    def gradients_explore(self, line: str) -> Any:
        """Open the gradient explorer: sliders move the input point, the plots follow.

        The panel shows the model output along one feature, d(output)/d(feature)
        along the same line and the gradient norm per layer at the point, with
        the exact numbers below. It is what gradmagic.explore(...) returns.

        Examples:
          %gradients_explore model x_train
          %gradients_explore model x y --reference "lambda p: (p - 5) ** 2 / 25"
        """
        args = _parse(self.gradients_explore.parser, line)
        model = self._model(args.model)
        x = self._evaluate(args.x, "X")
        y = None if args.y is None else self._evaluate(args.y, "Y")
        reference = None if args.reference is None else self._evaluate(args.reference, "--reference")
        slope = None if args.reference_grad is None else self._evaluate(args.reference_grad, "--reference-grad")
        from gradmagic.widgets.explorer import explore

        try:
            return explore(model, x, y, reference=reference, reference_grad=slope, training=args.training)
        except GradmagicError as exc:
            raise UsageError(str(exc)) from None

    def _summary(self, args: Any) -> None:
        """``%gradients MODEL``: print the layers, so the user can pick ``--layer``."""
        given = [flag for flag, value in _option_values(args).items() if value]
        if given:
            raise UsageError(
                f"Received: {', '.join(given)} but no X. Gradients need inputs X "
                f"(and targets Y for --wrt weights/output). Example: %gradients {args.model} x_train[:32] "
                f"y_train[:32]; %gradients {args.model} alone lists the model's layers."
            )
        model = self._model(args.model)
        print(format_layer_summary(model, layer_summary(model), args.model))

    def _evaluate(self, expression: str, role: str) -> Any:
        """Evaluate a name or expression in the user namespace; a failure names the token."""
        try:
            return self.shell.ev(expression)
        except NameError as exc:
            example = "model" if role == "MODEL" else "x_train[:32]"
            names = [name for name in self.shell.user_ns if not name.startswith("_")]
            missing = getattr(exc, "name", None) or expression
            hint = did_you_mean(missing, names)
            raise UsageError(
                f"Received: {role} = {expression!r}, but {missing!r} is not defined in the notebook namespace.{hint} "
                f"Expected a name or Python expression defined there, e.g. {example}. {_USAGE}"
            ) from None
        except Exception as exc:
            raise UsageError(
                f"Received: {role} = {expression!r}, which failed to evaluate: {type(exc).__name__}: {exc}. "
                f"Fix the expression (run it in a cell on its own to see why). {_USAGE}"
            ) from None

    def _model(self, expression: str) -> Any:
        import keras

        model = self._evaluate(expression, "MODEL")
        if not isinstance(model, keras.Model):
            raise UsageError(
                f"Received: MODEL = {expression!r}, which is a {type(model).__name__}, not a Keras model. "
                f"Expected the model first, then X and Y: %gradients model x y. Models from tf_keras / "
                f"Keras 2 are not supported: build the model with `import keras` (Keras 3)."
            )
        return model

    def _loss(self, token: str | None) -> Any:
        """A callable of that name in the namespace, else the name for Keras; other text is an expression."""
        if token is None:
            return None
        if token.isidentifier():
            candidate = self.shell.user_ns.get(token)
            return candidate if callable(candidate) else token
        return self._evaluate(token, "--loss")  # an expression: keras.losses.Huber(delta=0.5)


def unregister(shell: Any) -> None:
    """Remove the magics registered by :class:`GradientMagics` (``%unload_ext gradmagic``).

    Args:
        shell: The ``InteractiveShell`` the extension was loaded into.
    """
    manager = shell.magics_manager
    instance = manager.registry.pop(GradientMagics.__name__, None)
    if instance is None:
        return
    for kind, names in GradientMagics.magics.items():
        table = manager.magics[kind]
        for name in names:
            # Leave a magic of the same name that someone else registered since.
            if getattr(table.get(name), "__self__", None) is instance:
                del table[name]


# --- parsing ------------------------------------------------------------------------------------------------------


def _parse(parser: Any, line: str) -> Any:
    """Split the line (keeping expressions whole) and parse it; every problem is a UsageError."""
    argv = split_line(line)
    try:
        # Intermixed: `model x --layer 1 y` puts y in its place, as a user expects.
        args = parser.parse_intermixed_args(argv)
    except UsageError as exc:
        # Extra words usually come from an expression split at its spaces.
        hint = (
            ' An expression with spaces outside brackets must be quoted: "x * 2".' if "unrecognized" in str(exc) else ""
        )
        raise UsageError(f"{exc}. Received: %gradients {line.strip()}.{hint} {_USAGE}") from None
    if hasattr(args, "layer"):
        args.layer = _layer_tokens(args.layer)
    return args


def split_line(line: str) -> list[str]:
    """Split a magic line at spaces outside brackets and quotes.

    ``x[0, :]`` and ``{"a": xa, "b": xb}`` stay one token; a token that is one
    quoted string (``"x[0, :]"``) is unquoted; a trailing ``;`` (IPython's "no
    output") and a ``# comment`` are dropped.

    Raises:
        UsageError: Unbalanced brackets or quotes.
    """
    tokens: list[str] = []
    start = None
    closers: list[str] = []  # closing brackets still expected, innermost last
    quote = ""
    escaped = False
    for index, char in enumerate(line):
        if quote:
            quote, escaped = ("" if char == quote and not escaped else quote), (char == "\\" and not escaped)
            continue
        if char.isspace() and not closers:
            if start is not None:
                tokens.append(line[start:index])
                start = None
            continue
        if char == "#" and start is None and not closers:
            line = line[:index]
            break
        start = index if start is None else start
        if char in "'\"":
            quote = char
        elif char in _OPENERS:
            closers.append(_CLOSERS[_OPENERS.index(char)])
        elif char in _CLOSERS and (not closers or closers.pop() != char):
            raise UsageError(f"Received: an unmatched {char!r} in %gradients {line.strip()}. {_USAGE}")
    if quote or closers:
        missing = quote or "".join(reversed(closers))
        raise UsageError(f"Received: %gradients {line.strip()}, which lacks a closing {missing!r}. {_USAGE}")
    if start is not None:
        tokens.append(line[start:])
    if tokens and tokens[-1].endswith(";"):
        tokens[-1] = tokens[-1][:-1]
    return [_unquote(token) for token in tokens if token]


def _unquote(token: str) -> str:
    """``"x[0, :]"`` -> ``x[0, :]``; any other token is kept as it is."""
    if token[:1] not in ("'", '"'):
        return token
    try:
        node = ast.parse(token, mode="eval").body
    except SyntaxError:
        return token
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else token


def _layer_tokens(values: Sequence[str] | None) -> list[int | str]:
    """``["1", "dense_2,3"]`` -> ``[1, "dense_2", 3]``: indices become ints, repeats are dropped."""
    layers: list[int | str] = []
    for value in values or []:
        for part in value.split(","):
            part = _unquote(part.strip())
            if not part:
                continue
            try:
                layer: int | str = int(part)
            except ValueError:
                layer = part
            if layer not in layers:
                layers.append(layer)
    return layers


def _option_values(args: Any) -> dict[str, Any]:
    """The options that only make sense with X, keyed by how the user writes them."""
    return {
        "Y": args.y,
        "--wrt": args.wrt is not None,
        "--layer": args.layer,
        "--loss": args.loss,
        "--training": args.training,
        "--output-index": args.output_index is not None,
        "-o": args.store,
        "--full": args.full,
        "--plot": args.plot,
        "--explain": args.explain,
        "--check": args.check,
    }


def _check_options(args: Any) -> None:
    """Refuse combinations that do not fit the chosen mode, with the line that does."""
    if args.explain or args.check:
        _check_report_options(args)
        return
    args.wrt = args.wrt or "weights"  # None until here, so that an explicit --wrt can be told from the default
    m = args.model
    if args.wrt in ("weights", "output") and args.y is None:
        raise UsageError(
            f"Received: --wrt {args.wrt} without Y. dLoss needs targets: %gradients {m} {args.x} y. "
            f"For d(output)/d(input), which needs no Y: %gradients {m} {args.x} --wrt input."
        )
    if args.wrt == "output" and not args.layer:
        raise UsageError(
            f"Received: --wrt output without --layer. Expected the layer whose output to differentiate, "
            f"by index or name: %gradients {m} {args.x} {args.y} --wrt output --layer 1. "
            f"%gradients {m} lists the layers."
        )
    if args.output_index is not None and args.wrt != "input":
        raise UsageError(
            f"Received: --output-index {args.output_index} with --wrt {args.wrt}. --output-index picks a model "
            f"output unit for d(output)/d(input): add --wrt input, or drop --output-index."
        )
    if args.wrt == "input":
        for flag, value in (("--layer", args.layer), ("--loss", args.loss)):
            if value:
                raise UsageError(
                    f"Received: {flag} with --wrt input. d(model output)/d(input) involves no loss and no "
                    f"layer choice. For dLoss/d(output of a layer) use --wrt output --layer L with Y; "
                    f"otherwise drop {flag}."
                )
        if args.y is not None:
            warnings.warn(
                f"Received: Y = {args.y!r} with --wrt input, which does not use targets; Y is ignored. "
                f"Valid: %gradients {m} {args.x} --wrt input.",
                stacklevel=2,
            )


def _check_report_options(args: Any) -> None:
    """--explain and --check report on every layer at once: refuse the options of the --wrt modes."""
    m, x = args.model, args.x
    y = f" {args.y}" if args.y is not None else ""
    if args.explain and args.check:
        raise UsageError(
            f"Received: --explain and --check together. They are two reports, one call each: "
            f"%gradients {m} {x}{y} --explain, then %gradients {m} {x}{y or ' y'} --check."
        )
    flag = "--explain" if args.explain else "--check"
    given = {
        "--wrt": args.wrt is not None,
        "--layer": args.layer,
        "--output-index": args.output_index is not None,
        "--full": args.full,
        "--plot": args.plot,
    }
    conflicts = [option for option, value in given.items() if value]
    if conflicts:
        names, one = ", ".join(conflicts), len(conflicts) == 1
        valid = f"%gradients {m} {x}{y if args.explain else y or ' y'} {flag}"
        raise UsageError(
            f"Received: {flag} with {names}. {flag} reports on every layer at once and shows no gradient arrays; "
            f"{names} {'is an option' if one else 'are options'} of the gradient modes (--wrt weights/output/input). "
            f"Drop {'it' if one else 'them'}: {valid}; or drop {flag} to compute gradients."
        )
    if args.check and args.y is None:
        raise UsageError(
            f"Received: --check without Y. The gradient check compares dLoss/dW and dLoss/dX with finite "
            f"differences of the loss, which needs targets: %gradients {m} {x} y --check."
        )
    if args.explain and args.loss and args.y is None:
        raise UsageError(
            f"Received: --loss {args.loss} with --explain but no Y. Without targets --explain differentiates the "
            f"sum of the model's outputs and uses no loss: add Y (%gradients {m} {x} y --explain --loss "
            f"{args.loss}) or drop --loss."
        )


def _store_name(name: str | None) -> str | None:
    if name is not None and (not name.isidentifier() or keyword.iskeyword(name)):
        raise UsageError(f"Received: -o {name!r}. Expected a Python variable name to store the result in, e.g. -o res.")
    return name


# --- calling the core ---------------------------------------------------------------------------------------------


def _compute(model: Any, x: Any, y: Any, args: Any, loss: Any) -> Any:
    """Call the core (once per layer asked for); a GradmagicError becomes a UsageError."""
    import gradmagic.core as core

    def one(layer: int | str | None) -> Any:
        if args.wrt == "input":
            return core.input_gradients(model, x, output=args.output_index, training=args.training)
        if args.wrt == "output":
            return core.output_gradients(model, x, y, layer, loss=loss, training=args.training)
        return core.weight_gradients(model, x, y, layer=layer, loss=loss, training=args.training)

    try:
        if args.explain:
            return core.explain(model, x, y, loss=loss, training=args.training)
        if args.check:
            return core.check_gradients(model, x, y, loss=loss, training=args.training)
        if len(args.layer) > 1:
            return ResultList(one(layer) for layer in args.layer)
        return one(args.layer[0] if args.layer else None)
    except GradmagicError as exc:
        # The core's message already names the argument, the value and the fix.
        raise UsageError(str(exc)) from None


# --- display ------------------------------------------------------------------------------------------------------


def _results(result: Any) -> list[Any]:
    return list(result) if isinstance(result, ResultList) else [result]


def _extras(result: Any, args: Any) -> list[Any]:
    """What --full and --plot add under the table, built now so that errors surface in the magic."""
    extras: list[Any] = []
    if args.full:
        extras.append(ArraysView(_results(result)))
    if args.plot:
        extras.append(NormChart(_results(result)))
    return extras


def _show_after_cell(shell: Any, objects: list[Any]) -> None:
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
    columns = list(rows[0])
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [header, "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
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
