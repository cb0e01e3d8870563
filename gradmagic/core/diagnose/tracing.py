"""Trace a model once in a ``tf.function``, attributing every graph op to the layer whose call created it.

Used by :func:`gradmagic.core.diagnose.explain.explain` (ops and verdicts per layer) and
by the gradient check (the layer that was running when tracing failed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from gradmagic.core.backends.tensorflow import calls_replaced
from gradmagic.core.diagnose.op_graph import carries_gradient
from gradmagic.core.questions.targets import model_name
from gradmagic.core.questions.trace_errors import describe_layer, diagnose_trace_error, short_error
from gradmagic.core.questions.user_code import with_cause
from gradmagic.errors import ComputeError, GradmagicError

OWNER_GLUE, OWNER_LOSS = -1, -2  # owners of ops outside any layer: model plumbing, and the loss


@dataclass
class LayerCall:
    """One call of a layer while tracing: its slice ``[start, end)`` of the graph's ops, its tensors."""

    layer_index: int
    start: int
    end: int = -1
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


class OpRecorder:
    """Attribute the ops of a traced forward pass to the layers whose calls create them.

    Each layer's ``call`` is replaced by an instance attribute for the duration of
    the trace (see :func:`gradmagic.core.backends.tensorflow.calls_replaced`). Ops go to the
    innermost running layer, so a layer called inside another keeps its own ops.
    """

    def __init__(self, layers: Sequence[keras.Layer]) -> None:
        self.layers = list(layers)
        self.calls: list[LayerCall] = []
        self.owner: list[int] = []
        self.failed: int | None = None  # the innermost layer running when tracing raised
        self.graph: Any = None
        self._stack: list[int] = []

    def flush(self, owner: int | None = None) -> int:
        """Give every op created since the last flush to ``owner`` (default: the running layer)."""
        if owner is None:
            owner = self._stack[-1] if self._stack else OWNER_GLUE
        count = len(self.graph.get_operations())
        self.owner.extend([owner] * (count - len(self.owner)))
        return count

    def _wrap(self, index: int, original: Any, tape: tf.GradientTape | None) -> Any:
        def recording_call(*args: Any, **kwargs: Any) -> Any:
            call = LayerCall(index, self.flush())
            call.inputs = [t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, tf.Tensor)]
            self._stack.append(index)
            try:
                if tape is not None:
                    tape.watch([t for t in call.inputs if carries_gradient(t)])
                outputs = original(*args, **kwargs)
            except Exception:
                self.failed = index if self.failed is None else self.failed
                raise
            finally:
                call.end = self.flush()
                self._stack.pop()
            call.outputs = [t for t in keras.tree.flatten(outputs) if isinstance(t, tf.Tensor)]
            if tape is not None:
                tape.watch([t for t in call.outputs if carries_gradient(t)])
            self.calls.append(call)
            return outputs

        return recording_call

    @contextlib.contextmanager
    def recording(self, tape: tf.GradientTape | None = None) -> Iterator[None]:
        """Wrap every layer's ``call`` (watching its tensors on ``tape``); unwrap afterwards."""
        self.graph = tf.compat.v1.get_default_graph()
        wraps = [
            (layer, lambda original, index=index: self._wrap(index, original, tape))
            for index, layer in enumerate(self.layers)
        ]
        with calls_replaced(wraps):
            yield


@contextlib.contextmanager
def run_once() -> Iterator[None]:
    """Call a traced function that runs only once without TensorFlow's graph optimizer (Grappler).

    Grappler rewrites a graph the first time it runs, to make later runs faster:
    for a graph run once that is pure cost (about a second on MobileNetV2, more
    than the run itself). The same ops run, unfused. Uses the public
    ``tf.config.optimizer`` options and restores them afterwards.
    """
    saved = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options(saved)


class TracingFailed(Exception):
    """Tracing the model raised; carries the innermost layer that was running."""

    def __init__(self, cause: Exception, layer_index: int | None) -> None:
        super().__init__(str(cause))
        self.cause, self.layer_index = cause, layer_index


def concrete_function(function: Any, recorder: OpRecorder, *args: Any) -> Any:
    """Trace ``function`` once; a failure raises :class:`TracingFailed` naming the layer that was running.

    One concrete function, called directly: tf.function's retracing warning is
    meant for functions called repeatedly, not for a trace made on purpose.
    """
    try:
        return function.get_concrete_function(*args)
    except Exception as exc:
        raise TracingFailed(exc, recorder.failed) from None


def tracing_error(failed: TracingFailed, model: keras.Model, purpose: str) -> GradmagicError:
    """The error to raise for a failed trace: a classic Lambda mistake by name, anything else in one line.

    Args:
        failed: What :func:`concrete_function` raised.
        model: The model that was traced.
        purpose: Completes "Tracing model 'name' ... failed", e.g. ``"for the gradient check"``.
    """
    if isinstance(failed.cause, GradmagicError):  # already says which user code failed, with its cause
        return with_cause(failed.cause)
    diagnosed = diagnose_trace_error(failed.cause, model, failed.layer_index)
    if diagnosed is not None:
        return diagnosed
    said = _error_itself(failed.cause).rstrip(".")
    where = ""
    if failed.layer_index is not None:
        where = " in l" + describe_layer(model, failed.layer_index).split(" of model ")[0][1:]
    return ComputeError(
        f"Tracing model '{model_name(model)}' {purpose} failed{where}: {said}. Fix that layer (or what feeds it) "
        f"so that it runs on x. The model was left unchanged."
    )


def _error_itself(exc: BaseException) -> str:
    """The error a failed trace carries, in one line: not the traceback text or argument dump around it.

    Keras wraps an error raised in a layer in its own text (the message in bold,
    then the layer's arguments); inside that, an error raised in a
    ``tf.function`` the layer calls starts with TensorFlow's "in user code:"
    frames. Both wrappings are peeled off, in that order.
    """
    text = str(exc)
    if "\x1b[1m" in text:
        text = text.split("\x1b[1m", 1)[1].split("\x1b[0m", 1)[0]
    return short_error(ValueError(text), limit=300)


def layer_ancestors(recorder: OpRecorder) -> dict[int, set[int]]:
    """For each called layer (by index), the layers whose outputs reach its inputs, through any ops.

    Read from the traced graph, so raw ops between layers (``inp + h``) and
    nested models are followed; a layer's weights are not inputs.
    """
    producers: dict[str, set[int]] = {}
    for call in recorder.calls:
        for tensor in call.outputs:
            producers.setdefault(tensor.name, set()).add(call.layer_index)
    direct: dict[str, set[int]] = {}  # tensor name -> nearest layers upstream (memo)

    def nearest(tensor: tf.Tensor) -> set[int]:
        pending, found, seen = [tensor], set(), set()
        while pending:
            t = pending.pop()
            if t.name in seen:
                continue
            seen.add(t.name)
            if t.name in producers:
                found |= producers[t.name]
            elif t.name in direct:
                found |= direct[t.name]
            else:
                pending.extend(t.op.inputs)
        direct[tensor.name] = found
        return found

    ancestors: dict[int, set[int]] = {}
    for call in recorder.calls:  # in call order, which is topological
        mine = ancestors.setdefault(call.layer_index, set())
        for tensor in call.inputs:
            for parent in nearest(tensor) - {call.layer_index}:
                mine |= {parent} | ancestors.get(parent, set())
    return ancestors
