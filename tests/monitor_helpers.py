"""Shared pieces of the monitor tests: data, a weights-before-each-batch probe, a tape truth, models."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def sample_data(n=32, d_in=3, d_out=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d_in)).astype("float32"), rng.normal(size=(n, d_out)).astype("float32")


class WeightsBefore(keras.callbacks.Callback):
    """Keep the trainable weights before every batch (the truth's starting point)."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_begin(self, batch, logs=None):
        self.weights.append([v.numpy().copy() for v in self.model.trainable_variables])


def tape_gradients(model, weights, x, y):
    """Gradients of the batch MSE at `weights`, on a clone: no fit, no optimizer."""
    clone = keras.models.clone_model(model)
    clone.set_weights(weights)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, clone(x, training=True))
    return [g.numpy() for g in tape.gradient(loss, clone.trainable_variables)]


def division_model():
    """d1 -> Lambda dividing by input column 0 (guarded forward, NaN backward) -> out."""
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh", name="d1")(inputs)
    divided = keras.layers.Lambda(lambda t: keras.ops.where(t[1][:, :1] == 0, 0.0, t[0] / t[1][:, :1]), name="divide")(
        [hidden, inputs]
    )
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(divided))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def division_data():
    x, y = sample_data(32, 3, 1)
    x[:, 0] = np.abs(x[:, 0]) + 0.5
    x[20, 0] = 0.0  # batch 2 (0-based) of size 8
    return x, y


def conv_bn_dropout():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


def fit_bytes(build, optimizer, callbacks, shape, n, epochs=1):
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, *shape)).astype("float32"), rng.integers(0, 3, n)
    model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    # Every variable: weights, BatchNorm statistics, optimizer slots, seed generator states.
    return [(v.name, v.numpy().tobytes()) for v in [*model.variables, *model.optimizer.variables]]
