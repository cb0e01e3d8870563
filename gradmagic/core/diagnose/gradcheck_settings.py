"""What the gradient check does the same on every backend: its arguments, steps, tolerances and suspects."""

from __future__ import annotations

from typing import Any

import keras

from gradmagic.core.arguments import is_int
from gradmagic.core.diagnose.gradcheck_results import CheckRow
from gradmagic.errors import InputError

#: Step and tolerance floor per precision: central differences err by O(h^2) + O(eps / h).
STEP = {"float64": 1e-5, "float32": 1e-3}
FLOAT32_TOL = 1e-2


def suspects(model: keras.Model, rows: list[CheckRow], ancestors: dict[int, set[int]] | None) -> list[str]:
    """The layers where a wrong gradient can enter, given which rows failed; in model order.

    A wrong derivative at layer L spoils the gradient of every weight upstream
    of L, so L lies downstream of (or is) every failing layer, and no passing
    layer lies between the deepest failing one and L. Without the layer graph
    (``ancestors``), model order stands in for it.
    """
    failed = {r.index for r in rows if not r.passed and r.index is not None}
    if all(r.passed for r in rows):
        return []
    passed = {r.index for r in rows if r.passed and r.index is not None}
    deepest = max(failed, default=-1)
    if ancestors is None:
        later = [i for i in passed if i > deepest]
        chosen = range(max(deepest, 0), min(later) if later else len(model.layers))
    else:
        upstream = {i: ancestors.get(i, set()) | {i} for i in ancestors}
        below = {i for i in upstream if deepest in upstream[i]} if deepest >= 0 else set(upstream)
        chosen = [
            i for i in sorted(upstream)
            if failed <= upstream[i] and not (passed & below & upstream[i])
        ]  # fmt: skip
    return [f"{i} '{model.layers[i].name}'" for i in chosen if not isinstance(model.layers[i], keras.layers.InputLayer)]


def input_labels(x: Any, spec: Any) -> list[str]:
    leaves = keras.tree.flatten(x)
    if len(leaves) == 1:
        return ["x"]
    if isinstance(x, dict):
        return [f"x[{key!r}]" for key in sorted(x)]
    return (
        [s.name for s in spec.inputs]
        if spec.inputs and len(spec.inputs) == len(leaves)
        else [f"x[{i}]" for i in range(len(leaves))]
    )


def validate(tol: float, epsilon: float | None, max_directions: int) -> None:
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
        raise InputError(f"Received: tol={tol!r}. Expected a positive float, e.g. tol=1e-6.")
    if epsilon is not None and (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0):
        raise InputError(f"Received: epsilon={epsilon!r}. Expected None (automatic) or a positive step, e.g. 1e-5.")
    if not is_int(max_directions) or max_directions < 1:
        raise InputError(f"Received: max_directions={max_directions!r}. Expected a positive int, e.g. 4.")


#: Machine epsilon per compute dtype (bfloat16 is not a NumPy type).
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


def compute_eps(model: keras.Model) -> float:
    """Machine epsilon of the lowest precision the model or a layer computes in (float16 under mixed precision)."""
    dtypes = {str(getattr(layer, "compute_dtype", "float32")) for layer in [model, *model.layers]}
    return max(EPS.get(d, EPS["float32"]) for d in dtypes)
