"""d(output)/d(embedding output) for token models.

Token ids have no derivative (an Embedding looks them up), so for a token model the question is
asked one step later: :func:`token_gradients` differentiates one output unit
with respect to the output of the model's Embedding layer, per sample, in one
compiled and cached call.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np

from gradmagic.core.questions.attribution.engine import engine
from gradmagic.core.questions.attribution.integrated import path_rule
from gradmagic.core.questions.attribution.results import IntegratedGradients, TokenGradients
from gradmagic.core.questions.entry import leaves_no_trace, spec_and_inputs
from gradmagic.core.questions.inputs import model_spec
from gradmagic.core.questions.kinds import embedding_layer
from gradmagic.core.questions.targets import model_name
from gradmagic.errors import GradmagicWarning, InputError

__all__ = ["TokenGradients", "token_gradients", "token_integrated_gradients"]


def _check_ids(model: keras.Model, layer: keras.layers.Embedding, ids: Any) -> None:
    """Refuse ids the Embedding cannot look up, before the framework fails on them (or, on a GPU, returns zeros)."""
    values = np.asarray(ids)
    if values.size == 0 or values.dtype.kind not in "biuf":
        return  # the model's own call reports these
    bad = ~np.isfinite(values) | (values != np.round(values)) | (values < 0) | (values >= layer.input_dim)
    if np.any(bad):
        first = values[bad].ravel()[0]
        raise InputError(
            f"Received: x with {int(np.sum(bad))} value(s) that are not token ids of '{layer.name}' of model "
            f"'{model_name(model)}' (e.g. {first!r}). Expected whole numbers from 0 to {layer.input_dim - 1} "
            f"(the Embedding's input_dim is {layer.input_dim}). Fix: map unknown tokens to an id the model knows, "
            f"e.g. np.clip(ids, 0, {layer.input_dim - 1})."
        )


def _warn_cut(notes: list[str], what: str, layer_name: str, framework: str) -> None:
    """Note and warn that the output has no gradient path from the Embedding's output, so every gradient is 0."""
    message = (
        f"{what}: the output has no gradient path from the output of Embedding '{layer_name}' ({framework} has no "
        f"gradient for some op between them, e.g. round, argmax or a cast to int), so every gradient is 0. "
        f"Fix: explain a differentiable model, or ask at a layer after that op (gradcam(model, x, layer))"
    )
    notes.append(message)
    warnings.warn(f"{message}.", GradmagicWarning, stacklevel=4)  # past this, the function and its guard


@leaves_no_trace
def token_gradients(model: keras.Model, x: Any, output: int = 0, scale: Any = None) -> TokenGradients:
    """d(output unit)/d(Embedding output) per sample, for a model that reads token ids through an Embedding.

    Args:
        model: A Keras model whose single input is token ids (batch, T) read by
            a ``keras.layers.Embedding``.
        x: Token ids, (batch, T).
        output: The output unit, an index into the flattened per-sample output.
            Defaults to 0.
        scale: Optional factor per sample, ``(batch,)``, multiplying the
            Embedding's output before the rest of the model sees it (a point on
            the straight path from zero embeddings). Defaults to None (1).

    Returns:
        A :class:`TokenGradients`: the (scaled) embeddings, their gradient and the output unit's values.

    Raises:
        InputError: The model has no Embedding layer, x holds values that are not
            its token ids (from 0 to ``input_dim - 1``), or ``output`` is out of range.
        GradmagicError: The model fails on x (the model is left unchanged).

    Warns:
        GradmagicWarning: The output has no gradient path from the Embedding's output (the gradients are 0).

    Example:
        >>> t = gradmagic.token_gradients(model, ids, output=1)
        >>> (t.array * t.embeddings).sum(-1)  # gradient x input per position
    """
    result, connected, framework = _token_gradients(model, x, output, scale)
    if not connected:
        _warn_cut(result.notes, "Token gradients", result.layer_name, framework)
    return result


