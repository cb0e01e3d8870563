"""GradientMonitor: the gradients the optimizer applies during ``fit``, batch by batch.

No second backward pass: the monitor wraps the optimizer's apply step for the
duration of ``fit``, so the train step itself computes per-weight statistics (a
few reductions per weight) and keeps them on the device. On TensorFlow the
compiled step writes them into a ring buffer variable
(:mod:`gradmagic.core.monitor.capture`, :mod:`gradmagic.core.monitor.stats`); on
JAX the jitted step returns them as one more output, on PyTorch the wrapped
``optimizer.apply`` makes them (:mod:`gradmagic.core.monitor.stateless`). The
callback reads them every ``read_every`` batches and at each epoch end, and
checks each block of steps vectorized, so most batches cost no device-to-host
copy and no Python work at all. This module imports no framework.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any, TextIO

import keras
import numpy as np

from gradmagic.core.monitor.anomaly import Anomaly, GradientAnomalyError, NormTracker, find_nonfinite
from gradmagic.core.monitor.arguments import (
    MonitorArgumentError,
    check_choice,
    check_count,
    check_log_dir,
    check_positive,
    check_stream,
)
from gradmagic.core.monitor.columns import column
from gradmagic.core.monitor.guard import GuardedFunctions, plain_function
from gradmagic.core.monitor.histograms import GradientHistogram, histograms_of
from gradmagic.core.monitor.history import MonitorHistory, MonitorSummary, layer_lines
from gradmagic.core.monitor.session import FitSession
from gradmagic.core.questions.slots import weight_slots
from gradmagic.errors import GradmagicError

_ACTIONS = ("warn", "stop", "raise")
_STATS = ("norm", "full")
_DEFAULT_READ_EVERY = 100
_MAX_ANOMALIES = 1000


class GradientMonitor(keras.callbacks.Callback):
    """Record the gradients ``fit`` applies, per weight and per batch, and flag anomalies.

    Statistics per weight: L2 norm, max |g| and mean of the finite entries, NaN and
    Inf counts (recorded after loss-scale unscaling and after summing over replicas,
    i.e. exactly the gradient the optimizer applies). Training results are
    bit-identical to training without the monitor.

    By default (``stats="norm"``) each step measures the norm of every weight's
    gradient (one reduction per weight; a NaN or Inf makes it non-finite, so the
    NaN/Inf counts are known at every step), and every statistic is measured every
    ``full_every`` batches and at every step with a non-finite gradient, or with a
    sum of squares too small for float32 (then computed in float64, so tiny norms
    keep their scale; an exactly-zero gradient takes that path too). In the
    history, column ``full`` says which steps measured everything; elsewhere
    ``max_abs`` and ``mean`` are 0 (never NaN) and ``nan``/``inf`` are exactly 0.
    ``stats="full"`` measures everything at every step (about 2x the cost).

    With ``steps_per_execution=k`` Keras calls the callback once per ``k`` batches;
    every batch is still recorded (the buffer holds them), but prints, warnings and
    ``"stop"`` happen at those calls only. With gradient accumulation the recorded
    gradients are the per-batch ones, before accumulation.

    One monitor per ``fit``: a second one in the same ``callbacks`` list raises a
    ``MonitorArgumentError`` before the first step (use :meth:`add_listener` to
    hand one monitor's records to more consumers).

    The same on every Keras backend: on JAX the statistics are computed inside
    the jitted train step (from the gradients ``optimizer.stateless_apply``
    receives; under ``keras.distribution.DataParallel`` those of the whole batch),
    on PyTorch in the wrapped ``optimizer.apply``. TensorBoard files need
    TensorFlow installed there (as Keras's own TensorBoard callback does).

    With ``on_anomaly="stop"`` or ``"raise"`` the monitor keeps the batch of each
    step until it has checked it (on TensorFlow a copy made only at the first
    non-finite step, inside the train step; on JAX references to the batch and
    pre-step weights of the steps not yet read, with those weights then not
    donated to XLA; on PyTorch a copy of the weights at the first non-finite
    step). When a step's gradient turns non-finite it runs the NaN/Inf-origin
    pass of ``gm.explain`` on that batch at the weights from before the step, so
    the anomaly names the op, its layer and the user's line that made NaN/Inf
    first (forward pass first); ``bad_batch`` hands the batch over.

    Args:
        print_every: Print one line per layer (norm, max |g|) every this many batches.
            Defaults to None (no printing).
        on_anomaly: What to do on a NaN/Inf, exploding or vanishing gradient: "warn",
            "stop" (ends ``fit`` cleanly; ``last_good_weights`` keeps the weights from
            before the first bad step) or "raise" (a ``GradientAnomalyError``).
            Defaults to "warn".
        log_dir: If set, write gradient norms (every step) and max |g| (where
            measured) per weight to TensorBoard there (and the histograms, with
            ``histogram_every``). Checked (not created) here. Defaults to None.
        stats: ``"norm"`` or ``"full"`` (see above). Defaults to "norm".
        full_every: With ``stats="norm"``, measure every statistic at every this
            many batches of an epoch. Defaults to None: when the monitor reads
            (``read_every``; with "stop"/"raise", ``print_every`` or 100).
        histogram_every: Also record each weight's full gradient histogram every
            this many steps (``monitor.histograms``). Defaults to None (off).
        histogram_bins: Bins per histogram. Defaults to 30.
        read_every: Read the device buffer every this many batches. Defaults to 1 for
            "stop"/"raise", to ``print_every`` when printing, else 100 (a read costs
            about a millisecond; warnings then come at most 100 batches late), or
            more often when a listener such as the live panel asks for it.
        explode_factor: A norm above this multiple of the weight's running median
            explodes. Defaults to 1000.0 (None turns the relative test off).
        explode_threshold: A norm above this value explodes. Defaults to None (off).
        vanish_threshold: A norm below this value vanishes. Defaults to None (off).
        window: Steps in the running median. Defaults to 50.
        stream: Where printed lines go. Defaults to ``sys.stdout``.

    Example:
        >>> monitor = gm.GradientMonitor(print_every=10)
        >>> model.fit(x, y, callbacks=[monitor])
        >>> monitor.summary()
        >>> monitor.to_dataframe().groupby("layer").norm.max()
    """

    def __init__(
        self,
        print_every: int | None = None,
        on_anomaly: str = "warn",
        log_dir: str | os.PathLike | None = None,
        *,
        stats: str = "norm",
        full_every: int | None = None,
        read_every: int | None = None,
        histogram_every: int | None = None,
        histogram_bins: int = 30,
        explode_factor: float | None = 1000.0,
        explode_threshold: float | None = None,
        vanish_threshold: float | None = None,
        window: int = 50,
        stream: TextIO | None = None,
    ) -> None:
        super().__init__()
        # Everything is checked here, so that a bad value fails now rather than on
        # the first batch of fit (after the model and the data were set up).
        check_count("print_every", print_every)
        check_choice("on_anomaly", on_anomaly, _ACTIONS)
        check_log_dir(log_dir)
        check_choice("stats", stats, _STATS)
        check_count("full_every", full_every)
        check_count("read_every", read_every)
        check_count("histogram_every", histogram_every)
        check_count("histogram_bins", histogram_bins, allow_none=False)
        check_positive("explode_factor", explode_factor)
        check_positive("explode_threshold", explode_threshold)
        check_positive("vanish_threshold", vanish_threshold)
        check_count("window", window, allow_none=False)
        check_stream(stream)
        _check_backend_options(log_dir)
        self.stats = stats
        self._full_every = full_every
        self.print_every = print_every
        self.on_anomaly = on_anomaly
        self.log_dir = log_dir
        if read_every is None:
            read_every = 1 if on_anomaly != "warn" else (print_every or _DEFAULT_READ_EVERY)
        self.read_every = read_every
        self.histogram_every, self.histogram_bins = histogram_every, histogram_bins
        self.histograms: list[GradientHistogram] = []
        self.thresholds = {"factor": explode_factor, "explode": explode_threshold, "vanish": vanish_threshold}
        self.window = window
        self.stream = stream
        # Warn-only monitoring tolerates Keras's threaded batch-end dispatch; stopping
        # and raising must happen in the training thread, before the next batch.
        self.async_safe = on_anomaly == "warn" and print_every is None
        self.anomalies: list[Anomaly] = []
        self.last_good_weights: list[np.ndarray] | None = None
        self.last_good_step: int | None = None
        self.skipped_steps: list[int] = []
        self._history: MonitorHistory | None = None
        self._tracker: NormTracker | None = None  # lives with the history: one running window per run of weights
        self._writer: Any = None  # made at the first fit with log_dir: one events file for all fits
        self._session: FitSession | None = None  # exists from on_train_begin to on_train_end
        self._listeners: list[Callable[[GradientMonitor], None]] = []
        self._end_listeners: list[Callable[[], None]] = []
        self._functions: GuardedFunctions | None = None
        # Recorded steps keep counting across fits of the same weights, also when a
        # compile() gave the model a new optimizer whose step count starts at 0 again.
        self._next_step = 0
        self._bad_batch: tuple[Any, Any, Any] | None = None
        self._bad_weights: list[np.ndarray] | None = None
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()  # batch ends may run in Keras's thread pool

    # ----------------------------------------------------------------- results
    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per (step, weight) with the columns of :meth:`to_dict`."""
        return self._history.records() if self._history else []

    def to_dict(self) -> dict[str, list]:
        """Equal-length columns: step, epoch, batch, layer, layer_index, weight, norm,
        max_abs, mean, nan, inf, skipped, full (one row per step and weight; ``full``
        is False where only the norm was measured, see the class docstring)."""
        if self._history is None:
            return {name: [] for name in _empty_columns()}
        return self._history.to_dict()

    def to_dataframe(self) -> Any:
        """The history as a ``pandas.DataFrame``.

        Raises:
            GradmagicError: pandas is not installed.
        """
        try:
            import pandas as pd
        except ImportError:
            raise GradmagicError(
                "to_dataframe() needs pandas, which is not installed. Fix: `pip install pandas`, "
                "or use monitor.to_dict()."
            ) from None
        return pd.DataFrame(self.to_dict())

    def summary(self) -> MonitorSummary:
        """Per-layer summary (text repr and ``_repr_html_``) with the anomalies found."""
        history = self._history if self._history is not None else MonitorHistory([])
        return MonitorSummary(history, self.anomalies)

    @property
    def recorded(self) -> MonitorHistory | None:
        """The raw history (NumPy arrays per statistic), ``None`` before ``fit``."""
        return self._history

    def add_listener(
        self,
        listener: Callable[[GradientMonitor], None],
        every: int | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        """Call ``listener(monitor)`` after every read of new steps (e.g. a live plot).

        Args:
            listener: The function to call.
            every: Read the device buffer at least every this many batches for
                this listener. Defaults to None (the monitor's own cadence).
            on_end: Also call this when ``fit`` ends, after the last read.
                Defaults to None.
        """
        check_count("every", every)
        self._listeners.append(listener)
        if every is not None:
            self.read_every = min(self.read_every, every)
        if on_end is not None:
            self._end_listeners.append(on_end)

    def restore_last_good(self) -> None:
        """Put ``last_good_weights`` back into the model (after ``on_anomaly="stop"``)."""
        if self.last_good_weights is None:
            raise GradmagicError("No good weights were kept: last_good_weights is kept only with on_anomaly='stop'.")
        self.model.set_weights(self.last_good_weights)

    # --------------------------------------------------------------- callbacks
    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        if getattr(model, "optimizer", None) is None:
            raise MonitorArgumentError(
                f"Model {model.name!r} has no optimizer: compile it before fit(callbacks=[GradientMonitor()])."
            )
        other = getattr(model.train_function, "gradmagic_functions", None)
        if other is not None and other is not self._functions and other.attached_in_this_fit(model):
            # Each monitor records through its own compiled step, and fit runs one step
            # function: the first monitor would silently record nothing.
            other.detach()
            raise MonitorArgumentError(
                f"Received two GradientMonitor callbacks in one fit of model {model.name!r}. Expected one "
                "monitor per fit (both would record the same gradients, and only one can). Fix: pass one "
                "monitor, e.g. fit(..., callbacks=[monitor]); a second consumer of its records can use "
                "monitor.add_listener(...)."
            )
        slots = weight_slots(model)
        if self._history is None or [s.path for s in self._history.slots] != [s.path for s in slots]:
            self._history = MonitorHistory(slots)
            self._next_step = 0
            self._tracker = NormTracker(
                len(slots),
                self.window,
                self.thresholds["factor"],
                self.thresholds["explode"],
                self.thresholds["vanish"],
            )
        self._functions = self._train_functions(model, slots)
        buffer = self._functions.buffer
        # The buffer (and its step count) lives as long as the traced function that writes it.
        count = buffer.recorded()
        self._session = FitSession(
            slots=slots,
            layer_names=[layer.name for layer in model.layers],
            layer_types=[type(layer).__name__ for layer in model.layers],
            buffer=buffer,
            base_step=max(int(keras.ops.convert_to_numpy(model.optimizer.iterations)), self._next_step),
            first_count=count,
            read=count,
            epoch_first=count,
        )
        if self._writer is None:
            self._writer = _summary_writer(self.log_dir)
        if self.stats == "norm":
            buffer.schedule(count, self.full_every)  # again at each epoch's start
        if self._functions.capture is not None:
            self._functions.capture.reset()  # each fit keeps its own first bad step
        self._bad_batch = self._bad_weights = None
        self._functions.attach(model)
        if self.on_anomaly == "stop":
            self._keep_good(self._session.base_step)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        session = self._session
        session.begin_epoch(epoch)
        if self.stats == "norm":
            # Full statistics at the batches where the host reads (or every full_every).
            session.buffer.schedule(session.epoch_first, self.full_every)

    @property
    def full_every(self) -> int:
        """With ``stats="norm"``: every statistic is measured every this many batches of an epoch."""
        if self._full_every is not None:
            return self._full_every
        return self.read_every if self.on_anomaly == "warn" else (self.print_every or _DEFAULT_READ_EVERY)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # Most batches end here: a counter check, no lock, no device read.
        session = self._session
        if session is None or batch + 1 - session.last_read_batch < self.read_every:
            return
        with self._lock:
            session = self._session  # checked again: another batch end may have read meanwhile
            if session is not None and batch + 1 - session.last_read_batch >= self.read_every:
                session.last_read_batch = batch + 1
                self._flush()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        with self._lock:
            self._flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        try:
            self._flush(act=False)
        finally:
            self.detach()
            self._session = None
            for on_end in self._end_listeners:
                on_end()

    def detach(self) -> None:
        """Undo the wrapping of ``optimizer.apply`` now (done automatically after ``fit``)."""
        if self._functions is not None:
            self._functions.detach()
        if self._writer is not None:
            self._writer.flush()

    # ----------------------------------------------------------------- helpers
    def _train_functions(self, model: keras.Model, slots: list[Any]) -> GuardedFunctions:
        """The plain and recording train functions of ``model``, reused while they still fit it.

        Keras keeps ``model.train_function`` (and its traced graph) until ``compile()``;
        so does the monitor with its recording twin and the buffer that twin writes.
        A new pair is made only for another model, after ``compile()``, or when the
        buffer must hold more steps between reads.
        """
        plain = plain_function(model)
        steps_per_execution = int(getattr(model, "steps_per_execution", 1) or 1)
        capacity = max(64, 2 * (self.read_every + steps_per_execution))
        paths = [s.path for s in slots]
        functions = self._functions
        if (
            functions is not None
            and functions.serves(model, plain)
            and functions.buffer.paths == paths
            and functions.buffer.capacity >= capacity
        ):
            return functions
        if functions is not None:
            functions.detach()
        if keras.backend.backend() != "tensorflow":
            from gradmagic.core.monitor.stateless import HostBuffer, StatelessFunctions, recorder

            sizes = [int(np.prod(s.shape)) for s in slots]
            histograms = None if self.histogram_every is None else (self.histogram_every, self.histogram_bins)
            buffer = HostBuffer(paths, sizes, capacity, self.stats, recorder().host_array, histograms)
            # As on TensorFlow: kept where the monitor stops training anyway, on one device.
            keep = self.on_anomaly != "warn" and keras.distribution.distribution() is None
            return StatelessFunctions(model, plain, buffer, keep_bad_step=keep)
        from gradmagic.core.monitor.capture import StatsBuffer
        from gradmagic.core.monitor.functions import TrainFunctions

        xla = bool(getattr(model, "jit_compile", False))
        histograms = None if self.histogram_every is None else (self.histogram_every, self.histogram_bins)
        buffer = StatsBuffer(
            paths, capacity, model.distribute_strategy, xla=xla, histograms=histograms, mode=self.stats
        )
        # The bad step's batch and weights (for the NaN/Inf origin) are kept where the
        # monitor stops training anyway; under a strategy each replica has only part of it.
        keep = self.on_anomaly != "warn" and model.distribute_strategy.num_replicas_in_sync == 1
        return TrainFunctions(model, plain, buffer, keep_bad_step=keep)

    def _flush(self, act: bool = True) -> None:
        session = self._session
        if self._history is None or session is None:
            return
        count, rows = session.buffer.read(session.read)
        lost = count - session.read - len(rows)
        if lost > 0:
            warnings.warn(f"GradientMonitor lost {lost} steps (buffer wrapped); lower read_every.", stacklevel=2)
        index = np.arange(count - len(rows), count)
        session.read = count
        if not len(rows):
            return
        steps, batches = session.steps(index), session.batches(index)
        self._history.append(steps, np.full(len(index), session.epoch), batches, rows)
        self._next_step = int(steps[-1]) + 1
        found = self._inspect(steps, batches, rows)
        new_histograms = self._read_histograms(int(index[0]), count)
        self._write_summaries(steps, rows, new_histograms)
        for listener in self._listeners:
            listener(self)
        if found and act:
            self._act(found)
        elif self.on_anomaly == "stop" and not found:
            self._keep_good(int(steps[-1]) + 1)

    def _inspect(self, steps: np.ndarray, batches: np.ndarray, rows: np.ndarray) -> list[Anomaly]:
        """Print and check a block of steps (``rows``: ``[steps, weights, columns]``), vectorized."""
        session = self._session
        if self.print_every:
            out = self.stream or sys.stdout
            for k in np.flatnonzero((batches + 1) % self.print_every == 0):
                lines = layer_lines(session.epoch, int(batches[k]), int(steps[k]), session.slots, rows[k])
                print("\n".join(lines), file=out)
        # A LossScaleOptimizer skips steps with non-finite scaled gradients on purpose
        # (the loss scale drops and training goes on): not anomalies.
        skipped = column(rows, "skipped")[:, 0] > 0
        self.skipped_steps += [int(step) for step in steps[skipped]]
        checked = np.flatnonzero(~skipped)
        per_step: dict[int, list[Anomaly]] = {}
        nonfinite = column(rows[checked], "nan") + column(rows[checked], "inf") > 0
        for k in checked[nonfinite.any(axis=1)]:
            per_step[int(k)] = [self._nonfinite(int(steps[k]), int(batches[k]), rows[k])]
        for j, kind, row, norm in self._tracker.check_steps(column(rows[checked], "norm")):
            k = int(checked[j])
            step, batch, slot = int(steps[k]), int(batches[k]), session.slots[row]
            message = (
                f"{kind.capitalize()} gradient at layer {slot.layer_name!r} (index {slot.layer_index}), weight "
                f"{slot.path!r}, epoch {session.epoch + 1}, batch {batch + 1} (step {step}): norm {norm:.3e}."
            )
            anomaly = Anomaly(
                kind, step, session.epoch, batch, slot.layer_name, slot.layer_index, slot.path, norm, message
            )
            per_step.setdefault(k, []).append(anomaly)
        return [a for k in sorted(per_step) for a in per_step[k]]

    def _nonfinite(self, step: int, batch: int, stats: np.ndarray) -> Anomaly:
        """The anomaly of a step whose statistics hold NaN/Inf counts, located by ``find_nonfinite``
        and, where the step's batch was kept, by the op that made NaN/Inf first."""
        session = self._session
        row, index, layer, suspects, why = find_nonfinite(
            stats, session.slots, session.layer_names, session.layer_types
        )
        nan, inf = int(column(stats, "nan")[row]), int(column(stats, "inf")[row])
        weight, value = session.slots[row].path, float(nan + inf)
        counts = f"weight {weight!r} has {nan} NaN and {inf} Inf gradient entries"
        where = f"at epoch {session.epoch + 1}, batch {batch + 1} (step {step})"
        origin = self._origin(step)
        if origin is not None:
            if origin.layer_index is not None:
                index, layer = origin.layer_index, origin.layer
            message = (
                f"NaN/Inf {where} is first made by {origin.describe()}; {counts}. "
                "gm.explain(model, x, y, sample_weight=w) with x, y, w = monitor.bad_batch shows it again"
                + (" (after monitor.restore_last_good())." if self.on_anomaly == "stop" else ".")
            )
        else:
            message = (
                f"NaN/Inf gradient first appears at layer {layer!r} (index {index}) {where}: {counts}; {why}. "
                "gm.explain(model, x, y) on that batch names the op that makes it"
                + (
                    " (after monitor.restore_last_good(): the weights from before the step)."
                    if self.on_anomaly == "stop"
                    else "."
                )
            )
        return Anomaly("nonfinite", step, session.epoch, batch, layer, index, weight, value, message, suspects, origin)

    @property
    def bad_batch(self) -> tuple[Any, Any, Any] | None:
        """``(x, y, sample_weight)`` of the first step whose gradient went non-finite, or None.

        Kept with ``on_anomaly="stop"`` or ``"raise"`` (not under a distribution
        strategy): ``x, y, w = monitor.bad_batch`` then
        ``gm.explain(model, x, y, sample_weight=w)`` reproduces the step (at the
        weights from before it: ``monitor.bad_step_weights``).
        """
        return self._bad_batch

    @property
    def bad_step_weights(self) -> list[np.ndarray] | None:
        """The trainable weights from before the step of :attr:`bad_batch` (aligned with
        ``model.trainable_variables``), or None."""
        return self._bad_weights

    def _origin(self, step: int) -> Any:
        """The op that made NaN/Inf first in ``step``, from the kept batch and pre-step weights (or None)."""
        capture = self._functions.capture if self._functions is not None else None
        if capture is None or self._bad_batch is not None:
            return None  # not kept in this mode, or a later step of a run that already has its first
        kept = capture.read()
        if kept is None or int(self._session.steps(kept[0])) != step:
            return None
        _, self._bad_batch, self._bad_weights = kept
        from gradmagic.core.monitor.origin import first_origin

        return first_origin(self.model, self._bad_batch, self._bad_weights)

    def _act(self, found: list[Anomaly]) -> None:
        room = _MAX_ANOMALIES - len(self.anomalies)
        self.anomalies += found[: max(room, 0)]
        first = found[0]
        if self.on_anomaly == "raise":
            self.detach()  # on_train_end is not called when a callback raises
            raise GradientAnomalyError(first.message, first)
        if self.on_anomaly == "stop":
            self.model.stop_training = True
            where = f"after {self.last_good_step} optimizer steps" if self.last_good_step is not None else "none"
            warnings.warn(
                f"{first.message} Training stopped; weights of the last good step ({where}) are in "
                "monitor.last_good_weights (monitor.restore_last_good() puts them back).",
                stacklevel=2,
            )
            return
        for anomaly in found:
            key = (anomaly.kind, anomaly.layer)
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(anomaly.message + " (further ones at this layer are recorded silently)", stacklevel=2)

    def _keep_good(self, step: int) -> None:
        # get_weights() already returns fresh host arrays (no view of the variables):
        # copying them again cost a third of this copy, which "stop" makes at every read.
        if keras.backend.backend() == "tensorflow":
            self.last_good_weights = list(self.model.get_weights())
        else:
            from gradmagic.core.monitor.stateless import recorder

            self.last_good_weights = list(recorder().current_weights(self.model))
        self.last_good_step = step

    def _read_histograms(self, first: int, count: int) -> list[GradientHistogram]:
        """Histogram records of the recorded steps in ``[first, count)``, kept in ``self.histograms``."""
        session = self._session
        buffer = session.buffer.histograms
        if buffer is None:
            return []
        kept, counts, ranges = buffer.read(first, count)
        index = np.asarray(kept, np.int64)
        found = histograms_of(
            session.steps(index),
            np.full(len(index), session.epoch),
            session.batches(index),
            counts,
            ranges,
            session.slots,
            session.buffer.missing,
        )
        self.histograms += found
        return found

    def _write_summaries(self, steps: np.ndarray, rows: np.ndarray, histograms: list[GradientHistogram]) -> None:
        if self._writer is None:
            return
        import tensorflow as tf

        from gradmagic.core.backends import tensorflow as backend

        scalar, histogram = backend.summary_metadata("scalars"), backend.summary_metadata("histograms")
        with self._writer.as_default():
            for step, stats in zip(steps, rows, strict=False):
                for slot, values in zip(self._session.slots, stats, strict=False):
                    # tf.summary.write with a plugin's metadata is what tf.summary.scalar
                    # and .histogram do, minus the hard need for the tensorboard package.
                    written = [(f"gradient_norm/{slot.path}", column(values, "norm"))]
                    if column(values, "full") > 0:  # max |g| only where it was measured
                        written.append((f"gradient_max_abs/{slot.path}", column(values, "max_abs")))
                    for tag, value in written:
                        tf.summary.write(tag, tf.constant(value, tf.float32), step=int(step), metadata=scalar)
            for h in histograms:
                # The histogram plugin's format: one (left edge, right edge, count) row per bin.
                buckets = np.stack([h.edges[:-1], h.edges[1:], h.counts], axis=1)
                tf.summary.write(
                    f"gradient/{h.weight}", tf.constant(buckets, tf.float64), step=h.step, metadata=histogram
                )


def _check_backend_options(log_dir: Any) -> None:
    """Refuse, before ``fit``, the options the Keras backend in use cannot serve."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    if log_dir is not None and importlib.util.find_spec("tensorflow") is None:
        # What Keras's own TensorBoard callback does on every backend: write with tf.summary.
        raise MonitorArgumentError(
            f"Received: log_dir={str(log_dir)!r} with Keras on the {backend!r} backend and TensorFlow not "
            "installed. Expected TensorFlow to be importable: TensorBoard files are written with tf.summary "
            "(as Keras's own TensorBoard callback does on every backend). Fix: `pip install tensorflow-cpu`, "
            "or drop log_dir and read monitor.to_dict()."
        )


def _summary_writer(log_dir: str | None) -> Any:
    if log_dir is None:
        return None
    import tensorflow as tf

    return tf.summary.create_file_writer(str(log_dir))


def _empty_columns() -> tuple[str, ...]:
    from gradmagic.core.monitor.history import HISTORY_COLUMNS

    return HISTORY_COLUMNS
