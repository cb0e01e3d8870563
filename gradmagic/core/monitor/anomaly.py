"""Gradient anomalies during training: non-finite, exploding and vanishing gradients.

Detection works on the statistics the monitor recorded (NaN and Inf counts, norms),
never on ``tf.debugging.check_numerics``: under XLA that check passes silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gradmagic.core.diagnose.origin import NonfiniteOrigin
from gradmagic.core.monitor.columns import column
from gradmagic.core.questions.slots import WeightSlot
from gradmagic.errors import GradientAnomalyError  # noqa: F401 - still importable from here

ANOMALY_KINDS = ("nonfinite", "exploding", "vanishing")


@dataclass(frozen=True)
class Anomaly:
    """One gradient anomaly, located in the model and in training time.

    Attributes:
        kind: ``"nonfinite"``, ``"exploding"`` or ``"vanishing"``.
        step: Optimizer step (global, counted across ``fit`` calls).
        epoch: Epoch of the step (0-based, as Keras callbacks count).
        batch: Batch of the step within its epoch (0-based).
        layer: Name of the layer blamed (for ``nonfinite``, possibly a layer without
            weights, e.g. a ``Lambda``, see ``suspects``).
        layer_index: Its index in ``model.layers``.
        weight: ``variable.path`` of the weight whose gradient showed it first.
        value: The norm (exploding, vanishing) or the NaN+Inf count (nonfinite).
        message: One readable sentence.
        suspects: For ``nonfinite``: the layers between the last weight with a finite
            gradient and the first with a non-finite one, in ``model.layers`` order.
        origin: For ``nonfinite`` with ``on_anomaly="stop"``/``"raise"``: the op that made
            NaN/Inf first (forward pass first), found by ``gm.explain``'s NaN/Inf-origin
            pass on the step's batch at the weights before the step
            (:class:`~gradmagic.core.diagnose.origin.NonfiniteOrigin`); else None.
    """

    kind: str
    step: int
    epoch: int
    batch: int
    layer: str
    layer_index: int
    weight: str
    value: float
    message: str
    suspects: tuple[str, ...] = field(default=())
    origin: NonfiniteOrigin | None = None


def find_nonfinite(
    stats: np.ndarray, slots: Sequence[WeightSlot], layer_names: Sequence[str], layer_types: Sequence[str]
) -> tuple[int, int, str, tuple[str, ...], str] | None:
    """Locate where a step's gradient first became non-finite, in backward order.

    Backward order runs from the output to the input, so the first weight (in that
    order) with NaN/Inf is the one nearest the output, ``upstream``. The next
    weight downstream of it still had a finite gradient, so the non-finite value
    was produced between the two: the layers in between (often a weightless
    ``Lambda``) are the suspects, and a single suspect is blamed by name.

    Args:
        stats: ``[weights, columns]`` statistics of one step (columns of ``BUFFER_COLUMNS``).
        slots: Where each weight sits (aligned with ``stats`` rows).
        layer_names: ``[layer.name for layer in model.layers]``.
        layer_types: Class names of the layers, aligned with ``layer_names``.

    Returns:
        ``None`` when every gradient is finite, else ``(weight_row, layer_index,
        layer_name, suspects, explanation)``.
    """
    bad = (column(stats, "nan") + column(stats, "inf")) > 0
    if not bad.any():
        return None
    order = sorted(range(len(slots)), key=lambda i: slots[i].layer_index, reverse=True)
    first = next(i for i in order if bad[i])
    upstream = slots[first].layer_index
    finite_below = [slots[i].layer_index for i in order if not bad[i] and slots[i].layer_index > upstream]
    if not finite_below:
        every = bool(bad.all())
        why = (
            "every weight gradient is non-finite, so the loss or the forward pass probably is (check inputs and loss)"
            if every
            else f"it is the weight nearest the output with a non-finite gradient; layer {slots[first].layer_name!r}"
        )
        return first, upstream, slots[first].layer_name, (), why
    downstream = min(finite_below)
    between = list(range(upstream + 1, downstream))
    suspects = tuple(layer_names[i] for i in between)
    lambdas = [i for i in between if layer_types[i] == "Lambda"]
    if len(between) == 1 or len(lambdas) == 1:
        index = between[0] if len(between) == 1 else lambdas[0]
        why = (
            f"the gradient reaching {layer_names[downstream]!r} (downstream) is finite and the one leaving "
            f"{layer_names[index]!r} into {slots[first].layer_name!r} (upstream) is not"
        )
        return first, index, layer_names[index], suspects, why
    why = (
        f"weights of {slots[first].layer_name!r} have a non-finite gradient while those of "
        f"{layer_names[downstream]!r} downstream are finite"
        + (f"; suspects in between: {', '.join(repr(s) for s in suspects)}" if suspects else "")
    )
    return first, upstream, slots[first].layer_name, suspects, why


class NormTracker:
    """Running window of norms per weight, to flag exploding and vanishing gradients.

    Args:
        n_weights: Number of monitored weights.
        window: Steps kept for the running median.
        explode_factor: A norm above ``explode_factor * median`` explodes.
        explode_threshold: A norm above this absolute value explodes (``None``: off).
        vanish_threshold: A norm below this value vanishes (``None``: off).
        warmup: Steps of history needed before the relative test applies.
    """

    def __init__(
        self,
        n_weights: int,
        window: int,
        explode_factor: float | None,
        explode_threshold: float | None,
        vanish_threshold: float | None,
        warmup: int = 10,
    ) -> None:
        self._recent = np.full((window, n_weights), np.nan)  # oldest first
        self._seen = 0
        self.explode_factor = explode_factor
        self.explode_threshold = explode_threshold
        self.vanish_threshold = vanish_threshold
        self.warmup = warmup

    def check(self, norms: np.ndarray) -> list[tuple[str, int, float]]:
        """Test one step's norms, then add them to the window.

        Returns:
            ``(kind, weight_row, norm)`` for each weight that explodes or vanishes.
        """
        return [(kind, row, norm) for _, kind, row, norm in self.check_steps(norms[None])]

    def check_steps(self, norms: np.ndarray) -> list[tuple[int, str, int, float]]:
        """Test consecutive steps' norms (``[steps, weights]``), each against the window before it.

        Vectorized over the steps: the same result as calling :meth:`check` once
        per step, for a fraction of the Python work.

        Returns:
            ``(step_row, kind, weight_row, norm)`` for each weight that explodes or
            vanishes, in step order.
        """
        steps, window = len(norms), len(self._recent)
        finite = np.isfinite(norms)
        limit = np.full(norms.shape, np.inf)
        if self.explode_threshold is not None:
            limit = np.minimum(limit, self.explode_threshold)
        if self.explode_factor is not None and self._seen + steps > self.warmup:
            history = np.concatenate([self._recent, np.where(finite, norms, np.nan)])
            # Row k of `windows` holds the `window` steps before step k.
            windows = np.lib.stride_tricks.sliding_window_view(history, window, axis=0)[:steps]
            median = _nanmedian_last(windows)
            ready = (self._seen + np.arange(steps) >= self.warmup)[:, None]
            relative = np.where(ready & (median > 0), self.explode_factor * median, np.inf)
            limit = np.minimum(limit, relative)
        exploding = finite & (norms > limit)
        vanishing = finite & (norms < self.vanish_threshold) if self.vanish_threshold is not None else None
        if vanishing is None:
            vanishing = np.zeros_like(exploding)
        found: list[tuple[int, str, int, float]] = []
        for step in np.flatnonzero(exploding.any(axis=1) | vanishing.any(axis=1)):
            for kind, flags in (("exploding", exploding[step]), ("vanishing", vanishing[step])):
                found += [(int(step), kind, int(i), float(norms[step, i])) for i in np.flatnonzero(flags)]
        kept = np.where(finite, norms, np.nan)[-window:]
        self._recent = np.concatenate([self._recent[len(kept) :], kept])
        self._seen += steps
        return found


def _nanmedian_last(values: np.ndarray) -> np.ndarray:
    """``np.nanmedian(values, axis=-1)`` without its all-NaN warning (NaN there)."""
    ordered = np.sort(values, axis=-1)  # NaN sorts last
    count = np.sum(~np.isnan(values), axis=-1)
    low = np.take_along_axis(ordered, np.maximum((count - 1) // 2, 0)[..., None], axis=-1)[..., 0]
    high = np.take_along_axis(ordered, np.maximum(count // 2, 0)[..., None], axis=-1)[..., 0]
    return np.where(count > 0, (low + high) / 2, np.nan)
