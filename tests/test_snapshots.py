"""values_restored: variables written inside the block get their values back, however the block ends."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradmagic.core.snapshots import values_restored


def test_values_written_in_the_block_are_restored_and_yielded_as_they_were():
    kernel = keras.Variable(np.array([[1.0, 2.0], [3.0, 4.0]], "float32"))
    steps = tf.Variable(7, dtype=tf.int64)
    with values_restored([kernel, steps]) as saved:
        kernel.assign(np.zeros((2, 2), "float32"))
        steps.assign_add(5)
        assert float(kernel.numpy().sum()) == 0.0  # really written inside the block
        np.testing.assert_array_equal(saved[0], [[1.0, 2.0], [3.0, 4.0]])
        assert int(saved[1]) == 7
    np.testing.assert_array_equal(kernel.numpy(), [[1.0, 2.0], [3.0, 4.0]])
    assert int(steps.numpy()) == 7


def test_values_are_restored_when_the_block_raises():
    bias = keras.Variable(np.array([0.5, -0.5], "float32"))
    with pytest.raises(ZeroDivisionError), values_restored([bias]):
        bias.assign(np.array([9.0, 9.0], "float32"))
        1 / 0  # noqa: B018 - the block fails after writing
    np.testing.assert_array_equal(bias.numpy(), [0.5, -0.5])


def test_saved_values_do_not_follow_later_in_place_writes():
    # The snapshot must be a copy, not a view of the variable's buffer.
    weights = tf.Variable(np.ones(4, "float32"))
    with values_restored([weights]) as saved:
        weights.assign_add(np.full(4, 2.0, "float32"))
        weights.scatter_nd_update([[0]], [100.0])
        np.testing.assert_array_equal(saved[0], np.ones(4))
    np.testing.assert_array_equal(weights.numpy(), np.ones(4))


def test_a_model_perturbed_inside_the_block_gives_its_old_outputs_afterwards():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x = np.array([[1.0, -2.0, 0.5]], "float32")
    before = model(x).numpy()
    with values_restored(model.trainable_variables):
        for var in model.trainable_variables:
            var.assign(var.numpy() + 1.0)
        assert not np.allclose(model(x).numpy(), before)
    np.testing.assert_array_equal(model(x).numpy(), before)  # the same eager ops on the same weights
