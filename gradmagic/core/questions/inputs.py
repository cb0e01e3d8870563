"""Turn user data (arrays, lists, tensors, dicts) into model-ready batches.

Everything is checked against the model's declared inputs and outputs where the
model has them (Functional and Sequential models built with an ``Input``), so a
mismatch is reported with the expected shape instead of a TensorFlow traceback.
Subclassed models declare nothing, so their data is only converted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from gradmagic.core.backends.tensors import check_leaf_not_foreign, host_array, is_tf_tensor
from gradmagic.core.questions.naming import declared_input_names, output_names
from gradmagic.core.questions.targets import model_name
from gradmagic.errors import GradmagicWarning, InputError, LossError, did_you_mean, quote_list


@dataclass(frozen=True)
class TensorSpec:
    """Name, per-sample shape (no batch axis, ``None`` for free dims) and dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


@dataclass(frozen=True)
class ModelSpec:
    """What a model declares about its inputs and outputs (``None``: unknown)."""

    inputs: list[TensorSpec] | None
    input_structure: Any
    outputs: list[TensorSpec] | None
    output_names: list[str]


def _specs(tensors: Any) -> list[TensorSpec] | None:
    flat = keras.tree.flatten(tensors)
    if not flat:
        return None
    return [TensorSpec(t.name, tuple(t.shape)[1:], str(t.dtype)) for t in flat]


def declared_units(spec: ModelSpec) -> int | None:
    """Output units per sample, flattened and joined, as the model declares them (None: not declared)."""
    if not spec.outputs or any(d is None for s in spec.outputs for d in s.shape):
        return None
    return int(sum(math.prod(s.shape) for s in spec.outputs))


def output_in_range(model: keras.Model, output: int, units: int | None, flattened: str, otherwise: str) -> int:
    """``output=`` made non-negative, if the model has ``units`` output units per sample (as given if unknown).

    Args:
        model: The model, named in the message.
        output: An int index into the flattened per-sample output.
        units: The number of output units per sample, or None when not known.
        flattened: What the index runs over, for the message ("output").
        otherwise: What ``output=None`` asks for, ending the message ("the full Jacobian.").

    Raises:
        InputError: The index is out of range.
    """
    if units is None:
        return int(output)
    if not -units <= output < units:
        raise InputError(
            f"Received: output={output}, but model '{model_name(model)}' has {units} output unit(s) per sample. "
            f"Expected an index in [0, {units - 1}] into the flattened {flattened}, or None for {otherwise}"
        )
    return int(output) % units


def model_spec(model: keras.Model) -> ModelSpec:
    """Read the declared inputs and outputs of a model, where it has them."""
    try:
        flat_inputs, flat_outputs = list(model.inputs or []), list(model.outputs or [])
    except (AttributeError, ValueError):
        # Subclassed models (and unbuilt Sequential ones) declare no tensors.
        return ModelSpec(None, None, None, [])
    try:
        structure = model.input  # Functional: the list/dict the model was built with
    except (AttributeError, ValueError):
        structure = flat_inputs[0] if len(flat_inputs) == 1 else flat_inputs  # Sequential
    specs = _specs(flat_inputs)
    if specs:
        # Named after their InputLayer: the tensor's own name is automatic.
        specs = [TensorSpec(n, s.shape, s.dtype) for n, s in zip(declared_input_names(model, flat_inputs), specs)]
    output_structure = getattr(model, "output", None) if not isinstance(model, keras.Sequential) else None
    if isinstance(output_structure, dict):
        flat_outputs = keras.tree.flatten(output_structure)  # dict outputs are addressed by their keys
    names = output_names(model, output_structure)
    if len(names) != len(flat_outputs):
        names = [model.layers[-1].name] if len(flat_outputs) == 1 and model.layers else []
    outputs = _specs(flat_outputs)
    if outputs and len(names) == len(outputs):  # messages name outputs as users address them
        outputs = [TensorSpec(name, s.shape, s.dtype) for name, s in zip(names, outputs)]
    return ModelSpec(specs, structure, outputs, names)


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return (
        "(" + ", ".join("batch" if i == 0 else str(d) for i, d in enumerate(shape)) + (",)" if len(shape) == 1 else ")")
    )


def _ragged(value: Any) -> bool:
    """True for nested lists whose rows differ in length (or mix rows and numbers) at some depth.

    Read from the structure itself rather than from NumPy's error text, which
    changes between releases.
    """
    if not isinstance(value, (list, tuple)):
        return False
    lengths = {len(v) if isinstance(v, (list, tuple, np.ndarray)) else None for v in value}
    return len(lengths) > 1 or any(_ragged(v) for v in value)