def _token_gradients(model: keras.Model, x: Any, output: int, scale: Any) -> tuple[TokenGradients, bool, str]:
    """:func:`token_gradients` without its warning: the result, whether a gradient path exists, the framework."""
    run = engine()
    run.check_input(x)
    layer = embedding_layer(model)
    if layer is None:
        raise InputError(
            f"Received: model '{model_name(model)}', which has no keras.layers.Embedding. Expected a model that "
            f"reads token ids through an Embedding. Fix: use gradmagic.input_gradients(model, x) for float inputs."
        )
    _, x_in, _ = spec_and_inputs(model, x)
    outputs = model_spec(model).outputs
    units = (
        sum(int(np.prod(s.shape)) for s in outputs) if outputs and all(None not in s.shape for s in outputs) else None
    )
    if (
        isinstance(output, bool)
        or not isinstance(output, (int, np.integer))
        or output < 0
        or (units is not None and output >= units)
    ):
        limit = f"from 0 to {units - 1}" if units else ">= 0"
        raise InputError(
            f"Received: output={output!r}. Expected an int {limit}: the unit of the flattened per-sample output. "
            f"Fix: e.g. output=0."
        )
    _check_ids(model, layer, keras.tree.flatten(x_in)[0])
    batch = int(keras.tree.flatten(x_in)[0].shape[0])
    factors = np.ones(batch, "float32") if scale is None else np.asarray(scale, "float32").reshape(-1)
    if factors.shape != (batch,) or not np.all(np.isfinite(factors)):
        raise InputError(
            f"Received: scale of shape {np.shape(scale)}. Expected one finite factor per sample ({batch},), or "
            f"None. Fix: e.g. scale=np.linspace(0, 1, {batch})."
        )
    embedded, grads, values, connected = run.tokens(model, layer, int(output), x_in, factors)
    return TokenGradients(embedded, grads, values, layer.name, int(output)), connected, run.framework


@leaves_no_trace
def token_integrated_gradients(model: keras.Model, x: Any, output: int = 0, steps: int = 32) -> IntegratedGradients:
    """Integrated gradients in embedding space: the straight path from zero embeddings to the Embedding's output.

    Token ids have no path of their own; their embeddings do. The gradient is
    taken at ``steps`` points ``a * E`` (``E`` the Embedding's output for x,
    ``a`` from 0 to 1), all in one batched call, and integrated by the
    trapezoid rule, as :func:`~gradmagic.core.integrated_gradients` does for
    float inputs; ``x`` and ``baseline`` of the result are the embeddings and zeros.

    Args:
        model: A model that reads token ids through an Embedding.
        x: Token ids, (batch, T).
        output: The output unit. Defaults to 0.
        steps: Points on the path, >= 2. Defaults to 32.

    Returns:
        An :class:`~gradmagic.core.IntegratedGradients` with ``path_gradients``
        kept (so ``accumulated()`` works); ``.array`` is ``(batch, T, D)``.

    Raises:
        InputError: A bad ``steps`` or ``output``, or a model without an Embedding.

    Warns:
        GradmagicWarning: The output has no gradient path from the Embedding's output (the attributions are 0).

    Example:
        >>> a = gradmagic.token_integrated_gradients(model, ids, output=1)
        >>> a.array.sum(-1)  # per token
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise InputError(
            f"Received: steps={steps!r}. Expected an int >= 2: the points on the path where the gradient is taken. "
            f"Fix: e.g. steps=32."
        )
    ids = np.asarray(x)
    if ids.ndim == 1:
        ids = ids[None]
    alphas, weights = path_rule("trapezoid", int(steps))
    n = len(ids)
    path, connected, framework = _token_gradients(model, np.repeat(ids, steps, axis=0), output, np.tile(alphas, n))
    grads = path.array.reshape(n, steps, *path.array.shape[1:])
    values = path.values.reshape(n, steps).astype(np.float64)
    embeddings = path.embeddings.reshape(n, steps, *path.embeddings.shape[1:])[:, -1]  # a = 1: E itself
    integral = np.tensordot(weights, grads.astype(np.float64), axes=(0, 1))
    result = IntegratedGradients(
        array=(embeddings * integral).astype(embeddings.dtype),
        baseline=np.zeros_like(embeddings),
        baseline_name="zero embeddings",
        output=np.full(n, int(output), np.int32),
        path_alphas=alphas,
        path_weights=weights,
        path_outputs=values,
        value_at_x=values[:, -1],
        value_at_baseline=values[:, 0],
        method="trapezoid",
        x=embeddings,
        path_gradients=grads,
        title=(
            f"Integrated gradients of output {output} of model '{model_name(model)}' in the space of "
            f"'{path.layer_name}' (baseline: zero embeddings; {steps} steps, trapezoid)"
        ),
    )
    if not connected:
        _warn_cut(result.notes, "Integrated gradients", path.layer_name, framework)
    return result
