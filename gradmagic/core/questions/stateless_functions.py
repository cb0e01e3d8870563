"""The gradient functions on JAX and PyTorch: Keras' stateless API differentiated by the framework's own autodiff.

Every function takes the model's variable *values* as arguments and runs the
model (and the loss) inside one ``keras.StatelessScope`` that maps each
variable to its value, as ``model.stateless_call`` does: a variable read
inside reads the argument, a write (BatchNormalization statistics, a Dropout
seed, a compiled loss's trackers) stays in the scope and is dropped with it.
So nothing is ever written back to the model. The loss runs in the same scope
as the forward pass, so regularization and ``add_loss`` terms see the values
passed in (Keras' own JAX train step gets the same by a private override).

The framework calls (compile, value-and-gradient, batched Jacobian) come from
the backend object (:func:`gradmagic.core.backends.stateless_backend`); this
module is written once for both frameworks. Functions reach the model through
weak references: caching never keeps a model alive.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any

import keras

from gradmagic.core.backends.keras_internals import calls_replaced
from gradmagic.core.questions.cache_keys import Key
from gradmagic.core.questions.caches import WeakCache
from gradmagic.core.questions.layer_calls import layers_named
from gradmagic.core.questions.targets import LossFn

_MAX_FUNCTIONS_PER_MODEL = 32

# model -> question token -> (Question, its stored Key): weak per model, LRU-bounded per model.
_cache = WeakCache(size=_MAX_FUNCTIONS_PER_MODEL)
# model -> kind of question -> the last call of that kind (a repeats.Repeat), to be answered again cheaply.
_last = WeakCache(size=4)


@dataclass
class Question:
    """A compiled gradient function plus what its outputs mean.

    Attributes:
        fn: The compiled function (for an output question: builds one per input signature, see ``per_signature``).
        labels: One dict per result row.
        layer_index, layer_name: The layer asked about (output questions).
        compiled_loss: The question uses the model's compiled loss (built once, eagerly, before the first trace).
        traces: How many times Python ran the function's body: on JAX once per input signature (``jax.jit``
            traces once), on eager PyTorch once per call.
        per_signature: An output question's compiled functions, one per input signature (the zero perturbation
            added to the layer's output has that signature's shape).
        warm: The compiled loss was built under this question's compile state.
        model: The model, only to read its variable lists when the question is made (not kept).
    """

    fn: Callable | None
    labels: list[dict[str, Any]] = field(default_factory=list)
    layer_index: int = -1
    layer_name: str = ""
    compiled_loss: bool = False
    traces: list[int] = field(default_factory=lambda: [0])
    per_signature: dict = field(default_factory=dict)
    warm: bool = False
    model: InitVar[keras.Model | None] = None

    def __post_init__(self, model: keras.Model | None) -> None:
        # The question's key holds the trainable weights and the layers by identity, so these lists stay
        # right for as long as the question is reused; reading them once saves walking every layer per call.
        self._trainable = [] if model is None else list(model.trainable_variables)
        self._non_trainable = [] if model is None else list(model.non_trainable_variables)

    def variable_values(self, backend: Any) -> tuple[list[Any], list[Any]]:
        """The current values of the model's trainable and non-trainable variables, as function arguments."""
        return backend.values(self._trainable), backend.values(self._non_trainable)


def launched(fn: Callable, *args: Any) -> Callable[[], Any]:
    """Start ``fn(*args)``; the function returned gives its result.

    A function compiled by a backend's ``host_gradients`` may dispatch the
    computation and return at once (its ``launch``: JAX computes while Python
    goes on); any other is computed now.
    """
    launch = getattr(fn, "launch", None)
    if launch is not None:
        return launch(*args)
    result = fn(*args)
    return lambda: result


def cached(model: keras.Model, key: Key | None, build: Callable[[], Question]) -> Question:
    """The question for ``key``, built on first use (``key=None``: built afresh every time)."""
    return _cache.keyed(model, key, build)


def stored_key(model: keras.Model, key: Key | None) -> Key | None:
    """The key as the cache keeps it for a question just looked up with ``key`` (weak; see ``Key.stored``)."""
    entry = None if key is None else _cache.lookup(model, key.token)
    return None if entry is None else entry[1]


def last_call(model: keras.Model, kind: str) -> Any:
    """The last call of ``kind`` on ``model`` that may be repeated cheaply (see :mod:`.repeats`), or ``None``."""
    return _last.lookup(model, kind)


