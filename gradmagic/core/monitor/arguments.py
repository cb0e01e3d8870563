"""Checks of GradientMonitor's arguments, made in its constructor (never on the first batch of ``fit``)."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

from gradmagic.core.arguments import is_int
from gradmagic.errors import MonitorArgumentError


def _fail(name: str, value: Any, expected: str, example: str) -> MonitorArgumentError:
    return MonitorArgumentError(
        f"Received: {name}={value!r} ({type(value).__name__}). Expected {expected}. Fix: pass e.g. {example}."
    )


def check_count(name: str, value: Any, allow_none: bool = True) -> None:
    """``value`` is a positive int (a real ``int``, not a bool or a float), or None if allowed."""
    if value is None and allow_none:
        return
    if not is_int(value) or value < 1:
        expected = "a positive int" + (" or None" if allow_none else "")
        raise _fail(name, value, expected, f"{name}=10")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise _fail(name, value, "one of " + ", ".join(repr(c) for c in choices), f"{name}={choices[0]!r}")


def check_positive(name: str, value: Any, allow_none: bool = True, allow_zero: bool = False) -> None:
    """``value`` is a finite real number above 0 (or at least 0), or None if allowed."""
    if value is None and allow_none:
        return
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or not math.isfinite(float(value)) or float(value) < 0 or (float(value) == 0 and not allow_zero):
        bound = "at least 0" if allow_zero else "above 0"
        expected = f"a finite number {bound}" + (" or None (off)" if allow_none else "")
        raise _fail(name, value, expected, f"{name}=100.0")


def check_stream(value: Any) -> None:
    """``value`` is None or a text stream: an object with a callable ``write``."""
    if value is not None and not callable(getattr(value, "write", None)):
        raise _fail("stream", value, "None (sys.stdout) or an object with a write() method", "stream=sys.stderr")


def check_log_dir(value: Any) -> None:
    """``value`` is None or a path where a directory exists or can be created (nothing is created here)."""
    if value is None:
        return
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise _fail("log_dir", value, "None or a directory path (str or pathlib.Path)", "log_dir='logs/gradients'")
    path = os.path.abspath(os.fspath(value))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise MonitorArgumentError(
                f"Received: log_dir={value!r}, which is a file, not a directory. Expected a directory for the "
                "TensorBoard event files. Fix: pass a directory path, e.g. log_dir='logs/gradients'."
            )
        existing = path
    else:
        existing = os.path.dirname(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise MonitorArgumentError(
                f"Received: log_dir={value!r}, which lies under the file {existing!r}, so it cannot be created. "
                "Expected a directory that exists or can be created. Fix: pass another path, e.g. "
                "log_dir='logs/gradients'."
            )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MonitorArgumentError(
            f"Received: log_dir={value!r}; {existing!r} is not writable, so the event files cannot be written. "
            "Expected a writable directory. Fix: pass a path you can write to, e.g. log_dir='logs/gradients'."
        )
