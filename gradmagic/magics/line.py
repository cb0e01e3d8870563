"""Parse a ``%gradients`` line: split it keeping expressions whole, check option combinations.

Every problem is an IPython ``UsageError`` that names the token and shows the usage.
"""

from __future__ import annotations

import ast
import keyword
import re
import warnings
from collections.abc import Sequence
from typing import Any

from IPython.core.error import UsageError

from gradmagic.errors import GradmagicError

USAGE = (
    "Usage: %gradients MODEL X [Y] [--wrt weights|output|input] [--layer L] [-o VAR], or %gradients MODEL X [Y] "
    "--explain, or %gradients MODEL X Y --check; see %gradients? for all options."
)
EXPLORE_USAGE = (
    "Usage: %gradients_explore MODEL X [Y] [--reference EXPR] [--reference-grad EXPR] [--training] [--view VIEW], e.g. "
    '%gradients_explore model x y --reference "lambda p: (p - 5) ** 2 / 25"; see %gradients_explore? for all options.'
)
_OPENERS, _CLOSERS = "([{", ")]}"
#: A valid use of each option with a value, shown when argparse refuses that option's value.
_EXAMPLES = {
    "--wrt": "--wrt input",
    "--layer": "--layer 1 (or --layer 1,dense_2)",
    "--loss": "--loss mae",
    "--output-index": "--output-index 0",
    "-o": "-o res",
    "--reference": '--reference "lambda p: (p - 5) ** 2 / 25"',
    "--reference-grad": '--reference-grad "lambda p: 2 * (p - 5) / 25"',
    "--view": "--view plane",
}


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines too) made one space: a UsageError shows one line."""
    return " ".join(text.split())


def usage_error(exc: GradmagicError) -> UsageError:
    """The core's error as the magic shows it: its paragraph, on one line.

    The core's message already names the argument, the value and the fix; the
    caller raises this ``from exc``, so an error of the user's own code (a loss,
    a reference curve) stays reachable as the chained cause.
    """
    return UsageError(one_line(str(exc)))


def parse_line(parser: Any, line: str, magic: str = "gradients", usage: str = USAGE) -> Any:
    """Split the line (keeping expressions whole) and parse it; every problem is a UsageError.

    Args:
        parser: The magic's ``@magic_arguments`` parser.
        line: The text after the magic's name.
        magic: The magic's name, for the messages. Defaults to ``"gradients"``.
        usage: The usage line the messages end with. Defaults to ``%gradients``'s.
    """
    argv = split_line(line, magic, usage)
    try:
        # Intermixed: `model x --layer 1 y` puts y in its place, as a user expects.
        args = parser.parse_intermixed_args(argv)
    except UsageError as exc:
        # Extra words usually come from an expression split at its spaces.
        hint = (
            ' An expression with spaces outside brackets must be quoted: "x * 2".' if "unrecognized" in str(exc) else ""
        )
        option = re.match(r"argument ([-\w]+)", str(exc))
        if option and option.group(1) in _EXAMPLES:
            hint += f" Example: {_EXAMPLES[option.group(1)]}."
        raise UsageError(one_line(f"{exc}. Received: %{magic} {line.strip()}.{hint} {usage}")) from None
    if hasattr(args, "layer"):
        args.layer = _layer_tokens(args.layer)
    return args


def split_line(line: str, magic: str = "gradients", usage: str = USAGE) -> list[str]:
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
            raise UsageError(one_line(f"Received: an unmatched {char!r} in %{magic} {line.strip()}. {usage}"))
    if quote or closers:
        missing = quote or "".join(reversed(closers))
        raise UsageError(one_line(f"Received: %{magic} {line.strip()}, which lacks a closing {missing!r}. {usage}"))
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
    """``["1", "dense_2,3"]`` -> ``[1, "dense_2", 3]``: indices become ints, repeats are dropped.

    Raises:
        UsageError: An empty item (``--layer ,,,``, ``--layer 1,,2``): refused, so that a
            slip never silently means "every layer".
    """
    layers: list[int | str] = []
    for value in values or []:
        for part in value.split(","):
            part = _unquote(part.strip())
            if not part.strip():
                empty = (
                    "is empty"
                    if not value.strip()
                    else "has nothing but commas"
                    if not value.replace(",", "").strip()
                    else "has an empty item"
                )
                raise UsageError(
                    one_line(
                        f"Received: --layer {value!r}, which {empty}. Expected layer indices or names "
                        f"separated by commas, e.g. --layer 1,3 or --layer dense_1; leave --layer out for every "
                        f"layer. %gradients MODEL lists the layers."
                    )
                )
            try:
                layer: int | str = int(part)
            except ValueError:
                layer = part
            if layer not in layers:
                layers.append(layer)
    return layers


def option_values(args: Any) -> dict[str, Any]:
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


def check_options(args: Any) -> None:
    """Refuse combinations that do not fit the chosen mode, with the line that does."""
    if args.explain or args.check:
        _check_report_options(args)
        return
    args.wrt = args.wrt or "weights"  # None until here, so that an explicit --wrt can be told from the default
    m = args.model
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


def check_targets(args: Any, x_is_stream: bool) -> None:
    """Refuse a mode that needs Y when Y is missing, unless X is a dataset or generator (its batches carry y).

    Args:
        args: The parsed line, after :func:`check_options`.
        x_is_stream: Whether X evaluated to a dataset, PyDataset or generator; the
            core then reads y from its first batch, as ``fit`` would.
    """
    if args.y is not None or x_is_stream:
        return
    m, x = args.model, args.x
    if args.check:
        raise UsageError(
            f"Received: --check without Y. The gradient check compares dLoss/dW and dLoss/dX with finite "
            f"differences of the loss, which needs targets: %gradients {m} {x} y --check."
        )
    if args.explain and args.loss:
        raise UsageError(
            f"Received: --loss {args.loss} with --explain but no Y. Without targets --explain differentiates the "
            f"sum of the model's outputs and uses no loss: add Y (%gradients {m} {x} y --explain --loss "
            f"{args.loss}) or drop --loss."
        )
    if not (args.explain or args.check) and args.wrt in ("weights", "output"):
        raise UsageError(
            f"Received: --wrt {args.wrt} without Y. dLoss needs targets: %gradients {m} {x} y. "
            f"For d(output)/d(input), which needs no Y: %gradients {m} {x} --wrt input."
        )


def store_name(name: str | None) -> str | None:
    if name is not None and (not name.isidentifier() or keyword.iskeyword(name)):
        raise UsageError(f"Received: -o {name!r}. Expected a Python variable name to store the result in, e.g. -o res.")
    return name
