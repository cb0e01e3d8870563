"""The attribution functions' door to a framework: one engine per Keras backend, chosen at each call.

The public attribution functions (:mod:`.integrated`, :mod:`.saliency`,
:mod:`.gradcam`, :mod:`.tokens`) check their arguments, make baselines and
noise, split the work into calls and build the results in NumPy; only the
compiled gradient functions differ between frameworks. An engine runs those:
:class:`~.tensorflow_engine.TensorFlowEngine` with ``tf.function`` and
``tf.GradientTape``, :class:`~.stateless_engine.StatelessEngine` on JAX and
PyTorch with ``model.stateless_call``-style variable scopes and the backend
object's compile and value-and-gradient. Each method returns NumPy arrays.

An engine has:

- ``framework``: the framework's name, for messages.
- ``check_input(x)``: refuse tensors of another framework in x.
- ``units(model, x) -> int``: the number of flattened per-sample output units (runs the model once).
- ``path(model, keep, args, shape) -> list``: integrated gradients over one stretch of the path,
  ``args = (x, baseline, alphas, weights, units)``; see ``compute.path_function``.
- ``noise(model, args, what, shape) -> list``: SmoothGrad's sums, ``args = (x, noise, units)``.
- ``layer(model, layer, x, units) -> (values, units, [outputs], [gradients], [connected])``: Grad-CAM's
  ingredients; no outputs (and the cache entry dropped) when the layer is not called.
- ``tokens(model, layer, output, x, scale) -> (embeddings, gradients, values, connected)``: d(output unit)/d(Embedding
  output); zeros and ``connected`` False where the graph has no gradient path from the Embedding's output.
"""

from __future__ import annotations

from typing import Any

from gradmagic.core.backends import check_backend


def engine() -> Any:
    """The engine of the Keras backend in use (TensorFlow is imported only on the TensorFlow backend)."""
    if check_backend() == "tensorflow":
        from gradmagic.core.questions.attribution.tensorflow_engine import ENGINE
    else:
        from gradmagic.core.questions.attribution.stateless_engine import ENGINE
    return ENGINE
