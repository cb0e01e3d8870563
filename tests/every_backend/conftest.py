"""Tests that run on every Keras backend: TensorFlow (in the full suite), JAX and PyTorch.

``python3 dev.py test`` runs this folder once more in a process per other backend
(``KERAS_BACKEND=jax``, ``KERAS_BACKEND=torch``), since Keras fixes its backend at
import. Tests here import no framework at module level: their truth is a
hand-computed value, an analytic derivative or a finite difference in NumPy, or
the framework's own autodiff written out by hand inside the test (see
:func:`backend`).
"""

from __future__ import annotations

import keras
import pytest


@pytest.fixture
def backend() -> str:
    """The Keras backend this process runs on: 'tensorflow', 'jax' or 'torch'."""
    return keras.backend.backend()