def _leaf(value: Any, dtype: str | None, what: str = "x") -> Any:
    """Convert one array-like to an ndarray or keep a tensor, casting to a float ``dtype``.

    Raises:
        InputError: Sets, strings, ragged lists, complex or non-numeric data
            (unless the model declares such an input).
    """
    float_target = dtype is not None and "float" in dtype
    # Another framework's tensor cannot be the backend's input: refused by name rather than silently copied.
    check_leaf_not_foreign(value, keras.backend.backend(), what)
    value = host_array(value)  # the backend's own JAX array or torch.Tensor: NumPy from here on
    if is_tf_tensor(value):
        tf = _tf()
        if value.dtype.is_complex or value.dtype == tf.string:
            _check_kind(np.dtype(value.dtype.as_numpy_dtype), dtype, what)
        if (
            float_target
            and value.dtype != dtype
            and (value.dtype.is_integer or value.dtype.is_bool or value.dtype.is_floating)
        ):
            return tf.cast(value, dtype)
        return value
    if isinstance(value, keras.Variable):
        value = value.numpy()
    if isinstance(value, (set, frozenset)):
        raise InputError(
            f"Received: {what} as a {type(value).__name__} of {len(value)} items. Expected an array: a NumPy "
            f"array, nested lists of numbers or {_native()}. A set has no order, so its items cannot be matched "
            f"to samples. Fix: pass a list or np.array(...) in the order you mean."
        )
    if isinstance(value, (str, bytes)) and dtype != "string":
        raise InputError(
            f"Received: {what}={value!r:.60} (a {type(value).__name__}). Expected numbers: a NumPy array, "
            f"nested lists of numbers or {_native()}. Fix: convert the text to numbers first (e.g. token ids, "
            f"or a StringLookup/TextVectorization layer inside the model)."
        )
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        ragged = _ragged(value)
        raise InputError(
            f"Received: {what} as {'nested lists of different lengths (ragged)' if ragged else type(value).__name__}"
            f", which is not a rectangular array ({exc}). Expected a NumPy array, nested lists of numbers of equal "
            f"lengths or {_native()}. Fix: pad the rows to one length (keras.utils.pad_sequences) or pass one "
            f"sample at a time."
        ) from None
    if array.dtype == object and array.ndim == 0 and dtype != "string":
        raise InputError(
            f"Received: {what} of type {type(value).__name__} ({_short_repr(value)}), which is not data. Expected "
            f"a NumPy array, nested lists of numbers or {_native()} (or a list/dict of those for several "
            f"{'outputs' if what.startswith('y') else 'inputs'})."
        )
    if array.dtype == object and dtype != "string":
        raise InputError(
            f"Received: {what} that NumPy cannot turn into a numeric array (ragged lists, None or mixed "
            f"types), of length {len(array) if array.ndim else 1}. Expected NumPy arrays, nested lists of "
            f"numbers of equal lengths, or {_native(plural=True)}. Fix: pad ragged rows to one length, or replace None "
            f"with a number."
        )
    _check_kind(array.dtype, dtype, what)
    if float_target and array.dtype != dtype and array.dtype.kind in "biuf":
        return array.astype(dtype)
    if dtype is not None and "int" in dtype and array.dtype.kind in "iu" and array.dtype != dtype:
        return array.astype(dtype)  # int64 from NumPy for an int32 input: as Keras would
    if (
        dtype is None
        and array.dtype.kind in "biu"
        and array.dtype.kind != "b"
        and isinstance(value, (list, tuple, int, float))
    ):
        # Plain Python numbers: the model decides, but floats are the usual intent.
        return array.astype(keras.config.floatx())
    if dtype is None and array.dtype == np.float64 and isinstance(value, (list, tuple, float)):
        return array.astype(keras.config.floatx())
    return array


def _tf() -> Any:
    """TensorFlow, for a value that is a ``tf.Tensor`` (so TensorFlow is already imported: this costs nothing)."""
    import tensorflow as tf

    return tf


def _native(plural: bool = False) -> str:
    """The tensor type users of the Keras backend in use pass, for messages ("a tf.Tensor")."""
    name = {"jax": "JAX array", "torch": "torch.Tensor"}.get(keras.backend.backend(), "tf.Tensor")
    return f"{name}s" if plural else f"a {name}"


