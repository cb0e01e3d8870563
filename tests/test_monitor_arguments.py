"""GradientMonitor's arguments are checked in its constructor, with house-style messages."""

from __future__ import annotations

import sys

import pytest

from gradmagic.core.monitor.callback import GradientMonitor, MonitorArgumentError
from gradmagic.errors import GradmagicError


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("on_anomaly", "explode"),
        ("on_anomaly", None),
        ("print_every", 0),
        ("print_every", True),
        ("read_every", 1.5),
        ("full_every", 0),
        ("histogram_every", -3),
        ("histogram_bins", 0),
        ("histogram_bins", None),
        ("window", -1),
        ("window", 2.5),
        ("explode_factor", "big"),
        ("explode_factor", -1.0),
        ("explode_factor", float("nan")),
        ("explode_threshold", float("inf")),
        ("vanish_threshold", True),
        ("stats", "fast"),
        ("stream", "stdout"),
        ("log_dir", 123),
        ("log_dir", ""),
    ],
)
def test_bad_arguments_fail_in_the_constructor(name, value):
    with pytest.raises(MonitorArgumentError, match=f"Received: {name}=") as info:
        GradientMonitor(**{name: value})
    assert isinstance(info.value, GradmagicError) and "Expected" in str(info.value) and "Fix" in str(info.value)


def test_log_dir_that_cannot_be_created_fails_in_the_constructor(tmp_path):
    regular = tmp_path / "a_file"
    regular.write_text("not a directory")
    for log_dir in (regular / "logs", regular):
        with pytest.raises(MonitorArgumentError, match="Received: log_dir=") as info:
            GradientMonitor(log_dir=str(log_dir))
        assert str(regular) in str(info.value)
    # A path that does not exist yet is fine (and is not created before fit).
    GradientMonitor(log_dir=tmp_path / "new" / "logs")
    assert not (tmp_path / "new").exists()


def test_good_arguments_are_accepted():
    monitor = GradientMonitor(
        5,
        "stop",
        None,
        stats="full",
        full_every=3,
        window=1,
        explode_factor=2,
        vanish_threshold=1e-8,
        stream=sys.stderr,
    )
    assert (monitor.print_every, monitor.on_anomaly, monitor.stats, monitor.full_every) == (5, "stop", "full", 3)


def test_argument_checks_accept_exactly_their_domain():
    import io
    import re

    from gradmagic.core.monitor.arguments import check_choice, check_count, check_positive, check_stream

    check_count("n", None)
    check_count("n", 1)
    for bad in (0, -2, True, 1.0, "3"):
        with pytest.raises(MonitorArgumentError, match=re.escape(f"Received: n={bad!r} ({type(bad).__name__})")):
            check_count("n", bad)
    with pytest.raises(MonitorArgumentError, match=re.escape("Expected a positive int. Fix: pass e.g. n=10.")):
        check_count("n", None, allow_none=False)
    check_positive("f", 0.0, allow_zero=True)
    check_positive("f", 1e-30)
    for bad in (0.0, -1e-30, float("inf"), False):
        with pytest.raises(MonitorArgumentError, match="Received: f="):
            check_positive("f", bad)
    check_choice("mode", "b", ("a", "b"))
    with pytest.raises(MonitorArgumentError, match=re.escape("Expected one of 'a', 'b'. Fix: pass e.g. mode='a'.")):
        check_choice("mode", "c", ("a", "b"))
    check_stream(io.StringIO())
    with pytest.raises(MonitorArgumentError, match="Received: stream="):
        check_stream(object())
