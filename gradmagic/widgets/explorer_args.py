"""Check the explorer's arguments where they enter, and call the user's reference curves safely.

Every check here runs before the explorer makes its first TensorFlow call, so a
mistake is one :class:`~gradmagic.errors.GradmagicError` paragraph (what was
received, what was expected, how to fix it) and the model is never touched.
The user's ``reference`` and ``reference_grad`` run on every slider move;
:func:`call_reference` turns their failures and odd results into a
:class:`~gradmagic.errors.ComputeError` that names the callable and chains the
original exception, so the user's own traceback stays one click away.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gradmagic.core import check_flag, is_flag, is_int, is_scalar_list, is_stream
from gradmagic.errors import ComputeError, GradmagicError, InputError, brief, did_you_mean, quote_list

#: The keyword options of ``explore`` besides the data and the references.
OPTIONS = (
    "view",
    "labels",
    "steps",
    "baseline",
    "gradcam_layer",
    "feature_names",
    "points",
    "training",
    "max_sliders",
    "use_ipympl",
)

#: Most points along a curve: every slider move computes a Jacobian for each of
#: them, so more would make the panel lag without drawing anything finer.
MAX_POINTS = 10_000

#: Largest |x| accepted: float32's range, with room for the 10% padding of the slider ranges.
MAX_ABS_X = float(np.finfo(np.float32).max) / 4

_FIX_DATA = "Fix: pass x as a NumPy array (n, n_features), e.g. gm.explore(model, x_train[:200])."


def describe(value: Any, limit: int = 80) -> str:
    """A short ``repr`` of a received value, cut to ``limit`` characters."""
    if callable(value) and hasattr(value, "__qualname__"):
        return value.__qualname__
    if isinstance(value, np.ndarray):
        return f"array of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, dict):
        return f"dict with keys {describe(list(value), limit)}"
    try:
        text = " ".join(repr(value).split())  # one line, whatever the object prints
    except Exception:  # a user object whose repr fails still gets named by its type
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_options(
    model: Any,
    reference: Any,
    reference_grad: Any,
    feature_names: Any,
    points: Any,
    training: Any,
    max_sliders: Any,
    use_ipympl: Any,
) -> None:
    """Check every argument of ``explore`` that does not depend on the data.

    Raises:
        GradmagicError: An argument has the wrong type or is out of range.
    """
    import keras

    if not isinstance(model, keras.Model):
        raise GradmagicError(
            f"Received: model={describe(model)} ({type(model).__name__}). Expected a Keras 3 model whose single "
            f"input is a flat float vector (batch, n_features). Fix: pass the model first: gm.explore(model, x, y)."
        )
    for name, fn in (("reference", reference), ("reference_grad", reference_grad)):
        if fn is not None and not callable(fn):
            what = "values" if name == "reference" else "derivative values"
            example = "lambda p: (p - 5) ** 2 / 25" if name == "reference" else "lambda p: 2 * (p - 5) / 25"
            raise GradmagicError(
                f"Received: {name}={describe(fn)} ({type(fn).__name__}). Expected a function f(points) that "
                f"takes an (n, n_features) array and returns the {what} at those points, or None. "
                f"Fix: {name}={example}."
            )
    # Any ordered collection of names will do (a list, an array, a DataFrame's columns); text, mappings,
    # sets (no order) and one-pass iterators are refused.
    if feature_names is not None and (
        isinstance(feature_names, (str, bytes, collections.abc.Mapping, set, frozenset, collections.abc.Iterator))
        or not isinstance(feature_names, collections.abc.Iterable)
    ):
        raise InputError(
            f"Received: feature_names={describe(feature_names)} ({type(feature_names).__name__}). Expected a list "
            f"(or array, or a DataFrame's columns) with one name per feature, or None. Fix: feature_names=['age', "
            f"'income'] (a single feature: ['x'])."
        )
    if not is_int(points) or not 2 <= points <= MAX_POINTS:
        raise GradmagicError(
            f"Received: points={describe(points)}. Expected an int from 2 to {MAX_POINTS}: how many points each "
            f"curve is drawn with. Fix: leave the default (200) or pass e.g. points=50."
        )
    check_flag("training", training)
    if not is_int(max_sliders) or max_sliders < 1:
        raise GradmagicError(
            f"Received: max_sliders={describe(max_sliders)}. Expected an int >= 1: with more features than that "
            f"the panel shows one slider and a feature dropdown. Fix: leave the default (6) or pass e.g. "
            f"max_sliders=3."
        )
    if use_ipympl is not None and not is_flag(use_ipympl):
        raise GradmagicError(
            f"Received: use_ipympl={describe(use_ipympl)}. Expected True (an interactive ipympl canvas), False "
            f"(PNG images) or None (ipympl when it is installed). Fix: leave it out or pass use_ipympl=False."
        )


def check_unknown(options: dict[str, Any]) -> None:
    """Refuse keyword options ``explore`` does not know, suggesting the closest one."""
    if options:
        name = next(iter(options))
        raise GradmagicError(
            f"Received: explore(..., {name}=...), an option explore does not have.{did_you_mean(name, OPTIONS)} "
            f"Expected one of {quote_list(OPTIONS)} (or reference=, reference_grad=). Fix: drop or rename {name}."
        )


def check_x(x: Any) -> np.ndarray | None:
    """Return x as a finite float array, or None for a structure (dict, list of arrays) the model check judges.

    Raises:
        InputError: x is a dataset or generator, a set, text, complex, ragged, empty or not finite.
    """
    if isinstance(x, dict):
        return None
    if is_stream(x):
        raise InputError(
            f"Received: x as a {type(x).__name__}. The explorer needs the points themselves (slider ranges and "
            f"'reset to sample' read every row), not a stream read once. Expected an array (n, n_features). "
            f"Fix: take one batch first, e.g. x, y = next(iter(dataset)), then gm.explore(model, x, y)."
        )
    if isinstance(x, (str, bytes, set, frozenset)) or x is None:
        raise InputError(
            f"Received: x={describe(x)} ({type(x).__name__}). Expected an array (n, n_features). {_FIX_DATA}"
        )
    if isinstance(x, (list, tuple)) and not is_scalar_list(x):
        return None  # several inputs or a nested structure: the model check says what the model takes
    try:
        data = np.asarray(x)
    except (ValueError, TypeError) as err:
        raise InputError(
            f"Received: x={describe(x)}, which is not a rectangular array ({brief(err, 120)}). Expected an array "
            f"(n, n_features) with the same number of features in every row. {_FIX_DATA}"
        ) from None
    if data.dtype.kind not in "biuf":
        kind = "complex numbers" if data.dtype.kind == "c" else f"dtype {data.dtype}"
        raise InputError(
            f"Received: x holding {kind}. Expected real numbers (the model's input is a float vector). "
            f"Fix: convert first, e.g. x.astype('float32'){' or use x.real' if data.dtype.kind == 'c' else ''}."
        )
    if data.size == 0:
        raise InputError(f"Received: x of shape {data.shape}, which is empty. Expected at least one row. {_FIX_DATA}")
    if data.ndim <= 2 and not np.all(np.isfinite(data)):
        bad = int(np.sum(~np.isfinite(data)))
        raise InputError(
            f"Received: x of shape {data.shape} with {bad} NaN or Inf value(s). Expected finite numbers: the slider "
            f"ranges come from x. Fix: drop those rows, e.g. x[np.isfinite(x).all(axis=1)]."
        )
    largest = float(np.max(np.abs(data.astype(float)))) if data.ndim <= 2 else 0.0
    if largest > MAX_ABS_X:
        raise InputError(
            f"Received: x of shape {data.shape} with values up to {largest:.3g}. Expected |x| below "
            f"{MAX_ABS_X:.3g}: the model computes in float32, and the slider ranges add 10% around x. Fix: "
            f"rescale x (and the model's first layer), e.g. standardise the features."
        )
    return data.astype(float) if data.ndim <= 2 else data


def check_y(y: Any, rows: int) -> np.ndarray | None:
    """Return y as an array with one target per row of x, or None.

    Raises:
        InputError: y is a structure, a stream, text, ragged, or has the wrong number of rows.
    """
    if y is None:
        return None
    fix = (
        "Expected one target array with a row per row of x. Fix: pass such an array, or y=None to show "
        "d(output)/dW instead of dLoss/dW."
    )
    if (
        isinstance(y, (dict, str, bytes, set, frozenset))
        or is_stream(y)
        or (isinstance(y, (list, tuple)) and not is_scalar_list(y))
    ):
        raise InputError(
            f"Received: y={describe(y)} ({type(y).__name__}). The explorer shows the loss of one output, so "
            f"it takes one array of targets. {fix}"
        )
    try:
        targets = np.asarray(y)
    except (ValueError, TypeError) as err:
        raise InputError(
            f"Received: y={describe(y)}, which is not a rectangular array ({brief(err, 120)}). {fix}"
        ) from None
    if targets.dtype.kind not in "biuf":
        raise InputError(f"Received: y with dtype {targets.dtype}, not numbers (class indices or values). {fix}")
    if rows == 1 and (targets.ndim == 0 or (targets.ndim == 1 and len(targets) != 1)):
        targets = targets[None] if targets.ndim else targets.reshape(1)  # one sample's target, without batch axis
    if targets.ndim == 0 or len(targets) != rows:
        got = f"y={describe(y)}, a single value," if targets.ndim == 0 else f"y with {len(targets)} rows"
        raise InputError(f"Received: {got} for x with {rows}. {fix}")
    return targets


def check_feature_names(feature_names: Any, n_features: int) -> list[str]:
    """Return the names of the features (``x0``, ``x1``, ... by default).

    Raises:
        InputError: Not one string per feature, or a name repeats.
    """
    if feature_names is None:
        return [f"x{i}" for i in range(n_features)]
    names = list(feature_names)
    example = [repr(f"x{i}") for i in range(min(n_features, 3))] + (["..."] if n_features > 3 else [])
    if len(names) != n_features or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        problem = (
            f"{len(names)} name(s) for {n_features} feature(s)"
            if len(names) != n_features
            else "a name that is not a string"
            if not all(isinstance(n, str) for n in names)
            else "a name given twice"
        )
        raise InputError(
            f"Received: feature_names={describe(names)}: {problem}. Expected one distinct string per column of x "
            f"({n_features}). Fix: feature_names=[{', '.join(example)}] with your own names."
        )
    return names


def check_row(row: Any, rows: int) -> None:
    """Refuse a sample index that is not an int in ``[0, rows - 1]``."""
    if not is_int(row) or not 0 <= row < rows:
        raise GradmagicError(
            f"Received: row={describe(row)}. Expected the index of a row of x, an int from 0 to {rows - 1}. "
            f"Fix: e.g. panel.reset_to_sample(0)."
        )


def check_point(values: Any, names: Sequence[str]) -> None:
    """Refuse a point that is not one finite real number per feature."""
    try:
        point = np.asarray(values, dtype=float) if not isinstance(values, (str, bytes, dict)) else None
    except (TypeError, ValueError):
        point = None
    if point is None or point.shape != (len(names),) or not np.all(np.isfinite(point)):
        raise GradmagicError(
            f"Received: values={describe(values)}. Expected one finite number per feature ({len(names)}: "
            f"{quote_list(list(names))}). Fix: e.g. panel.set_point([{', '.join(['0.5'] * len(names))}])."
        )


def call_reference(fn: Callable, name: str, points: np.ndarray, feature: int) -> np.ndarray:
    """Call ``fn(points)`` and return one finite value per point.

    An (n, n_features) result is read at the feature's column (a full analytic gradient).

    Args:
        fn: The user's ``reference`` or ``reference_grad``.
        name: Which one it is, for the message.
        points: The points, (n, n_features).
        feature: The feature the curves run along.

    Raises:
        ComputeError: ``fn`` raised, or returned something other than one finite
            number per point; the original exception is chained.
    """
    count, n_features = points.shape
    where = f"{name}(points) with points of shape {points.shape}"
    shapes = f"({count},) or ({count}, 1)" + (f" or ({count}, {n_features})" if n_features > 1 else "")
    try:
        raw = fn(points)
    except Exception as err:
        raise ComputeError(
            f"Received: {name}={describe(fn)}, which raised {type(err).__name__}: {brief(err, 200)} when called as "
            f"{where}. Expected one value per point, shape {shapes}. Fix: make it work on a whole array of points "
            f"(NumPy operations, p[:, 0] for the first feature); the original exception is its __cause__."
        ) from err
    try:
        result = np.asarray(raw)
    except Exception as err:
        raise ComputeError(
            f"Received: {name}={describe(fn)}, which returned a {type(raw).__name__} for {where}, not an array. "
            f"Expected one value per point, shape {shapes}. Fix: return a NumPy array."
        ) from err
    if result.dtype.kind not in "biuf":
        raise ComputeError(
            f"Received: {name}={describe(fn)}, which returned values of dtype {result.dtype} for {where}. "
            f"Expected real numbers, shape {shapes}. Fix: return a float array, e.g. {name}=lambda p: p[:, 0] ** 2."
        )
    if n_features > 1 and result.shape == (count, n_features):
        result = result[:, feature]
    elif result.shape in ((count,), (count, 1)):
        result = result.reshape(count)
    else:
        raise ComputeError(
            f"Received: {name}={describe(fn)}, which returned shape {result.shape} for {where}. Expected one value "
            f"per point, shape {shapes}. Fix: compute elementwise over the rows, e.g. lambda p: np.sin(p[:, 0])."
        )
    result = result.astype(float)
    finite = np.isfinite(result)
    if not finite.all():
        first = int(np.argmin(finite))
        raise ComputeError(
            f"Received: {name}={describe(fn)}, which returned {result[first]} at point {points[first].tolist()} "
            f"({int(np.sum(~finite))} of {count} values are NaN or Inf). Expected finite values over the slider "
            f"ranges. Fix: keep it finite there (np.clip, np.where), or drop {name}."
        )
    return result
