"""Coalesce fast control events: the latest value wins, none queue up.

Slider events can arrive faster than the kernel computes and draws. Rendering
each one would build a queue the user watches drain; instead every event only
stores its value, and one render runs when the event loop is next free,
with whatever value is latest by then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

#: ``schedule(delay_seconds, callback)``: run callback later (returns nothing).
Scheduler = Callable[[float, Callable[[], None]], Any]

_NOTHING = object()


def _event_loop_scheduler() -> Scheduler | None:
    """Schedule on the running asyncio loop (the kernel's), or None outside one."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop.call_later


class LatestWins:
    """Run ``render(value)`` for the latest submitted value, at most every ``interval``.

    Args:
        render: Called with a value; its exceptions propagate to ``on_error``.
        interval: Minimum seconds between two renders. Defaults to 0.0 (as soon as
            the event loop is free).
        clock: Seconds, monotonic. Defaults to ``time.monotonic`` (tests inject one).
        scheduler: Runs a callback later. Defaults to the running asyncio loop;
            with none (a plain script or test) renders run synchronously.
        on_error: Receives exceptions raised by ``render``. Defaults to re-raising.
    """

    def __init__(
        self,
        render: Callable[[Any], None],
        interval: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        scheduler: Scheduler | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._render = render
        self.interval = interval
        self._clock = clock
        self._scheduler = scheduler
        self._on_error = on_error
        self._pending: Any = _NOTHING
        self._scheduled = False
        self._last = -float("inf")
        self.renders = 0

    def submit(self, value: Any) -> None:
        """Record ``value`` as the latest; make sure one render will pick it up."""
        self._pending = value
        if self._scheduled:
            return
        scheduler = self._scheduler or _event_loop_scheduler()
        if scheduler is None:
            self.flush()
            return
        self._scheduled = True
        wait = max(0.0, self._last + self.interval - self._clock())
        scheduler(wait, self._fire)

    def _fire(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Render the latest value now, if one is waiting."""
        value, self._pending = self._pending, _NOTHING
        if value is _NOTHING:
            return
        self._last = self._clock()
        self.renders += 1
        try:
            self._render(value)
        except Exception as exc:
            if self._on_error is None:
                raise
            self._on_error(exc)