def _short_repr(value: Any, limit: int = 60) -> str:
    text = " ".join(repr(value).split())  # one line, whatever the object's repr
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_kind(kind_of: np.dtype, declared: str | None, what: str) -> None:
    """Refuse complex, string and other non-numeric data unless the model declares that dtype."""
    kind = kind_of.kind
    if kind == "c" and not (declared and "complex" in declared):
        raise InputError(
            f"Received: {what} of dtype {kind_of}. Expected real numbers: converting complex values to the "
            f"model's float dtype would silently drop the imaginary part. Fix: pass the parts as separate "
            f"features, e.g. np.concatenate([{what}.real, {what}.imag], axis=-1), or np.real({what}) if the "
            f"imaginary part is meant to be 0."
        )
    if kind in "USO" and declared != "string":
        fix = (
            "encode the labels as numbers, e.g. class ids (0, 1, ...) with a sparse loss, or one-hot rows"
            if what.startswith(("y", "sample_weight"))
            else "convert the text to numbers first (token ids, or a StringLookup layer inside the model)"
        )
        raise InputError(f"Received: {what} of strings (dtype {kind_of}). Expected numbers. Fix: {fix}.")
    if kind in "Mm" or (kind == "V" and "float" not in kind_of.name):  # bfloat16 (ml_dtypes) is numeric
        raise InputError(f"Received: {what} of dtype {kind_of}. Expected numbers (bool, int or float arrays).")


def nonfinite_warning(**parts: Any) -> None:
    """Warn when float data (``x=...``, ``y=...``) holds NaN or Inf: the results will carry them."""
    found = []
    for what, value in parts.items():
        nan = inf = 0
        for leaf in (value,) if isinstance(value, np.ndarray) else keras.tree.flatten(value):
            if is_tf_tensor(leaf):
                if not leaf.dtype.is_floating:
                    continue
                leaf = leaf.numpy()
            if leaf is None or leaf.dtype.kind != "f" or np.isfinite(leaf).all():
                continue
            nan, inf = nan + int(np.isnan(leaf).sum()), inf + int(np.isinf(leaf).sum())
        if nan or inf:
            found.append(f"{what} holding {nan} NaN and {inf} Inf value(s)")
    if found:
        warnings.warn(
            f"Received: {'; '.join(found)}. The results are computed from them, so NaN/Inf in the loss and "
            f"gradients may come from the data, not the model. Fix: clean the data (e.g. np.nan_to_num), or see "
            f"where NaN/Inf goes with gradmagic.explain(model, x).",
            GradmagicWarning,
            stacklevel=3,
        )


def _fit_rank(array: Any, expected: tuple[int | None, ...], what: str, model: keras.Model) -> Any:
    """Add a batch axis to a single sample, or a trailing unit axis to scalars."""
    shape = tuple(array.shape)
    rank = len(expected)
    if len(shape) == rank and _dims_match(shape, expected):
        return array[None, ...] if isinstance(array, np.ndarray) else _tf().expand_dims(array, 0)
    if len(shape) == rank and rank > 0 and expected[-1] == 1 and _dims_match(shape[1:], expected[:-1]):
        # (batch,) given for a (batch, 1) input: a batch of scalars, as Keras reads it.
        return array[..., None] if isinstance(array, np.ndarray) else _tf().expand_dims(array, -1)
    if len(shape) == rank + 1 and _dims_match(shape[1:], expected):
        return array
    if len(shape) == 0 and all(d == 1 for d in expected):
        # One number for a model that takes one number per sample.
        if isinstance(array, np.ndarray):
            return np.reshape(array, (1, *expected))
        return _tf().reshape(array, (1, *expected))
    raise InputError(
        f"Received: {what} of shape {shape}, but model '{model_name(model)}' expects "
        f"{_shape_text((None, *expected))}, i.e. {expected} per sample. Fix: reshape "
        f"{what} to (n_samples, {', '.join(str(d) for d in expected)})"
        + (" (a single sample may also be passed without the batch axis)." if expected else ".")
    )


