"""The monitor's own device variables: ring buffers that replicas write, the host reads.

Used by the statistics buffer and the histogram buffer alike. The variables are
plain ``tf.Variable`` objects created outside any Keras model, so they are not
model variables, are never saved with the model and never touched by the optimizer.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf


def replica_variable(initial: tf.Tensor, name: str, strategy: Any) -> tf.Variable:
    """A non-trainable variable made in ``strategy``'s scope, outside any trace.

    Under a strategy each replica keeps its own copy (sync on read) and the host
    reads the first: all replicas record the same all-reduced values, and a
    shared plain variable would count every step once per replica.
    """
    with tf.init_scope(), strategy.scope():
        return tf.Variable(
            initial,
            trainable=False,
            name=name,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )


def write_row(variable: tf.Variable, slot: tf.Tensor, value: tf.Tensor) -> None:
    """Set ``variable[slot] = value`` (called while tracing).

    A plain variable is updated in place: a scalar index writes one row, with no
    reshapes around it. Sync-on-read variables of a strategy lack scatter ops, so
    there the whole buffer is assigned (a few KB per step).
    """
    if isinstance(variable, tf.distribute.DistributedValues):
        variable.assign(tf.tensor_scatter_nd_update(variable, tf.reshape(slot, (1, 1)), value[None]))
    else:
        tf.raw_ops.ResourceScatterUpdate(resource=variable.handle, indices=slot, updates=value)
