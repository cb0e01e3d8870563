"""Tests that run on every Keras backend: TensorFlow (in the full suite), JAX and PyTorch.

``python3 dev.py test`` runs this folder once more in a process per other backend
(``KERAS_BACKEND=jax``, ``KERAS_BACKEND=torch``), since Keras fixes its backend at
import. Tests here import no framework at module level: their truth is a
hand-computed value, an analytic derivative or a finite difference in NumPy, or
the framework's own autodiff written out by hand inside the test (see
:func:`backend`).

On PyTorch a question runs eagerly at its first call and as a traced graph from
its second (see ``gradmagic.core.backends.torch.TRACE_FROM_CALL``). Most tests
ask once, so ``dev.py`` runs this folder on PyTorch twice: as users get it, and
with ``GRADMAGIC_TEST_TRACE_FROM_CALL=1``, where every question runs traced.
"""

from __future__ import annotations

import os

import keras
import pytest

if keras.backend.backend() == "torch" and os.environ.get("GRADMAGIC_TEST_TRACE_FROM_CALL"):
    from gradmagic.core.backends import torch as _torch_backend

    _torch_backend.TRACE_FROM_CALL = int(os.environ["GRADMAGIC_TEST_TRACE_FROM_CALL"])


@pytest.fixture
def backend() -> str:
    """The Keras backend this process runs on: 'tensorflow', 'jax' or 'torch'."""
    return keras.backend.backend()
