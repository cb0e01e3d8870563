"""Canaries: every function of the TensorFlow door run against the installed TensorFlow and Keras.

An upgrade that moves or renames an internal gradmagic relies on fails here
first, with the function's name, rather than deep inside a gradient call.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradmagic.core.backends import tensorflow as door

# --- The gradient questions (core/questions) ---------------------------------


# --- The training monitor (core/monitor) -------------------------------------


def test_summary_metadata_names_the_plugin_tensorboard_reads(tmp_path):
    from gradmagic.core.backends.tensorflow import summary_metadata

    for plugin in ("scalars", "histograms"):
        data = summary_metadata(plugin)
        assert tf.compat.v1.SummaryMetadata.FromString(data).plugin_data.plugin_name == plugin
    # Written with tf.summary.write and read back from the events file, as TensorBoard reads it.
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        tf.summary.write("probe", tf.constant(2.5), step=3, metadata=summary_metadata("scalars"))
    writer.flush()
    (events,) = tmp_path.glob("events.out.tfevents.*")
    found = [
        (e.step, v.metadata.plugin_data.plugin_name, float(tf.make_ndarray(v.tensor)))
        for e in tf.compat.v1.train.summary_iterator(str(events))
        for v in e.summary.value
    ]
    assert found == [(3, "scalars", 2.5)]


def test_not_inlined_function_is_called_as_one_node_and_computes_its_body():
    from gradmagic.core.backends.tensorflow import not_inlined_function

    spec = tf.TensorSpec([3], tf.float32)
    inner = not_inlined_function(lambda t: tf.reduce_sum(t * t), [spec])
    # The attribute TensorFlow's runtime reads to keep the call instead of inlining it.
    assert inner.get_concrete_function().function_def.attr["_noinline"].b is True
    outer = tf.function(lambda t: inner(t) + 1.0, input_signature=[spec])
    x = np.array([1.0, -2.0, 0.5], "float32")
    # Two graphs (the call and NumPy): a tolerance, not equality.
    np.testing.assert_allclose(outer(x).numpy(), np.sum(x * x) + 1.0, rtol=1e-6)
    call_types = [op.type for op in outer.get_concrete_function().graph.get_operations()]
    assert "PartitionedCall" in call_types or "StatefulPartitionedCall" in call_types


def test_op_copier_replays_ops_with_their_attributes():
    from gradmagic.core.backends.tensorflow import op_copier

    copy = op_copier()
    assert copy is not None
    specs = [tf.TensorSpec([4], tf.float32)] * 3

    @tf.function(input_signature=specs, autograph=False)
    def original_and_copy(a, b, c):
        mul = a * b
        total = mul + c
        cast = tf.cast(total, tf.float64)  # an op whose attribute (DstT) must be carried over
        copied_mul = copy(mul.op, [a, b])
        copied_total = copy(total.op, [copied_mul, c])
        copied_cast = copy(cast.op, [copied_total])
        assert copied_cast.op.type == "Cast" and copied_cast.dtype == tf.float64
        assert copied_cast.op.name != cast.op.name  # a new op, not the same one
        return cast, copied_cast

    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=4).astype("float32") for _ in range(3))
    got, copied = (t.numpy() for t in original_and_copy(a, b, c))
    # The same kernels on the same values; grappler may still fuse either differently: a tolerance.
    np.testing.assert_allclose(copied, got, rtol=1e-7)
    np.testing.assert_allclose(copied, a.astype("float64") * b + c, rtol=1e-6)


def test_optimizer_variables_are_the_ones_it_was_built_for():
    from gradmagic.core.backends.tensorflow import optimizer_variables

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = keras.optimizers.Adam(0.1)
    assert optimizer_variables(optimizer) == []
    optimizer.build(model.trainable_variables)
    assert [id(v) for v in optimizer_variables(optimizer)] == [id(v) for v in model.trainable_variables]
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    scaled.build(model.trainable_variables)
    assert [id(v) for v in optimizer_variables(scaled)] == [id(v) for v in model.trainable_variables]


def test_build_optimizer_as_apply_does_names_and_values_as_apply_would():
    from gradmagic.core.backends.tensorflow import build_optimizer_as_apply_does

    def make():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        return model, keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=8.0)

    model, built_here = make()
    build_optimizer_as_apply_does(built_here, model.trainable_variables)
    assert built_here.built and float(built_here.dynamic_scale.numpy()) == 8.0
    names_here = [v.path for v in built_here.variables]
    before = [v.numpy() for v in model.trainable_variables]
    built_here.apply([tf.ones_like(v) for v in model.trainable_variables], model.trainable_variables)
    assert [v.path for v in built_here.variables] == names_here  # apply built nothing twice
    # Hand-computed: SGD(0.1) on unit gradients unscaled by 8 moves every weight by 0.1 / 8.
    for start, variable in zip(before, model.trainable_variables, strict=True):
        np.testing.assert_allclose(start - variable.numpy(), 0.1 / 8, rtol=1e-5)
    # The truth for the names: the same optimizer built by its own first apply().
    other, by_apply = make()
    by_apply.apply([tf.ones_like(v) for v in other.trainable_variables], other.trainable_variables)
    assert [v.path.split("/", 1)[1] for v in by_apply.variables] == [n.split("/", 1)[1] for n in names_here]


def test_fit_token_is_new_in_every_fit_and_fixed_within_one():
    from gradmagic.core.backends.tensorflow import fit_token

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((16, 3), "float32"), np.zeros((16, 2), "float32")
    tokens = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            tokens.append(fit_token(self.model))

    for _ in range(2):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[Probe()])
    (first, second), (third, fourth) = tokens[:2], tokens[2:]
    assert first[0] is second[0] and first[1] is second[1]
    assert third[0] is fourth[0] and third[0] is not first[0]


# --- The diagnosis (core/diagnose) -------------------------------------------


def _traced_ops(fn, *args) -> list:
    """The ops of one trace of ``fn`` (a plain TensorFlow function of tensors)."""
    graph = tf.function(fn).get_concrete_function(*args).graph
    return graph.get_operations()


def _op_of_type(ops: list, op_type: str):
    (op,) = [op for op in ops if op.type == op_type]
    return op


def test_registered_gradient_finds_matmuls_and_knows_stop_gradient_and_unique():
    ops = _traced_ops(lambda a: tf.unique(tf.reshape(tf.stop_gradient(a) @ a, [-1])).y, tf.ones((2, 2)))
    assert callable(door.registered_gradient(_op_of_type(ops, "MatMul")))
    assert door.registered_gradient(_op_of_type(ops, "StopGradient")) is None  # tf.no_gradient
    with pytest.raises(LookupError):  # no gradient registered at all
        door.registered_gradient(_op_of_type(ops, "Unique"))


def test_is_custom_gradient_recognises_tf_custom_gradient_only():
    @tf.custom_gradient
    def square(t):
        return t * t, lambda upstream: upstream * 2.0 * t

    ops = _traced_ops(lambda a: tf.identity(square(a)), tf.ones((2,)))
    assert door.is_custom_gradient(_op_of_type(ops, "IdentityN"))  # the op tf.custom_gradient creates
    others = [op for op in ops if op.type != "IdentityN"]
    assert {"Mul", "Identity"} <= {op.type for op in others}
    assert not any(door.is_custom_gradient(op) for op in others)


def test_differentiated_scope_leads_from_a_gradient_op_back_to_its_forward_op():
    def f(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            with tf.name_scope("a"):
                root = tf.sqrt(x, name="b")
            loss = tf.reduce_sum(root)
        return tape.gradient(loss, x)

    ops = _traced_ops(f, tf.constant([0.0, 4.0]))
    forward, backward = _op_of_type(ops, "Sqrt"), _op_of_type(ops, "SqrtGrad")
    assert forward.name == "a/b"
    scope = door.differentiated_scope(backward.name)
    assert scope is not None and (forward.name == scope or forward.name.startswith(scope + "/"))
    assert forward.outputs[0].name in {t.name for t in backward.inputs}  # and it reads that op's output
    assert door.differentiated_scope(forward.name) is None  # a forward op differentiates nothing
    # At 0 the square root's derivative is infinite: the NaN/Inf of the gradient is made in that op.
    assert np.isinf(tf.function(f)(tf.constant([0.0, 4.0])).numpy()[0])


def test_lambda_output_shape_is_the_argument_as_given():
    def shape_of(input_shape):
        return input_shape

    by_function = keras.layers.Lambda(tf.sin, output_shape=shape_of)
    assert door.lambda_output_shape(by_function) is shape_of
    assert isinstance(by_function.get_config()["output_shape"], dict)  # why the door is needed
    assert door.lambda_output_shape(keras.layers.Lambda(tf.sin, output_shape=(3,))) == (3,)
    assert door.lambda_output_shape(keras.layers.Lambda(tf.sin)) is None


def test_variable_placeholders_are_what_the_variables_reads_consume():
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    found = {}

    @tf.function
    def f(x):
        graph = tf.compat.v1.get_default_graph()
        out = dense(x)
        found.update(door.variable_placeholders(graph, dense.weights))
        return out

    f(tf.ones((1, 3)))
    assert set(found) == {id(dense.kernel), id(dense.bias)}
    for variable in (dense.kernel, dense.bias):
        (placeholder,) = found[id(variable)]
        # The captured handle is read once, by the op that gives the variable's value to the layer.
        assert placeholder.dtype == tf.resource
        assert [op.type for op in placeholder.consumers()] == ["ReadVariableOp"]