def remember_call(model: keras.Model, kind: str, repeat: Any) -> None:
    """Keep ``repeat`` as the last call of ``kind`` (``None``: forget the one kept)."""
    if repeat is None:
        _last.drop(model, kind)
    else:
        _last.store(model, repeat, kind)


def forget(model: keras.Model, key: Key | None) -> None:
    """Drop one cached question (e.g. after its first call failed), and any call kept to repeat."""
    _cache.forget(model, key)
    _last.clear(model)


def clear(model: keras.Model | None = None) -> None:
    """Drop the cached questions of one model, or of every model."""
    _cache.clear(model)
    _last.clear(model)


@contextlib.contextmanager
def _values_in_scope(model: keras.Model, trainable: Sequence[Any], non_trainable: Sequence[Any]) -> Iterator[None]:
    """Run the block with the model's variables read from ``trainable`` and ``non_trainable``; writes dropped."""
    mapping = [*zip(model.trainable_variables, trainable), *zip(model.non_trainable_variables, non_trainable)]
    with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
        yield


def _merged(chosen: Sequence[Any], others: Sequence[Any], positions: Sequence[int]) -> list[Any]:
    """All trainable values in order: ``chosen`` at ``positions``, ``others`` everywhere else."""
    merged: list[Any] = list(others)
    for position, value in zip(positions, chosen):
        merged.insert(position, value)
    return merged


def split(values: Sequence[Any], positions: Sequence[int]) -> tuple[list[Any], list[Any]]:
    """``values`` as (those at ``positions``, the rest), the inverse of :func:`_merged`."""
    wanted = set(positions)
    return [values[i] for i in positions], [v for i, v in enumerate(values) if i not in wanted]


def weight_function(
    backend: Any, model: keras.Model, positions: list[int], loss_fn: LossFn, training: bool, traces: list[int]
) -> Callable:
    """Compile ``(chosen, others, non_trainable, x, y, sample_weight) -> (loss, [dLoss/dW of chosen])`` in NumPy.

    A weight the loss does not reach gets ``None`` (see the backends' ``host_gradients``).

    Args:
        backend: The backend object (JAX or PyTorch).
        model: The model.
        positions: Sorted positions in ``model.trainable_variables`` of the weights differentiated.
        loss_fn: The loss, see :func:`gradmagic.core.questions.targets.resolve_loss`.
        training: Run the model in training mode.
        traces: A one-item counter of runs of the Python body (see :class:`Question`).
    """
    model_ref = weakref.ref(model)

    def loss_of(chosen: list, others: list, non_trainable: list, x: Any, y: Any, sample_weight: Any) -> Any:
        traces[0] += 1
        model = model_ref()
        with _values_in_scope(model, _merged(chosen, others, positions), non_trainable):
            with layers_named(model):
                y_pred = model(x, training=training)
            return loss_fn(model, x, y, y_pred, sample_weight, training)

    return backend.host_gradients(loss_of)