def _dims_match(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


def _is_leaf(value: Any) -> bool:
    return not isinstance(value, (list, tuple, Mapping)) or is_scalar_list(value)


def is_scalar_list(value: Any) -> bool:
    """True for a (nested) list or tuple of single values: one array of data, not a list of arrays.

    Any value without dimensions counts (numbers, but also strings for a string
    input, and None or complex numbers, which are then refused as data with
    their own message rather than taken for several inputs); arrays, tensors
    and dicts inside make it a structure of several arrays.
    """
    if isinstance(value, Mapping):
        return False
    if not isinstance(value, (list, tuple)):
        return isinstance(value, (int, float, complex, str, bytes, np.generic)) or value is None or np.ndim(value) == 0
    return all(is_scalar_list(item) for item in value)


def _batch_size(leaves: list[Any], what: str) -> int:
    sizes = {int(leaf.shape[0]) for leaf in leaves if len(leaf.shape) > 0}
    if len(sizes) > 1:
        raise InputError(
            f"Received: {what} whose arrays have different numbers of samples "
            f"{sorted(sizes)}. Expected the same first (batch) dimension everywhere."
        )
    size = sizes.pop() if sizes else 1
    if size == 0:
        raise InputError(
            f"Received: an empty batch for {what} (0 samples). Expected at least one "
            f"sample; gradients of an empty batch are undefined."
        )
    return size


def _match_structure(value: Any, specs: list[TensorSpec], structure: Any, what: str, model: keras.Model) -> list[Any]:
    """Order the user's inputs like the model's flat inputs."""
    names = [s.name for s in specs]
    if isinstance(value, Mapping):
        keys = list(structure.keys()) if isinstance(structure, Mapping) else names
        missing = [k for k in keys if k not in value]
        if missing:
            raise InputError(
                f"Received: {what} as a dict with keys {quote_list(list(value))}, but model "
                f"'{model_name(model)}' needs the inputs {quote_list(keys)}; missing "
                f"{quote_list(missing)}. Fix: give one array per input name."
            )
        if isinstance(structure, Mapping):
            return keras.tree.flatten({k: value[k] for k in keys})
        return [value[k] for k in keys]
    if isinstance(value, (list, tuple)) and not is_scalar_list(value):
        if len(value) != len(specs):
            raise InputError(
                f"Received: {what} as a list of {len(value)} arrays, but model "
                f"'{model_name(model)}' has {len(specs)} inputs {quote_list(names)}. "
                f"Expected one array per input, in that order, or a dict keyed by name."
            )
        return list(value)
    raise InputError(
        f"Received: {what} as a single array, but model '{model_name(model)}' has "
        f"{len(specs)} inputs {quote_list(names)}. Expected a list with one array per "
        f"input in that order, or a dict keyed by input name."
    )


def prepare_inputs(model: keras.Model, x: Any, spec: ModelSpec) -> tuple[Any, int]:
    """Convert and check ``x``; return it in the structure the model takes and its batch size.

    Raises:
        InputError: Missing, empty, mis-shaped or mis-structured inputs.
    """
    if x is None:
        raise InputError(
            f"Received: x=None for model '{model_name(model)}'. Expected input data: "
            f"a NumPy array, a list of numbers, {_native()}, or a list/dict of those "
            f"for a model with several inputs."
        )
    if spec.inputs is None:
        # Undeclared inputs (subclassed model): convert, keep the user's structure.
        if _is_leaf(x):
            prepared = _leaf(x, None, "x")
            if len(prepared.shape) == 0:
                one = (1, 1)
                prepared = prepared.reshape(one) if isinstance(prepared, np.ndarray) else _tf().reshape(prepared, one)
            return prepared, _batch_size([prepared], "x")
        prepared = keras.tree.map_structure(lambda v: _leaf(v, None, "x"), x)
        return prepared, _batch_size(keras.tree.flatten(prepared), "x")
    if len(spec.inputs) == 1:
        if isinstance(x, Mapping) and len(x) == 1:
            x = next(iter(x.values()))
        elif isinstance(x, (list, tuple)) and len(x) == 1 and not is_scalar_list(x):
            x = x[0]
        if not _is_leaf(x):
            raise InputError(
                f"Received: x as a {type(x).__name__} of several arrays, but model "
                f"'{model_name(model)}' has a single input of shape "
                f"{_shape_text((None, *spec.inputs[0].shape))}. Expected one array."
            )
        only = spec.inputs[0]
        prepared = _fit_rank(_leaf(x, only.dtype, "x"), only.shape, "x", model)
        return prepared, _batch_size([prepared], "x")
    flat = _match_structure(x, spec.inputs, spec.input_structure, "x", model)
    flat = [
        _fit_rank(_leaf(v, s.dtype, f"x[{s.name!r}]"), s.shape, f"x[{s.name!r}]", model)
        for v, s in zip(flat, spec.inputs)
    ]
    size = _batch_size(flat, "x")
    return keras.tree.pack_sequence_as(spec.input_structure, flat), size


def prepare_targets(model: keras.Model, y: Any, batch: int, spec: ModelSpec, what: str = "y") -> Any:
    """Convert and check targets (or sample weights) against the outputs and batch size.

    Raises:
        LossError: ``y`` is missing.
        InputError: The number of samples or targets does not match.
    """
    if y is None:
        raise LossError(
            f"Received: {what}=None, but dLoss needs targets: the loss of model "
            f"'{model_name(model)}' compares its output with y. Fix: pass y (one target "
            f"per sample), or ask input_gradients(model, x) for d(output)/d(input), "
            f"which needs no y."
        )
    outputs = spec.outputs or []
    if isinstance(y, Mapping) and outputs and len(spec.output_names) == len(outputs):
        names = spec.output_names
        unknown = [k for k in y if k not in names]
        missing = [n for n in names if n not in y]
        if unknown or missing:
            hint = did_you_mean(str(unknown[0]), names) if unknown else ""
            raise InputError(
                f"Received: {what} as a dict keyed by {quote_list([str(k) for k in y])}, but model "
                f"'{model_name(model)}' names its outputs {quote_list(names)}"
                + (f"; unknown: {quote_list([str(k) for k in unknown])}" if unknown else "")
                + (f"; missing: {quote_list(missing)}" if missing else "")
                + f".{hint} Expected one entry per output name (or a list in output order)."
            )
    if isinstance(y, Mapping):
        prepared: Any = {
            k: _target_leaf(v, _spec_named(outputs, spec.output_names, k), batch, f"{what}[{k!r}]")
            for k, v in y.items()
        }
    elif isinstance(y, (list, tuple)) and not is_scalar_list(y):
        prepared = [
            _target_leaf(v, outputs[i] if i < len(outputs) else None, batch, f"{what}[{i}]") for i, v in enumerate(y)
        ]
        if outputs and len(prepared) != len(outputs):
            raise InputError(
                f"Received: {what} as a list of {len(prepared)} arrays, but model "
                f"'{model_name(model)}' has {len(outputs)} output(s) "
                f"{quote_list(spec.output_names)}. Expected one target per output"
                + (" (np.stack the list if its entries are samples)." if len(outputs) == 1 else ".")
            )
        if len(outputs) == 1:
            prepared = prepared[0]
    else:
        prepared = _target_leaf(y, outputs[0] if len(outputs) == 1 else None, batch, what)
    for leaf in keras.tree.flatten(prepared):
        got = int(leaf.shape[0]) if len(leaf.shape) else 1
        if got != batch:
            raise InputError(
                f"Received: {what} with {got} samples, but x has {batch}. Expected one "
                f"target row per input sample. Fix: pass {what}[:{batch}] or matching x."
            )
    return prepared


def _spec_named(outputs: list[TensorSpec], names: list[str], key: str) -> TensorSpec | None:
    return outputs[names.index(key)] if key in names and len(outputs) == len(names) else None


def _target_leaf(value: Any, out: TensorSpec | None, batch: int, what: str) -> Any:
    dtype = out.dtype if out is not None else None
    array = _leaf(value, None, what)
    if isinstance(array, np.ndarray) and array.dtype.kind == "f" and dtype and "float" in dtype:
        # Like the output, but never below float32: float16 targets would be rounded.
        array = array.astype("float32" if "16" in dtype else dtype, copy=False)
    if len(array.shape) == 0:
        array = array.reshape(1) if isinstance(array, np.ndarray) else _tf().reshape(array, (1,))
    if out is not None:
        rank = len(out.shape) + 1
        if len(array.shape) == rank - 1 and out.shape and out.shape[-1] == 1 and array.shape[0] == batch:
            # (batch,) against a (batch, 1) output: without the unit axis a custom
            # loss would silently broadcast (batch,) - (batch, 1) to (batch, batch).
            array = array[..., None] if isinstance(array, np.ndarray) else _tf().expand_dims(array, -1)
        elif batch == 1 and tuple(array.shape) == tuple(out.shape):
            array = array[None, ...] if isinstance(array, np.ndarray) else _tf().expand_dims(array, 0)
        shape = tuple(array.shape)
        # Same rank, other sizes: a mistake, unless it is one class id per sample
        # (batch, 1) for a sparse loss over a (batch, n_classes) output.
        if len(shape) == rank and not _dims_match(shape[1:], out.shape) and shape[-1] != 1:
            raise InputError(
                f"Received: {what} of shape {shape}, but the model's output {out.name!r} has "
                f"shape {_shape_text((None, *out.shape))}. Expected targets shaped like the "
                f"output (or class ids of shape (batch,) for a sparse loss). Fix: pass "
                f"{what} with {out.shape} per sample, or check that x and {what} belong together."
            )
    return array
