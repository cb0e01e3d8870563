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

from typing import Any

import tensorflow as tf

# --- The gradient questions (core/questions) ---------------------------------


# --- The training monitor (core/monitor) -------------------------------------


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


def lambda_output_shape(layer: Any) -> Any:
    """The ``output_shape`` argument a ``keras.layers.Lambda`` was built with: a shape, a function, or ``None``.

    ``Lambda.get_config`` serializes a shape function to a dict and Keras has no
    public accessor for the argument as given; Keras keeps it as ``_output_shape``.
    Falls back to ``None``: Keras then infers the shape by running the function
    on symbolic inputs, which is right for most functions.

    Args:
        layer: A ``keras.layers.Lambda``.
    """
    return getattr(layer, "_output_shape", None)


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
