"""The attribution engine on TensorFlow: the compiled functions of :mod:`.compute`, run and read into NumPy.

See :mod:`gradmagic.core.questions.attribution.engine` for what an engine does.
"""

from __future__ import annotations

import weakref
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradmagic.core.backends.tensorflow import calls_replaced
from gradmagic.core.questions import compute
from gradmagic.core.questions.attribution import compute as ac
from gradmagic.core.questions.model_keys import question_key
from gradmagic.core.questions.state import restore_in_graph, snapshot_in_graph, state_variables
from gradmagic.core.questions.targets import model_name
from gradmagic.errors import ComputeError, GradmagicError, InputError


def compiled(model: keras.Model, kind: str, build: Any, *parts: Any) -> tuple[Any, ac.Compiled]:
    """The cache key and the cached compiled function of one attribution question (built on first use)."""
    key = question_key(model, kind, *parts)
    return key, compute.cached(model, key, lambda: ac.Compiled(build()))


def _numpy(parts: Any) -> list[Any]:
    return [[t.numpy() for t in p] if isinstance(p, (list, tuple)) else p.numpy() for p in parts]


class TensorFlowEngine:
    """Runs the attribution functions' compiled gradients with ``tf.function`` and ``tf.GradientTape``."""

    framework = "TensorFlow"

    def check_input(self, x: Any) -> None:
        """Nothing more to check here: the input conversion refuses another framework's tensors in x."""

    def units(self, model: keras.Model, x: np.ndarray) -> int:
        key, fn = compiled(model, "attribution forward", lambda: ac.forward_function(model))
        return int(ac.run(model, key, fn, (x,), "the output", x.shape).shape[1])

    def path(self, model: keras.Model, keep: bool, args: tuple, shape: tuple) -> list[Any]:
        key, fn = compiled(model, "integrated gradients", lambda: ac.path_function(model, keep), bool(keep))
        return _numpy(ac.run(model, key, fn, args, "integrated gradients", shape))

    def noise(self, model: keras.Model, args: tuple, what: str, shape: tuple) -> list[Any]:
        key, fn = compiled(model, "saliency", lambda: ac.noise_function(model))
        return _numpy(ac.run(model, key, fn, args, what, shape))

    def layer(self, model: keras.Model, layer: keras.Layer, x: np.ndarray, units: np.ndarray) -> tuple:
        key, fn = compiled(model, "gradcam", lambda: ac.layer_function(model, layer), lambda b: b.same(layer))
        values, chosen, outputs, grads, connected = _numpy(ac.run(model, key, fn, (x, units), "Grad-CAM", x.shape))
        if not outputs:
            compute.forget(model, key)
        return values, chosen, outputs, grads, [bool(c) for c in connected]

    def tokens(self, model: keras.Model, layer: keras.Layer, output: int, x: Any, scale: np.ndarray) -> tuple:
        key = question_key(model, "tokens", lambda b: b.same(layer), output)
        fn = compute.cached(model, key, lambda: _token_function(model, layer, output))
        try:
            embedded, grads, values, connected = fn(x, tf.constant(scale))
        except GradmagicError:
            compute.forget(model, key)
            raise
        except Exception as exc:
            compute.forget(model, key)
            raise ComputeError(
                f"Computing d(output {output})/d(output of '{layer.name}') of model '{model_name(model)}' failed: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}. Check that x holds "
                f"token ids the model takes; the model was left unchanged."
            ) from None
        return embedded.numpy(), grads.numpy(), values.numpy(), bool(connected)


def _token_function(model: keras.Model, layer: keras.Layer, output: int) -> Any:
    model_ref, layer_ref = weakref.ref(model), weakref.ref(layer)

    @tf.function(autograph=False)
    def token_grads(x: Any, scale: Any) -> tuple:
        model = model_ref()
        guarded = state_variables(model)
        saved = snapshot_in_graph(guarded)
        calls: list[Any] = []
        with tf.GradientTape() as tape:

            def wrap(original: Any) -> Any:
                # The Embedding's own call, its output scaled per sample (1: unchanged; a point on the path
                # from zero embeddings otherwise); Layer.__call__ still computes the mask around it.
                def scaled_call(*args: Any, **kwargs: Any) -> Any:
                    out = original(*args, **kwargs)
                    out = out * tf.reshape(tf.cast(scale, out.dtype), [-1] + [1] * (len(out.shape) - 1))
                    tape.watch(out)
                    calls.append(out)
                    return out

                return scaled_call

            with calls_replaced([(layer_ref(), wrap)]):
                y_pred = model(x, training=False)
            flat = tf.concat([tf.reshape(t, (tf.shape(t)[0], -1)) for t in keras.tree.flatten(y_pred)], axis=1)
            unit = flat[:, output]
            # Samples are independent at training=False: the gradient of the sum is each sample's own.
            total = tf.reduce_sum(unit)
        if not calls:
            raise InputError("The Embedding layer was not called when the model ran on x.")
        grads = tape.gradient(total, calls[0])
        restore_in_graph(guarded, saved)
        connected = tf.constant(grads is not None)  # known when traced: the graph has a path or not
        return calls[0], grads if grads is not None else tf.zeros_like(calls[0]), unit, connected

    return token_grads


ENGINE = TensorFlowEngine()
