"""The monitor's own device variables (variables.py): made outside any model, written row by row."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from gradmagic.core.monitor.variables import replica_variable, write_row


def test_replica_variable_is_a_non_trainable_per_replica_copy_outside_any_model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    before = [v.path for v in model.variables]

    variable = replica_variable(tf.zeros([3]), "probe_variable", tf.distribute.get_strategy())
    assert not variable.trainable
    assert variable.synchronization == tf.VariableSynchronization.ON_READ
    assert variable.aggregation == tf.VariableAggregation.ONLY_FIRST_REPLICA
    assert [v.path for v in model.variables] == before  # nothing added to the model
    np.testing.assert_array_equal(variable.numpy(), np.zeros(3))


def test_write_row_sets_one_row_and_leaves_the_others():
    variable = replica_variable(tf.zeros([4, 2, 3]), "probe_rows", tf.distribute.get_strategy())
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(2, 2, 3)).astype("float32")

    @tf.function(autograph=False)
    def write(slot, value):
        write_row(variable, slot, value)

    write(tf.constant(2, tf.int64), rows[0])
    write(tf.constant(0, tf.int64), rows[1])
    want = np.zeros((4, 2, 3), "float32")
    want[2], want[0] = rows[0], rows[1]
    np.testing.assert_array_equal(variable.numpy(), want)  # copies, no arithmetic: exact
