"""Small ready-made models and data for tutorials, tests and benchmarks.

The regression net is the classic question's model: a 1-64-32-32-1 network
fitted to y = (x - 5)^2 / 25 on [0, 10], whose input derivative should come out
near the analytic 2 (x - 5) / 25.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def regression_data(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x, y)`` with x uniform on [0, 10] and y = (x - 5)^2 / 25, shapes (n, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 10.0, size=(n, 1)).astype("float32")
    return x, regression_target(x)


def regression_target(x: Any) -> np.ndarray:
    """The function the regression net learns: (x - 5)^2 / 25."""
    return ((np.asarray(x, dtype="float32") - 5.0) ** 2 / 25.0).astype("float32")


def regression_slope(x: Any) -> np.ndarray:
    """The analytic derivative of :func:`regression_target`: 2 (x - 5) / 25."""
    return (2.0 * (np.asarray(x, dtype="float32") - 5.0) / 25.0).astype("float32")


def regression_net(seed: int = 1, activation: str = "tanh") -> Any:
    """Build (and compile, Adam + MSE) the 1-64-32-32-1 regression net.

    Args:
        seed: Seed of the weight initialisers, for reproducible nets.
        activation: Activation of the hidden layers. Defaults to ``"tanh"``
            (smooth, so its derivative is smooth too).

    Returns:
        A compiled ``keras.Sequential`` model with an ``Input`` of shape (1,).
    """
    import keras

    init = keras.initializers.GlorotUniform
    model = keras.Sequential(
        [
            keras.Input((1,), name="x"),
            keras.layers.Dense(64, activation=activation, kernel_initializer=init(seed), name="hidden_1"),
            keras.layers.Dense(32, activation=activation, kernel_initializer=init(seed + 1), name="hidden_2"),
            keras.layers.Dense(32, activation=activation, kernel_initializer=init(seed + 2), name="hidden_3"),
            keras.layers.Dense(1, kernel_initializer=init(seed + 3), name="y"),
        ],
        name="regression_net",
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model
