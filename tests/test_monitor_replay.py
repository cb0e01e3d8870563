"""Replayed copies of gradients (replay.py): the consumers seen through identities, and copies of equal value."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradmagic.core.monitor.replay import readable, real_consumers


def test_real_consumers_look_through_identities():
    seen = {}

    @tf.function(input_signature=[tf.TensorSpec([3], tf.float32)] * 2, autograph=False)
    def graph(a, b):
        t = a * b
        passed = tf.identity(tf.identity(t))  # grappler removes these: they are no consumer of their own
        first, second = passed + 1.0, t * 2.0
        seen["t"], seen["ops"] = t, {first.op.name, second.op.name}
        seen["found"] = {op.name for op in real_consumers(t)}
        return first + second

    graph.get_concrete_function()
    assert seen["found"] == seen["ops"]


def test_single_consumer_gradient_is_read_from_an_equal_copy():
    found = {}

    @tf.function(input_signature=[tf.TensorSpec([4], tf.float32)] * 2, autograph=False)
    def step(a, variance):
        grad = a * tf.math.rsqrt(variance)  # a BatchNorm gamma's gradient, as in the train step
        update = 0.1 * grad  # its only consumer: the optimizer's update
        (copy,) = readable([grad])
        found["replayed"] = copy is not grad
        return update, copy

    rng = np.random.default_rng(0)
    a, variance = rng.normal(size=4).astype("float32"), rng.uniform(0.5, 2.0, 4).astype("float32")
    update, copy = (t.numpy() for t in step(a, variance))
    assert found["replayed"]
    # The truth from NumPy in float64 (a different computation: a tolerance).
    np.testing.assert_allclose(copy, a / np.sqrt(variance.astype("float64")), rtol=1e-6)
    np.testing.assert_allclose(update, 0.1 * copy, rtol=1e-6)


def test_gradients_read_by_other_ops_are_not_replayed():
    found = {}

    @tf.function(input_signature=[tf.TensorSpec([4], tf.float32)] * 2, autograph=False)
    def step(a, b):
        shared = a * b
        other = tf.reduce_sum(shared) + tf.reduce_max(shared)  # two consumers already
        made_by_matmul = tf.linalg.matvec(tf.reshape(a, [1, 4]), b)  # not an element-wise op
        kept = readable([shared, made_by_matmul, None])
        found["same"] = kept[0] is shared and kept[1] is made_by_matmul and kept[2] is None
        return other + kept[0][0] + kept[1][0]

    step(tf.ones([4]), tf.ones([4]))
    assert found["same"]
    eager = tf.constant([1.0, 2.0])
    assert readable([eager])[0] is eager  # eagerly there is no graph to keep apart
