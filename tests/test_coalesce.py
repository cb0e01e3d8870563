"""LatestWins: fast control events coalesce into one render of the latest value."""

from __future__ import annotations

import asyncio

import pytest

from gradmagic.widgets.coalesce import LatestWins


def test_latest_value_wins_with_an_injected_clock_and_scheduler():
    now = [0.0]
    scheduled = []
    rendered = []
    coalescer = LatestWins(
        rendered.append, interval=0.05, clock=lambda: now[0], scheduler=lambda d, f: scheduled.append((d, f))
    )
    for value in range(10):  # ten slider events before the kernel is free
        coalescer.submit(value)
    assert len(scheduled) == 1 and rendered == []
    delay, fire = scheduled.pop()
    assert delay == 0.0
    fire()
    assert rendered == [9]
    now[0] = 0.01  # within the interval: the next render waits for the rest of it
    coalescer.submit(10)
    coalescer.submit(11)
    ((delay, fire),) = scheduled
    assert delay == pytest.approx(0.04)
    fire()
    assert rendered == [9, 11] and coalescer.renders == 2


def test_without_an_event_loop_every_value_renders_at_once():
    rendered = []
    coalescer = LatestWins(rendered.append)
    for value in ("a", "b", "c"):
        coalescer.submit(value)
        assert rendered[-1] == value  # a plain script or test: nothing to coalesce against
    assert coalescer.renders == 3


def test_on_the_running_event_loop_intermediate_values_are_dropped():
    rendered = []

    async def burst():
        coalescer = LatestWins(rendered.append)
        for value in range(5):  # five events while the loop is busy running this coroutine
            coalescer.submit(value)
        assert rendered == []
        await asyncio.sleep(0.01)  # the render was scheduled with no delay: due before this sleep ends
        coalescer.submit(5)
        await asyncio.sleep(0.01)
        return coalescer.renders

    assert asyncio.run(burst()) == 2
    assert rendered == [4, 5]


def test_flush_renders_the_pending_value_once_and_then_nothing():
    scheduled, rendered = [], []
    coalescer = LatestWins(rendered.append, scheduler=lambda d, f: scheduled.append(f))
    coalescer.submit(1)
    coalescer.submit(2)
    coalescer.flush()
    coalescer.flush()
    assert rendered == [2]
    scheduled.pop()()  # the scheduled render finds nothing left to do
    assert rendered == [2] and coalescer.renders == 1


def test_render_errors_go_to_on_error_and_the_next_value_still_renders():
    errors, rendered = [], []

    def render(value):
        if value < 0:
            raise ValueError(f"bad {value}")
        rendered.append(value)

    coalescer = LatestWins(render, on_error=errors.append)
    coalescer.submit(-1)
    coalescer.submit(3)
    assert [str(e) for e in errors] == ["bad -1"] and rendered == [3]


def test_render_errors_propagate_without_on_error():
    def render(value):
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        LatestWins(render).submit(1)
