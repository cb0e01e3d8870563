"""Per-weight gradient statistics in few graph ops, traced into the train step.

The monitor computes these for every weight at every step. On a CPU the cost is
memory traffic: each statistic is one pass over every gradient (about 1.7% of a
step per pass for an MLP with Adam), so the ops are chosen to read as little as
possible and to add little to the first trace:

* Each statistic is one reduction that only reads: the squared norm is a fused
  ``L2Loss``/``EuclideanNorm`` and max |g| is ``max(max g, -min g)``; nothing the
  size of a gradient is written.
* When the optimizer squares the gradient anyway (Adam, RMSprop, Adagrad...),
  its ``g**2`` tensor is reused: sum and max of ``g**2`` give the norm and max |g|
  in two passes instead of three.
* A CPU reduction over more than about 65k floats is sharded over the intra-op
  thread pool, whose wake-up costs more than the arithmetic; below that a sum
  runs inline in a few microseconds. A large gradient is therefore viewed
  (reshaped, no copy) as a few rows of at most :data:`INLINE_ELEMENTS` entries,
  reduced row-wise. A max costs about twice a sum and is still sharded at that
  size; inside a train step it waits for threads busy with the optimizer, which
  makes it the largest single cost of the monitor (measured with TensorFlow's
  profiler; smaller slices only add ops).
* The graph records the sum rather than the mean, and the host divides
  (:func:`finish_stats`), which keeps per-step ops few.
* NaN and Inf counts are needed only when a raw statistic is not finite (or
  a square left float32's range); they are computed, exactly in float64, in a
  ``tf.cond`` branch that calls a separate (not inlined) function, built and
  optimized only if a step ever takes it.
* The default mode (``stats="norm"``) measures per step only :func:`half_squares`
  (one reduction per weight); :func:`exact_halves` says when those are not to be
  trusted, and the step then measures everything with :func:`step_stats`.
* :func:`stats_function` caches the traced ``tf.function`` per gradient
  signature, so the Python tracing is paid once per process, not per ``fit``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from gradmagic.core.backends import tensorflow as backend
from gradmagic.core.monitor.columns import raw_row
from gradmagic.core.monitor.finish import finish_stats, square_floors  # noqa: F401 - importable from here too

#: Largest reduction (in entries) that TensorFlow's CPU kernels still run inline.
INLINE_ELEMENTS = 1 << 16
_MAX_ROWS_FACTOR = 4  # look for a row count up to this multiple of the minimum
_ALIGN = 16  # flat slice starts in entries: 64 bytes, so slices share the buffer
_CACHE_SIZE = 64


@tf.autograph.experimental.do_not_convert
def step_stats(
    grads: Sequence[tf.Tensor], squares: Sequence[tf.Tensor | None] | None = None, xla: bool = False
) -> tf.Tensor:
    """Raw statistics of each gradient as a ``[5, len(grads)]`` float32 tensor.

    Rows are ``RAW_ROWS`` (:mod:`~gradmagic.core.monitor.columns`); :func:`finish_stats`
    turns them into ``STAT_COLUMNS`` on the host. Call it where the ops should go (eagerly,
    or while tracing); :func:`stats_function` wraps it in a cached ``tf.function``.

    Args:
        grads: Dense gradients (any float dtype, static or dynamic shapes).
        squares: Optional float32 ``g**2`` per gradient (None where unknown), e.g.
            the tensors the optimizer computes; they save one pass each.
            Defaults to None.
        xla: Whether the ops will be compiled by XLA (which fuses reductions and
            lacks some of the kernels used otherwise). Defaults to False.

    Returns:
        The raw statistics, one column per gradient.
    """
    grads = [tf.cast(g, tf.float32) for g in grads]
    squares = list(squares) if squares is not None else [None] * len(grads)
    sizes = [g.shape.num_elements() for g in grads]
    if any(size is None for size in sizes):
        return _masked_stats(grads)  # dynamic shapes: the general (slower) path only
    raw = _fast_stats(grads, squares, sizes, xla)
    masked = _masked_function(tuple(tf.TensorSpec(g.shape, g.dtype) for g in grads))
    # A NaN makes the sum NaN, an Inf (or a square above float32's range) the norm Inf;
    # squares below its range (|g| < 1e-19) are flushed to 0, so a small norm may be too
    # small or 0 while the sum or max is not (see square_floors). The masked path is exact
    # in all three cases (float64 sums).
    total, norm, peak = raw_row(raw, "sum"), raw_row(raw, "norm"), raw_row(raw, "max_abs")
    small = norm < tf.constant(np.sqrt(square_floors(sizes)), tf.float32)
    underflow = tf.reduce_any(small & ((total != 0.0) | (peak != 0.0)))
    trusted = tf.reduce_all(tf.math.is_finite(raw)) & tf.logical_not(underflow)
    return tf.cond(trusted, lambda: raw, lambda: masked(*grads))


def half_squares(
    grads: Sequence[tf.Tensor | None], sizes: Sequence[int], xla: bool = False, parts: bool = False
) -> tf.Tensor | list[tf.Tensor]:
    """Half the sum of squares of each gradient (what ``L2Loss`` gives), ``[len(grads)]`` float32.

    One reduction per gradient: the default mode's whole per-step measurement. A
    NaN or Inf anywhere makes that half sum non-finite (see :func:`exact_halves`).

    Args:
        grads: Dense gradients (any float dtype; None gives 0, for a weight without one).
        sizes: Number of entries of each gradient (from its variable, known when its shape is not).
        xla: Whether the ops will be compiled by XLA. Defaults to False.
        parts: Return the scalar of each gradient instead of their stack. Defaults to False.
    """
    reduce = _Reducer(xla)
    zero = tf.constant(0.0)
    halves = []
    for grad, size in zip(grads, sizes, strict=True):
        if grad is None or size == 0:
            halves.append(zero)
        elif grad.shape.num_elements() is None:  # dynamic shape: no row view, one plain reduction
            halves.append(tf.nn.l2_loss(tf.cast(grad, tf.float32)))
        else:
            halves.append(reduce.sumsq(tf.cast(grad, tf.float32), size, half=True))
    return halves if parts else tf.stack(halves)


def exact_halves(halves: tf.Tensor, sizes: Sequence[int]) -> tf.Tensor:
    """Scalar bool: every half sum of squares is finite and exact to float32's precision.

    Each must lie within ``[floor / 2, max / 2]`` (the sum within ``[floor, max]``,
    :func:`square_floors`): then clipping leaves it unchanged. NaN equals nothing,
    Inf is clipped, and a sum below its floor may have lost squares to underflow
    (an exactly-zero gradient cannot be told from that: it fails too). Where this is
    false, :func:`step_stats` is exact (float64 on the finite entries).

    Args:
        halves: Half sums of squares, as :func:`half_squares` gives.
        sizes: Number of entries of each gradient (0 for a weight without one).
    """
    low = tf.constant(square_floors(sizes) / 2, tf.float32)
    high = tf.constant(np.finfo(np.float32).max / 2, tf.float32)
    clipped = tf.raw_ops.ClipByValue(t=halves, clip_value_min=low, clip_value_max=high)
    return tf.reduce_all(tf.equal(clipped, halves))


def stats_function(
    specs: Sequence[tf.TensorSpec], squared: Sequence[bool] | None = None, xla: bool = False
) -> Callable[..., tf.Tensor]:
    """:func:`step_stats` as a ``tf.function``, made once per gradient signature and process.

    Calling it while a train step is traced adds one call op, which TensorFlow
    inlines: the step runs the same ops as with :func:`step_stats`, but their
    Python tracing is paid once per signature rather than on every trace of
    every ``fit``.

    Args:
        specs: Shape and dtype of each gradient.
        squared: For each gradient, whether its ``g**2`` is passed too (after all
            gradients, in order). Defaults to None (none is).
        xla: Whether the calling function is compiled by XLA. Defaults to False.

    Returns:
        A function of the gradients, then the squares given, returning the statistics.
    """
    specs = list(specs)
    squared = [bool(s) for s in squared] if squared is not None else [False] * len(specs)
    extra = [tf.TensorSpec(s.shape, tf.float32) for s, q in zip(specs, squared, strict=True) if q]

    def body(*tensors: tf.Tensor) -> tf.Tensor:
        given = iter(tensors[len(specs) :])
        return step_stats(tensors[: len(specs)], [next(given) if q else None for q in squared], xla)

    return _cached(_STATS, specs + extra, body, False, (tuple(squared), xla))


def _masked_function(specs: tuple[tf.TensorSpec, ...]) -> Callable[..., tf.Tensor]:
    # Not inlined: the call is instantiated (optimized, compiled) only if a step
    # ever takes the non-finite branch, not with every train function.
    return _cached(_MASKED, specs, lambda *grads: _masked_stats(list(grads)), True, None)


# The traced statistics functions, one cache per variant (policy: see _cached).
# _STATS: stats_function's (inlined where it is called); _MASKED: the not-inlined
# non-finite branch of step_stats.
_STATS: dict[tuple, Callable[..., tf.Tensor]] = {}
_MASKED: dict[tuple, Callable[..., tf.Tensor]] = {}


def _cached(
    cache: dict, specs: Sequence[tf.TensorSpec], body: Callable, not_inlined: bool, flags: object
) -> Callable[..., tf.Tensor]:
    """The ``tf.function`` of ``body`` for ``specs`` and ``flags`` from ``cache``, made on a miss.

    Cache policy (``_STATS``, ``_MASKED``): one entry per gradient
    signature (shapes, dtypes) and variant flags, for the whole process. Keys hold
    no model, variable or tensor, so a cache keeps no model alive, and every model
    whose gradients have the same shapes reuses the traced function (Python tracing
    is paid once per process, not per ``fit``). At most ``_CACHE_SIZE`` entries per
    cache; when full, the oldest entry is dropped (first in, first out). Nothing is
    ever invalidated: an entry depends on nothing but its key.
    """
    specs = tuple(specs)
    key = (tuple((None if s.shape.rank is None else tuple(s.shape.as_list()), s.dtype.name) for s in specs), flags)
    function = cache.get(key)
    if function is None:
        if len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))  # the oldest
        if not_inlined:
            function = backend.not_inlined_function(body, specs)
        else:
            function = tf.function(body, input_signature=specs, autograph=False)
        cache[key] = function
    return function


def _fast_stats(grads: list[tf.Tensor], squares: list[tf.Tensor | None], sizes: list[int], xla: bool) -> tf.Tensor:
    """Raw statistics ``[5, n]``, valid when every entry is finite (NaN/Inf rows are 0)."""
    reduce = _Reducer(xla)
    total, sumsq, peak = [], [], []  # peak: max g**2 where the square is given, else max |g|
    zero = tf.constant(0.0)
    for grad, square, size in zip(grads, squares, sizes, strict=True):
        if size == 0:  # finish_stats reports no finite entry
            total.append(zero), sumsq.append(zero), peak.append(zero)
            continue
        total.append(reduce(tf.reduce_sum, grad, size))
        if square is not None:
            sumsq.append(reduce(tf.reduce_sum, square, size))
            peak.append(reduce(tf.reduce_max, square, size))
        else:
            sumsq.append(reduce.sumsq(grad, size))
            peak.append(tf.maximum(reduce(tf.reduce_max, grad, size), -reduce(tf.reduce_min, grad, size)))
    n = len(grads)
    # One pack of every scalar, one square root and one select for all: few ops per step.
    sums = tf.reshape(tf.stack(total + sumsq + peak), [3, n])
    rooted = np.zeros((3, n), bool)
    rooted[1] = True
    rooted[2] = [square is not None for square in squares]
    # A square that overflows gives an Inf norm here: tf.cond then takes the exact float64 path.
    return tf.concat([tf.where(rooted, tf.sqrt(sums), sums), tf.zeros([2, n])], 0)


class _Reducer:
    """Full reductions that stay inline: row-wise over a few rows for large tensors.

    Axis constants are shared, which keeps the traced graph (and the time
    TensorFlow spends optimizing it) small.
    """

    def __init__(self, xla: bool) -> None:
        self._xla = xla
        self._axes: dict[tuple[int, ...], tf.Tensor] = {}

    def _axis(self, *axes: int) -> tf.Tensor:
        if axes not in self._axes:
            self._axes[axes] = tf.constant(axes, tf.int32)
        return self._axes[axes]

    def __call__(self, op: Callable[..., tf.Tensor], x: tf.Tensor, size: int) -> tf.Tensor:
        """``op`` (a ``tf.reduce_*``) over all entries of ``x``, which has ``size`` entries."""
        if size <= INLINE_ELEMENTS or self._xla:
            return op(x, self._axis(*range(x.shape.rank)))
        rows = _rows(size)
        if rows is not None:
            return op(op(tf.reshape(x, [rows, size // rows]), self._axis(1)), self._axis(0))
        return op(tf.stack([op(part, self._axis(0)) for part in _slices(x, size)]), self._axis(0))

    def sumsq(self, x: tf.Tensor, size: int, half: bool = False) -> tf.Tensor:
        """Sum of squares of the entries of ``x`` (half of it with ``half``), without writing the squares."""
        if size <= INLINE_ELEMENTS or self._xla:
            halved = tf.nn.l2_loss(x)  # XLA lacks EuclideanNorm and fuses this anyway
        else:
            rows = _rows(size)
            if rows is not None:
                norms = tf.math.reduce_euclidean_norm(tf.reshape(x, [rows, size // rows]), self._axis(1))
                halved = tf.nn.l2_loss(norms)
            else:
                halved = tf.add_n([tf.nn.l2_loss(part) for part in _slices(x, size)])
        return halved if half else 2.0 * halved


def _rows(size: int) -> int | None:
    """A row count that divides ``size`` into rows of at most INLINE_ELEMENTS, if a small one does."""
    least = -(-size // INLINE_ELEMENTS)
    return next((k for k in range(least, _MAX_ROWS_FACTOR * least + 1) if size % k == 0), None)


def _slices(x: tf.Tensor, size: int) -> list[tf.Tensor]:
    """Aligned flat slices (sharing ``x``'s buffer) for sizes with no small row count, e.g. primes."""
    flat = tf.reshape(x, [-1])
    step = -(-size // -(-size // INLINE_ELEMENTS))
    step = -(-step // _ALIGN) * _ALIGN
    return [flat[start : start + step] for start in range(0, size, step)]


def _masked_stats(grads: list[tf.Tensor]) -> tf.Tensor:
    """Statistics of the finite entries, with NaN/Inf counts, for all gradients at once."""
    n = len(grads)
    flat_shape = tf.constant([-1], tf.int32)
    flat = tf.concat([tf.reshape(g, flat_shape) for g in grads], 0)
    sizes = [g.shape.num_elements() for g in grads]
    if None in sizes:
        counts = tf.stack([tf.size(g) for g in grads])
        starts = tf.cumsum(counts, exclusive=True)[1:, None]
    else:
        counts = tf.constant(sizes, tf.int32)
        starts = tf.constant(np.cumsum(sizes)[:-1, None], tf.int32)
    # Segment id of each entry: a cumulative sum of markers where each gradient starts.
    ids = tf.cumsum(tf.scatter_nd(starts, tf.ones_like(starts[:, 0]), tf.shape(flat)))
    finite = tf.math.is_finite(flat)
    values = tf.where(finite, flat, 0.0)
    # float64 sums: a segment sum adds sequentially, and this path is rare enough to afford it.
    wide = tf.cast(values, tf.float64)
    counted = tf.stack([tf.cast(finite, tf.float64), tf.cast(tf.math.is_nan(flat), tf.float64), wide, wide * wide], 1)
    n_finite, nan, total, sumsq = tf.unstack(tf.math.unsorted_segment_sum(counted, ids, n), axis=1)
    max_abs = tf.math.unsorted_segment_max(tf.abs(values), ids, n)
    # No finite entry: unsorted_segment_max gives the lowest float; finish_stats reports NaN anyway.
    max_abs = tf.where(n_finite > 0, max_abs, 0.0)
    inf = tf.cast(counts, tf.float64) - n_finite - nan
    # The root is taken in float64: a norm above 1.8e19 still fits float32, its square does not.
    wide_rows = [total, tf.sqrt(sumsq)], [nan, inf]
    return tf.stack(
        [*(tf.cast(r, tf.float32) for r in wide_rows[0]), max_abs, *(tf.cast(r, tf.float32) for r in wide_rows[1])]
    )
