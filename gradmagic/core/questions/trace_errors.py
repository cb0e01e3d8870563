"""Turn the classic tracing failures into one clear paragraph.

A Lambda or custom layer that uses Python control flow on a tensor, or calls
NumPy on one, fails while the model is traced with a message that names
neither the layer nor the fix. These helpers recognise those failures and
shorten any other TensorFlow/Keras error to one line.
"""

from __future__ import annotations

from typing import Any

import keras

from gradmagic.core.questions.targets import model_name
from gradmagic.errors import ComputeError, GradmagicError, brief


def _door() -> Any:
    """The backend whose errors these are: the TensorFlow door module, or the JAX/PyTorch backend object.

    Both offer ``error_message``, ``is_python_control_flow_error`` and
    ``is_numpy_on_symbolic_error``; imported here, so that this module imports
    no framework itself.
    """
    from gradmagic.core.backends import check_backend, stateless_backend

    if check_backend() == "tensorflow":
        from gradmagic.core.backends import tensorflow

        return tensorflow
    return stateless_backend()


def error_message(exc: BaseException) -> str:
    """The error's own message, as the backend in use reads it."""
    return _door().error_message(exc)


def short_error(exc: BaseException, limit: int = 200) -> str:
    """An error from TensorFlow or Keras in one short line, without the traceback inside its message.

    Keras highlights (in bold) the message of an error raised inside a layer; a
    TensorFlow run-time error carries the graph's Python traceback (see
    :func:`~gradmagic.core.backends.tensorflow.error_message`).
    """
    return brief(ValueError(error_message(exc)), limit)


# --- the classic failures ----------------------------------------------------------------------------------------


def function_name(layer: keras.Layer) -> str:
    return getattr(layer.function, "__name__", type(layer.function).__name__)


def describe_layer(model: keras.Model, index: int | None) -> str:
    if index is None:
        return f"A layer of model '{model_name(model)}'"
    layer = model.layers[index]
    fn = f", function {function_name(layer)!r}" if isinstance(layer, keras.layers.Lambda) else ""
    return f"Layer {index} '{layer.name}' ({type(layer).__name__}{fn}) of model '{model_name(model)}'"


def diagnose_trace_error(exc: BaseException, model: keras.Model, index: int | None) -> GradmagicError | None:
    """Turn the classic tracing failures of Lambda and custom layers into a clear error, else ``None``.

    Args:
        exc: What tracing the model raised.
        model: The model.
        index: Index in ``model.layers`` of the innermost layer that was running.
    """
    who = describe_layer(model, index)
    door = _door()
    if getattr(door, "framework", "TensorFlow") != "TensorFlow":
        return _diagnose_stateless(exc, who, door)
    said = f"TensorFlow said: {short_error(exc)}"
    if door.is_python_control_flow_error(exc):
        return ComputeError(
            f"{who} uses Python control flow on a tensor (`if`, `while`, `and`/`or`, `bool()` or a `for` loop over "
            f"a tensor). In a traced function the tensor is symbolic, so Python cannot tell whether it is true. "
            f"Fix: compute both branches and pick element-wise with `tf.where(cond, a, b)` or `keras.ops.where(cond, "
            f"a, b)` (the gradient flows to the branch taken, but both branches are computed: guard a risky one's "
            f"input too, e.g. divide by `tf.where(d == 0, 1.0, d)`, or its NaN gradient leaks through), use "
            f"`tf.cond` for one scalar condition, or move the code into a function decorated with "
            f"`@tf.function` so that AutoGraph turns the `if` into `tf.cond`. "
            f"{said}"
        )
    if door.is_numpy_on_symbolic_error(exc):
        return ComputeError(
            f"{who} calls NumPy on a tensor (e.g. `np.round(t)`). While tracing, tensors are symbolic and cannot "
            f"become NumPy arrays. Fix: use the TensorFlow or Keras equivalent (`tf.round`, `tf.math.*`, "
            f"`keras.ops.*`), which keeps the gradient wherever the math has one; or wrap the NumPy code in "
            f"`tf.numpy_function(f, [t], tf.float32)`, which runs it as Python but stops the gradient there (its "
            f"output has no gradient with respect to its inputs). {said}"
        )
    return None


def _diagnose_stateless(exc: BaseException, who: str, door: Any) -> GradmagicError | None:
    """The classic failures under JAX's tracing or PyTorch's ``torch.func`` transforms."""
    said = f"{door.framework} said: {short_error(exc)}"
    if door.is_python_control_flow_error(exc):
        return ComputeError(
            f"{who} uses Python control flow on a tensor (`if`, `while`, `and`/`or`, `bool()` or `int()` of a "
            f"tensor). Under {door.transforms} the tensor has no concrete value, so "
            f"Python cannot tell whether it is true. Fix: compute both branches and pick element-wise with "
            f"`keras.ops.where(cond, a, b)` (both branches are computed: guard a risky one's input too, or its NaN "
            f"gradient leaks through), or `keras.ops.cond` for one scalar condition. {said}"
        )
    if door.is_numpy_on_symbolic_error(exc):
        return ComputeError(
            f"{who} calls NumPy on a tensor (e.g. `np.round(t)`). While gradients are taken, tensors cannot become "
            f"NumPy arrays. Fix: use the Keras equivalent (`keras.ops.round`, `keras.ops.*`), which keeps the "
            f"gradient wherever the math has one. {said}"
        )
    return None


# --- result objects ----------------------------------------------------------------------------------------------
