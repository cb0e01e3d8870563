"""TrainingPanel: redraws throttled by a time budget (on a fake clock), the last steps drawn at the end."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import mlp

from gradmagic.core.monitor.callback import GradientMonitor
from gradmagic.core.monitor.capture import BUFFER_COLUMNS
from gradmagic.core.monitor.history import MonitorHistory
from gradmagic.core.questions.targets import WeightSlot
from gradmagic.widgets.figure_view import FigureView
from gradmagic.widgets.training_panel import PanelArgumentError, TrainingPanel

PNG = b"\x89PNG\r\n\x1a\n"


class FakeClock:
    """Seconds that move only when a test moves them."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeMonitor:
    """What the panel uses of a GradientMonitor: listeners (with their end hook), params, the history.

    One layer ("dense", kernel and bias); step k has norm 1 + k for both weights.
    """

    def __init__(self) -> None:
        self.params = {"epochs": 1}  # one fit: the same object throughout
        slots = [
            WeightSlot(0, "dense", "dense/kernel", "kernel", (3, 2)),
            WeightSlot(0, "dense", "dense/bias", "bias", (2,)),
        ]
        self.recorded = MonitorHistory(slots)
        self.listeners = []
        self.end_listeners = []
        self.every = None

    def add_listener(self, listener, every=None, on_end=None) -> None:
        self.listeners.append(listener)
        self.every = every
        if on_end is not None:
            self.end_listeners.append(on_end)

    def on_train_end(self, logs=None) -> None:
        for on_end in self.end_listeners:
            on_end()

    def read(self, n: int = 1) -> None:
        """Record ``n`` new steps and call the listeners, as the monitor does after a read."""
        steps = np.arange(len(self.recorded), len(self.recorded) + n)
        stats = np.zeros((n, 2, len(BUFFER_COLUMNS)))
        stats[:, :, BUFFER_COLUMNS.index("norm")] = 1.0 + steps[:, None]
        self.recorded.append(steps, np.zeros(n, np.int64), steps, stats)
        for listener in self.listeners:
            listener(self)


def _draws_taking(panel: TrainingPanel, clock: FakeClock, seconds: float) -> list[float]:
    """Make each repaint take ``seconds`` of fake time; return the list of repaint start times."""
    starts: list[float] = []

    def show(background_changed: bool) -> None:
        starts.append(clock.now)
        clock.now += seconds

    panel.view.show = show
    return starts


def _data(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)).astype("float32"), rng.normal(size=(n, 2)).astype("float32")


def test_redraws_are_min_interval_apart_and_every_steps_apart():
    clock, monitor = FakeClock(), FakeMonitor()
    # Free redraws and no fraction limit: only min_interval holds redraws back.
    panel = TrainingPanel(monitor, every=1, use_ipympl=False, max_fraction=1.0, min_interval=0.25, clock=clock)
    starts = _draws_taking(panel, clock, 0.0)
    for k in range(100):  # one step read every 0.1 s
        clock.now = k / 10
        monitor.read()
    # Reads come at 0.0, 0.1, 0.2...: the first one 0.25 s after a redraw is 0.3 s after it.
    assert starts == pytest.approx([0.3 * k for k in range(34)])
    assert panel.redraws == 34 and panel.axes.get_lines()[0].get_xdata()[-1] == 99

    clock, monitor = FakeClock(), FakeMonitor()
    panel = TrainingPanel(monitor, every=5, use_ipympl=False, max_fraction=1.0, min_interval=0.0, clock=clock)
    starts = _draws_taking(panel, clock, 0.0)
    for k in range(100):
        clock.now = k / 10
        monitor.read()
    assert starts == pytest.approx([0.4 + 0.5 * k for k in range(20)])  # every 5th step, from the 5th


@pytest.mark.parametrize("seconds", [0.01, 0.05, 0.2])
def test_time_spent_redrawing_stays_within_max_fraction(seconds, monkeypatch):
    clock, monitor = FakeClock(), FakeMonitor()
    starts: list[float] = []

    def show(view, background_changed: bool) -> None:
        starts.append(clock.now)
        clock.now += seconds

    # Every draw takes `seconds`, also the one the panel makes when built (outside fit).
    monkeypatch.setattr(FigureView, "show", show)
    panel = TrainingPanel(monitor, every=1, use_ipympl=False, clock=clock)  # max_fraction=0.03, min_interval=0.25
    assert len(starts) == 1 and panel.redraws == 0
    starts.clear()
    clock.now = 0.0  # fit starts
    for _ in range(5000):  # 100 s of training, a step read every 20 ms (redraws add to that)
        before = len(starts)
        monitor.read()
        if len(starts) > before:  # every redraw during fit is one the budget allowed
            assert len(starts) * seconds <= 0.03 * clock.now
        clock.now += 0.02
    assert len(starts) * seconds > 0.02 * clock.now  # the budget is used, not just kept
    monitor.on_train_end()
    # The final redraw was kept room for: with it, still within 3% of the time since the first read.
    assert panel.axes.get_lines()[0].get_xdata()[-1] == 4999
    assert len(starts) * seconds <= 0.03 * clock.now
    assert panel.status.value == ""


