"""Checks of plain arguments (flags, seeds), made where they enter, before anything runs."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradmagic.errors import InputError


def is_flag(value: Any) -> bool:
    """True for ``True`` or ``False`` (Python or NumPy), not for look-alikes such as ``0`` or ``"False"``."""
    return isinstance(value, (bool, np.bool_))


def is_int(value: Any) -> bool:
    """True for an int, Python or NumPy (``np.arange`` gives those), not for a bool, which Python counts as one."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_flag(name: str, value: Any) -> bool:
    """Return ``value`` as a bool if it is one (Python or NumPy); refuse truthy look-alikes.

    Raises:
        InputError: ``value`` is not ``True`` or ``False`` (e.g. the string ``"False"``, which Python reads as true).
    """
    if is_flag(value):
        return bool(value)
    hint = " (a non-empty string is true in Python, even 'False')" if isinstance(value, str) else ""
    raise InputError(
        f"Received: {name}={value!r} of type {type(value).__name__}. Expected True or False{hint}. "
        f"Fix: pass {name}=True or {name}=False."
    )


def check_seed(value: Any) -> int:
    """Return a seed as an int.

    Raises:
        InputError: ``value`` is not a non-negative int.
    """
    if is_int(value) and value >= 0:
        return int(value)
    raise InputError(f"Received: seed={value!r} of type {type(value).__name__}. Expected an int >= 0, e.g. seed=0.")