def output_function(
    backend: Any,
    model: keras.Model,
    layer: keras.Layer,
    input_position: int | None,
    loss_fn: LossFn,
    training: bool,
    traces: list[int],
) -> Callable:
    """A function ``(trainable, non_trainable, x, y, sample_weight) -> (loss, [calls' outputs], [dLoss/d output])``.

    dLoss/d(layer output) is the gradient with respect to a zero added to that
    output inside the forward pass: a temporary wrapper of the layer's ``call``
    (restored when the trace ends) adds it, one per call of the layer and per
    float tensor it returns. The zeros are shaped like the layer's output for
    this input signature, read once by an abstract (JAX) or gradient-free
    (PyTorch) forward pass; so one compiled function is made per signature.

    Args:
        backend: The backend object.
        model: The model.
        layer: The layer whose output is differentiated.
        input_position: For an ``InputLayer``, its position among the model's
            flat inputs (its "output" is that input); ``None`` for any other layer.
        loss_fn: The loss.
        training: Run the model in training mode.
        traces: A one-item counter of runs of the Python body.
    """
    model_ref, layer_ref = weakref.ref(model), weakref.ref(layer)

    def run(perturb: list | None, trainable: list, non_trainable: list, x: Any, y: Any, sample_weight: Any) -> Any:
        """The loss and the outputs of every call, with ``perturb[i]`` added to call ``i``'s float outputs."""
        model = model_ref()
        calls: list[list[Any]] = []

        def added(leaves: list[Any]) -> list[Any]:
            extra = perturb[len(calls)] if perturb is not None and len(calls) < len(perturb) else None
            if extra is not None:
                leaves = [leaf if e is None else leaf + e for leaf, e in zip(leaves, extra)]
            calls.append(leaves)
            return leaves

        def wrap(original: Callable) -> Callable:
            def perturbed_call(*args: Any, **kwargs: Any) -> Any:
                outputs = original(*args, **kwargs)
                return keras.tree.pack_sequence_as(outputs, added(keras.tree.flatten(outputs)))

            return perturbed_call

        with _values_in_scope(model, trainable, non_trainable):
            if input_position is not None:
                flat = keras.tree.flatten(x)
                flat[input_position] = added([flat[input_position]])[0]
                x = keras.tree.pack_sequence_as(x, flat)
                replaced = contextlib.nullcontext()
            else:
                replaced = calls_replaced([(layer_ref(), wrap)])
            with layers_named(model), replaced:
                y_pred = model(x, training=training)
            return loss_fn(model, x, y, y_pred, sample_weight, training), calls

    def for_signature(trainable: list, non_trainable: list, x: Any, y: Any, sample_weight: Any) -> Callable:
        """Compile the function for the input signature of ``x``, ``y`` and ``sample_weight``."""
        shapes = backend.shapes(lambda *a: run(None, *a)[1], trainable, non_trainable, x, y, sample_weight)

        def zeros() -> list:
            return [[None if not _is_float(s) else backend.zeros(*s) for s in call] for call in shapes]

        differentiated = backend.value_and_grad(run, argnums=0, has_aux=True)

        def output_grads(trainable: list, non_trainable: list, x: Any, y: Any, sample_weight: Any) -> Any:
            traces[0] += 1
            (loss, calls), grads = differentiated(zeros(), trainable, non_trainable, x, y, sample_weight)
            return loss, calls, grads

        return backend.compile(output_grads)

    return for_signature


def _is_float(shape_and_dtype: tuple) -> bool:
    return "float" in keras.backend.standardize_dtype(shape_and_dtype[1])


def input_function(backend: Any, model: keras.Model, output: int | None, training: bool, traces: list[int]) -> Callable:
    """Compile ``(trainable, non_trainable, x) -> (flat outputs, [per output: [per input: Jacobian]])``.

    Per-sample Jacobians: the model runs on one sample (a batch of one), the
    framework's reverse-mode Jacobian (``jacrev``) differentiates that, and its
    ``vmap`` maps it over the batch, without a Python loop over samples. That
    is what a per-sample Jacobian means when sample i's output depends on
    sample i's input only (true for ``training=False``; BatchNormalization in
    training mode then sees a batch of one).

    Args:
        backend: The backend object.
        model: The model.
        output: ``None`` for every output unit; ``k`` for unit ``k`` of the
            flattened, concatenated per-sample outputs.
        training: Run the model in training mode.
        traces: A one-item counter of runs of the Python body.
    """
    model_ref = weakref.ref(model)

    def one_sample(leaves: tuple, trainable: list, non_trainable: list, structure: Any) -> Any:
        model = model_ref()
        x = keras.tree.pack_sequence_as(structure, [leaf[None] for leaf in leaves])
        with _values_in_scope(model, trainable, non_trainable), layers_named(model):
            flat = [y[0] for y in keras.tree.flatten(model(x, training=training))]
        if output is None:
            return flat, flat
        # Outputs may differ in dtype (mixed precision): join them in the widest.
        common = "float64" if any(keras.backend.standardize_dtype(y.dtype) == "float64" for y in flat) else "float32"
        joined = keras.ops.concatenate([keras.ops.cast(keras.ops.reshape(y, (-1,)), common) for y in flat])
        return joined[output], flat

    def jacobians(trainable: list, non_trainable: list, x: Any) -> Any:
        traces[0] += 1
        leaves = tuple(keras.tree.flatten(x))
        batched = backend.batched_jacobian(lambda ls, tv, ntv: one_sample(ls, tv, ntv, x), argnums=0, has_aux=True)
        result, outputs = batched(leaves, trainable, non_trainable)
        per_output = [list(result)] if output is not None else [list(per_input) for per_input in result]
        return outputs, per_output

    return backend.compile(jacobians)
