"""TensorFlow and Keras internals that gradmagic relies on, each behind one small function.

Each function's docstring names the public API that is missing and what the
function falls back to. Internals that only some features need are imported
inside ``try`` (in the function that uses them), so a TensorFlow or Keras
release that moves one weakens that feature with a clear message but never
breaks ``import gradmagic``. ``tests/test_backend_tensorflow.py`` runs every
function here against the installed versions, so an upgrade fails there first,
by name.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

# The Keras internals (no framework): kept importable from here, where the TensorFlow code and its canary test
# have always found them.
from gradmagic.core.backends.keras_internals import (  # noqa: F401
    _COMPILE_LOSS,
    attribute_layers,
    calls_replaced,
    compiled_loss,
    compiled_loss_replaced,
    fit_token,
    fresh_compiled_loss,
    instance_settings,
    lambda_output_shape,
    python_state,
    restore_python_state,
)

# --- The gradient questions (core/questions) ---------------------------------


def flat_caller(concrete_fn: Any, tensors: Any) -> Callable[[Any], Any]:
    """A fast way to call ``concrete_fn`` with arguments structured like ``tensors``.

    Public API missing: a ``ConcreteFunction`` re-binds its structured signature
    on every call (~70 us, a sixth of a small model's whole call); its
    ``inference_fn`` (an ``AtomicFunction``) takes the flat tensors plus the
    captures instead, through ``call_preflattened``. The flat order is checked
    once against TensorFlow's own unpacking (``function_type``). Falls back to
    the structured call if the order differs or this TensorFlow lacks either.
    Gradients of the call itself are not recorded: callers read the results as
    NumPy.
    """
    structured = lambda ts: concrete_fn(*ts)  # noqa: E731
    atomic = getattr(concrete_fn, "inference_fn", None)
    function_type = getattr(concrete_fn, "function_type", None)
    if not hasattr(atomic, "call_preflattened") or function_type is None:
        return structured
    try:
        expected = function_type.unpack_inputs(function_type.bind(*tensors))
    except Exception:
        return structured
    leaves = [t for t in keras.tree.flatten(tensors) if t is not None]
    if len(leaves) != len(expected) or any(a is not b for a, b in zip(leaves, expected)):
        return structured

    def call_flat_tensors(ts: Any) -> Any:
        return atomic.call_preflattened(
            [*(t for t in keras.tree.flatten(ts) if t is not None), *concrete_fn.captured_inputs]
        )

    return call_flat_tensors


def error_message(exc: BaseException) -> str:
    """The error's own message, without the traceback TensorFlow or Keras put inside it.

    Public API missing: neither library separates an error's message from the
    context it adds. Keras highlights (in ANSI bold) the message of an error
    raised inside a layer; an error raised while tracing lists the user's frames
    first ("in user code:") and the error last; a TensorFlow run-time error
    (``tf.errors.OpError``) carries the graph's node names and Python traceback.
    Falls back to ``str(exc)`` when none of those forms is recognised.
    """
    text = str(exc)
    if "\x1b[1m" in text:
        return text.split("\x1b[1m", 1)[1].split("\x1b[0m", 1)[0]
    if text.lstrip().startswith("in user code:"):
        raised = [line.strip() for line in text.splitlines() if re.match(r"\s*\w+(Error|Exception): ", line)]
        return raised[-1] if raised else text.strip().splitlines()[-1].strip()
    if isinstance(exc, tf.errors.OpError):
        skip = ("Graph execution error", "Detected at node", "[[")
        lines = [line.strip() for line in exc.message.splitlines() if line.strip() and not line.startswith(" ")]
        return " ".join(line for line in lines if not line.startswith(skip)) or exc.message
    return text


def is_python_control_flow_error(exc: BaseException) -> bool:
    """True when tracing failed because Python control flow met a symbolic tensor (``if t:``, ``for v in t``).

    Public API missing: only ``tf.errors.OperatorNotAllowedInGraphError`` is a
    type of its own; the same mistake inside Keras or NumPy code is recognised
    by TensorFlow's and NumPy's wording. Falls back to ``False`` (the caller
    then reports the error as it is).
    """
    text = str(exc)
    return isinstance(exc, tf.errors.OperatorNotAllowedInGraphError) or any(
        s in text for s in ("as a Python `bool`", "truth value of an array", "iterating over `tf.Tensor`")
    )


def is_numpy_on_symbolic_error(exc: BaseException) -> bool:
    """True when tracing failed because NumPy was called on a symbolic tensor (``np.round(t)``).

    Public API missing: TensorFlow raises a plain ``NotImplementedError`` or
    ``TypeError``, recognised by its wording. Falls back to ``False``.
    """
    text = str(exc)
    return "Cannot convert a symbolic" in text or "to a numpy array" in text


# --- The training monitor (core/monitor) -------------------------------------


def summary_metadata(plugin: str) -> bytes | None:
    """The serialized ``SummaryMetadata`` that files a ``tf.summary.write`` under a TensorBoard plugin.

    Public API missing: ``tf.summary.scalar`` and ``tf.summary.histogram`` set this
    themselves but need the ``tensorboard`` package; ``tf.summary.write`` takes the
    metadata as bytes and TensorFlow offers no builder for it other than the protobuf
    class ``tf.compat.v1.SummaryMetadata`` (what Keras's own TensorBoard callback uses).

    Falls back to None (``tf.summary.write`` then writes the tensor without a plugin,
    which TensorBoard keeps but does not plot) when that class is gone.

    Args:
        plugin: The plugin's name, e.g. ``"scalars"`` or ``"histograms"``.
    """
    metadata_class = getattr(tf.compat.v1, "SummaryMetadata", None)
    if metadata_class is None:
        return None
    metadata = metadata_class()
    metadata.plugin_data.plugin_name = plugin
    return metadata.SerializeToString()


#: The function attribute that makes TensorFlow call a function as one node instead of inlining it.
_NO_INLINE = {"_noinline": True}


def not_inlined_function(body: Callable[..., Any], input_signature: Sequence[Any]) -> Callable[..., Any]:
    """``tf.function(body)`` that a caller's graph runs as one call node, never inlined into it.

    Public API missing: ``tf.function`` has no public option for this; the runtime
    reads the function attribute ``_noinline``, which ``experimental_attributes``
    accepts. The monitor needs it twice: a branch that most steps skip costs one
    skipped node instead of dozens, and a replayed copy of a gradient stays apart
    from the original (inlined, TensorFlow's graph optimizer merges them again).

    Falls back to an ordinary (inlined) ``tf.function`` when this TensorFlow refuses
    the attribute: results are the same, skipped branches cost a little more, and a
    replayed gradient may be merged back into the original (see
    :func:`op_copier`'s fallback for what that costs).

    Args:
        body: The Python function (traced without autograph).
        input_signature: One ``tf.TensorSpec`` per argument.
    """
    attributes = _NO_INLINE if _no_inline_supported() else None
    return tf.function(body, input_signature=input_signature, autograph=False, experimental_attributes=attributes)


@functools.cache
def _no_inline_supported() -> bool:
    """Whether ``tf.function`` accepts the ``_noinline`` attribute (checked once, by tracing a trivial function)."""
    # The attribute is checked when a function is traced, not when it is made: a
    # refused one would otherwise fail inside the first fit, not here.
    try:
        with tf.init_scope():  # outside any function being traced, which the probe must not join
            probe = tf.function(lambda: tf.constant(0), autograph=False, experimental_attributes=_NO_INLINE)
            probe.get_concrete_function()
    except (ValueError, TypeError):
        return False
    return True


def op_copier() -> Callable[[Any, Sequence[Any]], Any] | None:
    """A function that adds, to the graph being traced, a copy of an op applied to other inputs.

    ``copy(op, inputs)`` returns the first output of a new op of ``op.type`` with
    ``op``'s attributes (its private ``_``-prefixed ones left out), the same output
    dtype and ``inputs`` as its inputs.

    Public API missing: TensorFlow has no public "run this ``tf.Operation`` again on
    other tensors"; ``tf.Graph.create_op`` (kept for graph-mode code, deprecated in
    parts) with the attributes read from ``op.node_def`` does it.

    Falls back to None when either is gone: the monitor then reads each gradient
    itself instead of a replayed copy. The statistics stay right; only on graphs where
    TensorFlow's optimizer rewrites a gradient's single consumer (an SGD update of a
    BatchNormalization gamma) may the trained weights then differ from training
    without the monitor by an ulp.
    """
    if not hasattr(tf.Graph, "create_op") or not hasattr(tf.Operation, "node_def"):
        return None

    def copy(op: Any, inputs: Sequence[Any]) -> Any:
        attrs = {name: value for name, value in op.node_def.attr.items() if not name.startswith("_")}
        graph = tf.compat.v1.get_default_graph()
        return graph.create_op(op.type, list(inputs), [op.outputs[0].dtype], attrs=attrs).outputs[0]

    return copy


def optimizer_variables(optimizer: Any) -> list[Any]:
    """The variables a Keras optimizer updates when ``apply(grads)`` gets no variables.

    Public API missing: Keras optimizers keep the variables they were built for in
    the private ``_trainable_variables`` (an inner optimizer's, for a
    ``LossScaleOptimizer``), and ``apply`` falls back to them; there is no public
    accessor.

    Falls back to an empty list when the attribute is gone: the monitor then records
    such a step with every weight marked missing. (Keras's own train step always
    passes the variables, so ``fit`` does not take this path.)

    Args:
        optimizer: A Keras optimizer (or ``LossScaleOptimizer``).
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return list(getattr(inner, "_trainable_variables", None) or [])


def build_optimizer_as_apply_does(optimizer: Any, variables: Sequence[Any]) -> None:
    """Build an unbuilt optimizer for ``variables`` exactly as its first ``apply`` would.

    Public API missing: a ``LossScaleOptimizer`` creates its ``dynamic_scale``
    variable in ``build``, and the monitor must read that variable before calling
    ``apply``; Keras has no public "build as apply does". This repeats the sequence at
    the top of Keras 3's ``LossScaleOptimizer.apply``: ``build`` inside
    ``keras.name_scope(optimizer.name, caller=optimizer)``, then ``built = True``
    (so variables get the same names and ``apply`` builds nothing twice).

    Falls back, when ``keras.name_scope`` no longer takes ``caller``, to building in
    the plain name scope (the optimizer's variables may then be named differently
    from a plain ``fit``'s; values and updates are the same).

    Args:
        optimizer: The optimizer, not yet built.
        variables: The trainable variables it will update.
    """
    import keras

    try:
        scope = keras.name_scope(optimizer.name, caller=optimizer)
    except TypeError:
        scope = keras.name_scope(optimizer.name)
    with scope:
        optimizer.build(list(variables))
    optimizer.built = True


# --- The diagnosis (core/diagnose) -------------------------------------------


class MissingInternal(Exception):
    """The installed TensorFlow lacks an internal the diagnosis relies on; the message says what is lost."""


def registered_gradient(op: tf.Operation) -> Any:
    """The gradient function TensorFlow has registered for ``op``'s type.

    No public API answers "is a gradient registered for this op type?"
    (``tf.RegisterGradient`` and ``tf.no_gradient`` only write to the registry).
    ``tf.GradientTape`` itself consults
    ``tensorflow.python.framework.ops.get_gradient_function``, which this calls.

    Args:
        op: An op of a traced graph.

    Returns:
        The gradient function, or ``None`` for a type registered as not
        differentiable (``tf.no_gradient``, e.g. ``StopGradient``).

    Raises:
        LookupError: No gradient is registered for the op's type.
        MissingInternal: This TensorFlow has no ``get_gradient_function``:
            ops without a gradient can then not be told from the others.
    """
    try:
        from tensorflow.python.framework.ops import get_gradient_function
    except ImportError:
        raise MissingInternal(
            f"TensorFlow {tf.__version__} has no tensorflow.python.framework.ops.get_gradient_function, so ops "
            "without a registered gradient are not detected"
        ) from None
    return get_gradient_function(op)


def is_custom_gradient(op: tf.Operation) -> bool:
    """Whether ``op`` was created by ``tf.custom_gradient`` (it carries a hand-written gradient).

    No public API marks such ops; ``tf.custom_gradient`` gives the op it creates
    (an ``IdentityN``) the private attribute ``_gradient_op_type``, which names
    its gradient in the registry. Falls back to ``False`` if that attribute is
    gone: explain then only loses the note "custom gradient".

    Args:
        op: An op of a traced graph.
    """
    try:
        op.get_attr("_gradient_op_type")
    except ValueError:
        return False
    return True


#: The name scope under which ``tf.GradientTape.gradient`` creates the ops of the backward pass.
_TAPE_SCOPE = "gradient_tape/"


def differentiated_scope(gradient_op_name: str) -> str | None:
    """The name scope of the forward op that a gradient op differentiates, from the gradient op's name.

    No public API links a gradient op to the forward op it differentiates.
    ``tf.GradientTape.gradient`` creates the gradient of forward op ``a/b/c``
    under the name scope ``gradient_tape/a/b/c/`` or ``gradient_tape/a/b/`` (a
    naming convention, not an API). This strips that prefix and the gradient
    op's own name. Falls back to ``None`` for an op outside that scope (a sum of
    the gradients of a tensor used twice, or a release that renames the scope):
    the NaN/Inf origin of such a gradient op is then reported without its layer.

    Args:
        gradient_op_name: The name of an op of the backward pass, e.g. ``"gradient_tape/a/SqrtGrad"``.

    Returns:
        The scope, e.g. ``"a"`` (where the forward op ``a/b`` lives); ``None`` outside the tape's scope.
    """
    if not gradient_op_name.startswith(_TAPE_SCOPE):
        return None
    scope, _, _ = gradient_op_name.removeprefix(_TAPE_SCOPE).rpartition("/")
    return scope or None


def variable_placeholders(graph: Any, variables: list) -> dict[int, list[tf.Tensor]]:
    """For each variable (by ``id``), the placeholders that stand for it inside a traced ``tf.function`` graph.

    A ``tf.function`` captures a variable's resource handle as a placeholder of
    its graph, which the variable's reads then consume. No public API maps a
    variable to that placeholder: the pairs ``(handle, placeholder)`` are the
    graph's ``captures`` (of ``FuncGraph``, which is not public), and a Keras
    variable's handle is the ``handle`` of its TensorFlow variable (``.value``),
    which ``tf.Variable`` does not document.

    Args:
        graph: The graph of a ``tf.function`` being traced (``tf.compat.v1.get_default_graph()`` inside it).
        variables: Keras variables.

    Raises:
        MissingInternal: The graph has no ``captures``: explain then cannot
            follow a weight's path into the graph.
    """
    captures = getattr(graph, "captures", None)
    if captures is None:
        raise MissingInternal(
            f"TensorFlow {tf.__version__}'s traced graphs have no captures, so the paths of the weights "
            "through the graph were not followed"
        )
    by_handle = {id(v.value.handle): id(v) for v in variables if hasattr(v.value, "handle")}
    found: dict[int, list[tf.Tensor]] = {}
    for external, internal in captures:
        if id(external) in by_handle:
            found.setdefault(by_handle[id(external)], []).append(internal)
    return found
