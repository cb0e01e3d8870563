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

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class, no_var_expand, output_can_be_silenced
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display

from gradmagic.errors import GradmagicError, brief, did_you_mean
from gradmagic.magics.line import (
    EXPLORE_USAGE,
    USAGE,
    check_options,
    check_targets,
    one_line,
    option_values,
    parse_line,
    split_line,
    store_name,
    usage_error,
)
from gradmagic.magics.output import (
    ResultList,
    extras_for,
    format_layer_summary,
    layer_summary,
    show_after_cell,
)

__all__ = ["GradientMagics", "ResultList", "layer_summary", "split_line", "unregister"]


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
        args = parse_line(self.gradients.parser, line)
        if args.x is None:
            return self._summary(args)
        check_options(args)
        store = store_name(args.store)
        model = self._model(args.model)
        x = self._evaluate(args.x, "X")
        # A dataset or generator reaches the core as it is: the core reads x and y from its first batch.
        check_targets(args, _is_stream(x))
        y = None if args.y is None else self._evaluate(args.y, "Y")
        loss = self._loss(args.loss)
        result = _compute(model, x, y, args, loss)
        extras = extras_for(result, args)
        if store is not None:
            self.shell.user_ns[store] = result
            display(result, *extras)
            return None
        show_after_cell(self.shell, extras)
        return result

    @magic_arguments()
    @argument("model", metavar="MODEL", help="The Keras model: a name or expression in the notebook namespace.")
    @argument("x", metavar="X", help="Data (n, n_features): slider ranges and the samples to reset to.")
    @argument("y", nargs="?", metavar="Y", help="Optional targets: the bars then show dLoss/dW, else d(output)/dW.")
    @argument("--reference", metavar="EXPR", help="A callable f(points) drawn dashed beside the model's output.")
    @argument("--reference-grad", metavar="EXPR", help="A callable: the analytic derivative, drawn dashed.")
    @argument("--training", action="store_true", help="Run the model in training mode (state is restored).")
    @argument("--view", metavar="VIEW", help="vector, plane, sequence or image (default: from the model's input).")
    @no_var_expand
    @line_magic
    def gradients_explore(self, line: str) -> Any:
        """Open the gradient explorer: sliders move the input point, the plots follow.

        The view follows the model's input: for a flat vector, the model output
        along one feature, d(output)/d(feature) along the same line and the
        gradient norm per layer at the point (--view plane: the output over two
        features with the gradient field); for a sequence or token ids, the
        gradient per position; for an image, the integrated-gradients path.
        It is what gradmagic.explore(...) returns.

        Examples:
          %gradients_explore model x_train
          %gradients_explore model x y --reference "lambda p: (p - 5) ** 2 / 25"
          %gradients_explore model x --view plane
          %gradients_explore cnn images
        """
        args = parse_line(self.gradients_explore.parser, line, "gradients_explore", EXPLORE_USAGE)
        model = self._model(args.model, EXPLORE_USAGE)
        x = self._evaluate(args.x, "X", EXPLORE_USAGE)
        y = None if args.y is None else self._evaluate(args.y, "Y", EXPLORE_USAGE)
        reference = self._curve(args.reference, "--reference", "lambda p: (p - 5) ** 2 / 25")
        slope = self._curve(args.reference_grad, "--reference-grad", "lambda p: 2 * (p - 5) / 25")
        from gradmagic.widgets.views import explore

        try:
            return explore(
                model, x, y, reference=reference, reference_grad=slope, training=args.training, view=args.view
            )
        except GradmagicError as exc:
            raise usage_error(exc) from exc

    def _curve(self, token: str | None, flag: str, example: str) -> Any:
        """Evaluate a --reference option: it must name a function of the points."""
        if token is None:
            return None
        value = self._evaluate(token, flag, EXPLORE_USAGE)
        if not callable(value):
            raise UsageError(
                f"Received: {flag} {token!r}, which is {_a(type(value).__name__)}, not a function. Expected a callable "
                f'f(points) of an (n, n_features) array, e.g. {flag} "{example}" (quote an expression with '
                f"spaces) or the name of a function defined in the notebook. {EXPLORE_USAGE}"
            )
        return value

    def _summary(self, args: Any) -> None:
        """``%gradients MODEL``: print the layers, so the user can pick ``--layer``."""
        given = [flag for flag, value in option_values(args).items() if value]
        if given:
            raise UsageError(
                f"Received: {', '.join(given)} but no X. Gradients need inputs X "
                f"(and targets Y for --wrt weights/output). Example: %gradients {args.model} x_train[:32] "
                f"y_train[:32]; %gradients {args.model} alone lists the model's layers."
            )
        model = self._model(args.model)
        print(format_layer_summary(model, layer_summary(model), args.model))

    def _evaluate(self, expression: str, role: str, usage: str = USAGE) -> Any:
        """Evaluate a name or expression in the user namespace; a failure names the token."""
        try:
            return self.shell.ev(expression)
        except NameError as exc:
            example = "model" if role == "MODEL" else "x_train[:32]"
            names = [name for name in self.shell.user_ns if not name.startswith("_")]
            missing = getattr(exc, "name", None) or expression
            hint = did_you_mean(missing, names)
            raise UsageError(
                one_line(
                    f"Received: {role} = {expression!r}, but {missing!r} is not defined in the notebook namespace."
                    f"{hint} Expected a name or Python expression defined there, e.g. {example}. {usage}"
                )
            ) from None
        except Exception as exc:
            raise UsageError(
                one_line(
                    f"Received: {role} = {expression!r}, which failed to evaluate: {type(exc).__name__}: "
                    f"{brief(exc)}. Fix the expression (run it in a cell on its own to see why). {usage}"
                )
            ) from None

    def _model(self, expression: str, usage: str = USAGE) -> Any:
        import keras

        model = self._evaluate(expression, "MODEL", usage)
        if not isinstance(model, keras.Model):
            raise UsageError(
                f"Received: MODEL = {expression!r}, which is a {type(model).__name__}, not a Keras model. "
                f"Expected the model first, then X and Y. Models from tf_keras / Keras 2 are not supported: "
                f"build the model with `import keras` (Keras 3). {usage}"
            )
        return model

    def _loss(self, token: str | None) -> Any:
        """A callable of that name in the namespace, else the name for Keras; other text is an expression."""
        if token is None:
            return None
        if token.isidentifier():
            candidate = self.shell.user_ns.get(token)
            return candidate if callable(candidate) else token
        loss = self._evaluate(token, "--loss")  # an expression: keras.losses.Huber(delta=0.5)
        if not (isinstance(loss, str) or callable(loss)):
            raise UsageError(
                f"Received: --loss {token!r}, which is {_a(type(loss).__name__)}. Expected a Keras loss name or a "
                f'callable, e.g. --loss mae, --loss "keras.losses.Huber(delta=0.5)" or the name of a function. {USAGE}'
            )
        return loss


def _a(noun: str) -> str:
    """``"an int"``, ``"a list"``: the article a type name takes."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


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


# --- calling the core ---------------------------------------------------------------------------------------------


def _is_stream(x: Any) -> bool:
    """Whether X is a dataset, PyDataset or generator (the core's test; imported now that X exists)."""
    import gradmagic.core as core

    return core.is_stream(x)


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
        raise usage_error(exc) from exc