def test_finish_draws_the_steps_the_budget_held_back():
    clock, monitor = FakeClock(), FakeMonitor()  # the clock stands still: min_interval never passes
    panel = TrainingPanel(monitor, every=1, use_ipympl=False, clock=clock)
    for _ in range(10):
        monitor.read()
    (line,) = panel.axes.get_lines()
    assert panel.redraws == 1 and list(line.get_xdata()) == [0]

    panel.finish()
    assert panel.redraws == 2 and list(line.get_xdata()) == list(range(10))
    # The layer norm of step k: kernel and bias both have norm 1 + k.
    np.testing.assert_allclose(line.get_ydata(), np.sqrt(2) * (1 + np.arange(10)))
    assert panel.image.value[:8] == PNG and panel.status.value == ""
    panel.finish()  # nothing new to show
    assert panel.redraws == 2

    monitor.read()
    assert panel.redraws == 2  # still held back
    panel.update()  # update() redraws whatever the budget says
    assert panel.redraws == 3 and line.get_xdata()[-1] == 10


def test_fit_ends_with_the_last_recorded_step_drawn():
    model, (x, y) = mlp((3, 4, 2)), _data(40)
    monitor = GradientMonitor(read_every=1)
    clock = FakeClock()  # stands still: during fit only the first read is drawn
    panel = TrainingPanel(monitor, every=1, use_ipympl=False, clock=clock)
    at_epoch_end: list[tuple[int, int]] = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            at_epoch_end.append((panel.redraws, len(panel.axes.get_lines()[0].get_xdata())))

    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[monitor, Probe()])
    assert at_epoch_end == [(1, 1), (1, 1)]
    steps = monitor.recorded.steps
    lines = panel.axes.get_lines()
    assert len(steps) == 10 and panel.redraws == 2
    assert [ln.get_label() for ln in lines] == [layer.name for layer in model.layers]
    for line in lines:
        np.testing.assert_array_equal(line.get_xdata(), steps)
    assert panel.image.value[:8] == PNG and panel.status.value == ""

    # A second fit opens a new time budget: its first read is drawn at once again.
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor, Probe()])
    assert at_epoch_end[-1] == (3, 11) and panel.redraws == 4
    assert lines[0].get_xdata()[-1] == monitor.recorded.steps[-1] == steps[-1] + 5


def test_a_monitor_reused_with_another_model_is_drawn_afresh():
    monitor = GradientMonitor(read_every=1)
    clock = FakeClock()  # stands still: during each fit only its first read is drawn
    panel = TrainingPanel(monitor, every=1, use_ipympl=False, clock=clock)
    first, (x, y) = mlp((3, 4, 2)), _data(40)
    first.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
    assert panel.redraws == 2 and len(panel.axes.get_lines()[0].get_xdata()) == 10

    # Other weights: the monitor starts a new (shorter) history, and the panel follows it
    # rather than waiting for it to outgrow the 10 steps it drew of the first one.
    second = mlp((3, 5, 5, 2))
    second.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    lines = panel.axes.get_lines()
    assert panel.redraws == 4  # the new fit's first read, then its end
    assert [ln.get_label() for ln in lines] == [layer.name for layer in second.layers]
    assert [t.get_text() for t in panel.axes.get_legend().get_texts()] == [layer.name for layer in second.layers]
    for line in lines:
        np.testing.assert_array_equal(line.get_xdata(), monitor.recorded.steps)
    assert len(monitor.recorded) == 5


@pytest.mark.parametrize("options", [{"max_fraction": 0.0}, {"max_fraction": 1.5}, {"min_interval": -1.0}])
def test_invalid_budget_is_refused(options):
    with pytest.raises(PanelArgumentError, match="Expected 0 < max_fraction <= 1 and min_interval >= 0"):
        TrainingPanel(FakeMonitor(), use_ipympl=False, **options)


@pytest.mark.parametrize("monitor", ["not a monitor", None, 3])
def test_not_a_monitor_is_refused_clearly(monitor):
    import gradmagic as gm

    with pytest.raises(gm.GradmagicError, match=r"Received: monitor=.*Expected a gm\.GradientMonitor"):
        gm.training_panel(monitor)


@pytest.mark.parametrize(
    ("name", "value"), [("every", 0), ("every", "10"), ("max_layers", -1), ("log_scale", "yes"), ("use_ipympl", 1)]
)
def test_bad_panel_arguments_are_refused(name, value):
    with pytest.raises(PanelArgumentError, match=rf"Received: .*{name}="):
        TrainingPanel(GradientMonitor(), **{"use_ipympl": False, name: value})


def test_a_failed_redraw_is_shown_escaped_in_the_panel(monkeypatch):
    clock, monitor = FakeClock(), FakeMonitor()
    panel = TrainingPanel(monitor, every=1, use_ipympl=False, max_fraction=1.0, min_interval=0.0, clock=clock)

    def broken(view, background_changed: bool) -> None:
        raise ValueError("in <lambda>: x & y")

    monkeypatch.setattr(FigureView, "show", broken)
    monitor.read()  # training goes on; the error is shown, never swallowed
    assert "ValueError: in &lt;lambda&gt;: x &amp; y" in panel.status.value
