"""Canaries: every function of the TensorFlow door run against the installed TensorFlow and Keras.

An upgrade that moves or renames an internal gradmagic relies on fails here
first, with the function's name, rather than deep inside a gradient call.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradmagic.core.backends import keras_internals
from gradmagic.core.backends import tensorflow as door

# --- The gradient questions (core/questions) ---------------------------------


def _two_outputs(loss_weights=None) -> keras.Model:
    inp = keras.Input((3,))
    model = keras.Model(inp, [keras.layers.Dense(2, name="a")(inp), keras.layers.Dense(1, name="b")(inp)])
    model.compile(optimizer="sgd", loss=["mse", "mae"], loss_weights=loss_weights)
    return model


def _mse(y, pred):
    return float(np.mean(np.square(np.asarray(y) - np.asarray(pred))))


def test_compiled_loss_is_what_compile_made_and_none_before():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert door.compiled_loss(model) is None
    model.compile(optimizer="sgd", loss="mse")
    first = door.compiled_loss(model)
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    pred = model(x)
    # The object compute_loss runs: its value is the mean squared error computed by hand.
    np.testing.assert_allclose(float(first(y, pred)), _mse(y, pred), rtol=1e-6)
    model.compile(optimizer="sgd", loss="mse")
    assert door.compiled_loss(model) is not first  # a re-compile makes a new one (cache keys rely on it)


def test_fresh_compiled_loss_is_an_unbuilt_twin_with_the_same_losses_and_weights():
    model = _two_outputs(loss_weights=[1.0, 0.5])
    compiled = door.compiled_loss(model)
    twin = door.fresh_compiled_loss(compiled)
    assert twin is not None and twin is not compiled and type(twin) is type(compiled)
    assert not twin.built
    x = np.linspace(-1, 1, 12, dtype="float32").reshape(4, 3)
    ya, yb = np.zeros((4, 2), "float32"), np.ones((4, 1), "float32")
    pa, pb = (p.numpy() for p in model(x))
    by_hand = _mse(ya, pa) + 0.5 * float(np.mean(np.abs(yb - pb)))
    np.testing.assert_allclose(float(twin([ya, yb], [pa, pb])), by_hand, rtol=1e-6)


def test_compiled_loss_replaced_is_what_compute_loss_runs_inside_the_block_only():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    original = door.compiled_loss(model)
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.compile(optimizer="sgd", loss="mae")
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    pred = model(x)
    with door.compiled_loss_replaced(model, door.compiled_loss(other)):
        inside = float(model.compute_loss(x=x, y=y, y_pred=pred))
    np.testing.assert_allclose(inside, float(np.mean(np.abs(pred.numpy()))), rtol=1e-6)
    assert door.compiled_loss(model) is original
    with pytest.raises(RuntimeError), door.compiled_loss_replaced(model, door.compiled_loss(other)):
        raise RuntimeError("restored even when the block raises")
    assert door.compiled_loss(model) is original
    np.testing.assert_allclose(float(model.compute_loss(x=x, y=y, y_pred=pred)), _mse(y, pred), rtol=1e-6)


def test_flat_caller_takes_the_fast_path_and_gives_the_structured_call_values():
    kernel = tf.Variable([[1.0, 2.0], [3.0, -1.0]])

    @tf.function
    def f(xs, y, w):
        del w
        return tf.reduce_sum(tf.matmul(xs[0], kernel) * xs[1], axis=1) - y

    tensors = ([tf.constant([[1.0, 2.0]]), tf.constant([[0.5, 0.25]])], tf.constant([1.0]), None)
    specs = ([tf.TensorSpec((None, 2)), tf.TensorSpec((None, 2))], tf.TensorSpec((None,)), None)
    concrete = f.get_concrete_function(*specs)
    call = door.flat_caller(concrete, tensors)
    # The flat entry point exists in this TensorFlow: not the structured fallback.
    assert call.__name__ == "call_flat_tensors"
    other = (
        [tf.constant([[0.0, 1.0], [2.0, 2.0]]), tf.constant([[1.0, 1.0], [1.0, 0.0]])],
        tf.constant([0.0, 3.0]),
        None,
    )
    for args in (tensors, other):
        # The same concrete function run two ways: equal up to float round-off.
        np.testing.assert_allclose(call(args).numpy(), concrete(*args).numpy(), rtol=1e-6)
    np.testing.assert_allclose(call(tensors).numpy(), [(1 * 1 + 2 * 3) * 0.5 + (1 * 2 - 2) * 0.25 - 1.0], rtol=1e-6)


def test_calls_replaced_sees_every_call_of_the_layer_and_restores_it():
    inp = keras.Input((2,))
    dense = keras.layers.Dense(2, kernel_initializer="ones", bias_initializer="zeros")
    functional = keras.Model(inp, dense(inp))
    sequential = keras.Sequential([keras.Input((2,)), dense])
    x = np.array([[1.0, 2.0]], "float32")
    seen = []

    def doubled(original):
        def call(*args, **kwargs):
            seen.append(1)
            return 2.0 * original(*args, **kwargs)

        return call

    with door.calls_replaced([(dense, doubled)]):
        np.testing.assert_allclose(functional(x).numpy(), [[6.0, 6.0]])
        np.testing.assert_allclose(tf.function(lambda t: sequential(t))(x).numpy(), [[6.0, 6.0]])
    assert len(seen) == 2
    assert "call" not in vars(dense)  # the class's own call again
    np.testing.assert_allclose(functional(x).numpy(), [[3.0, 3.0]])
    assert len(seen) == 2


def test_instance_settings_are_the_layers_live_public_settings():
    dropout = keras.layers.Dropout(0.3)
    dense = keras.layers.Dense(2, activation="relu")
    assert door.instance_settings(dropout)["rate"] == 0.3
    dropout.rate = 0.5
    assert door.instance_settings(dropout)["rate"] == 0.5
    assert door.instance_settings(dense)["activation"] is dense.activation


def test_attribute_layers_finds_the_layers_a_custom_layer_holds():
    class TokenAndPosition(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.tokens = keras.layers.Embedding(10, 4)
            self.scale = keras.layers.Dense(4)

        def call(self, t):
            return self.scale(self.tokens(t))

    layer = TokenAndPosition()
    found = door.attribute_layers(layer)
    assert layer.tokens in found and layer.scale in found
    assert door.attribute_layers(keras.layers.Dense(2)) == []


def test_python_state_undoes_building_a_model():
    model = keras.Sequential([keras.layers.Dense(3), keras.layers.Dense(1)])
    saved = door.python_state(model)
    model(np.ones((2, 5), "float32"))  # builds every layer for 5 features
    assert model.built and len(model.weights) == 4
    door.restore_python_state(saved)
    assert not model.built and model.weights == [] and not any(layer.built for layer in model.layers)
    # Unbuilt again: the model takes another input width, as if never called.
    assert model(np.ones((2, 7), "float32")).shape == (2, 1)
    assert tuple(model.layers[0].kernel.shape) == (7, 3)


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as exc:  # the canaries read the real errors of TensorFlow and Keras
        return exc
    raise AssertionError("expected an error")


def test_error_message_strips_what_tensorflow_and_keras_wrap_around_it():
    def raises(t):
        raise ValueError("the user's own message")

    traced = _raised(lambda: tf.function(raises)(tf.constant(1.0)))
    assert str(traced).lstrip().startswith("in user code:")
    assert door.error_message(traced) == "ValueError: the user's own message"

    reshape = tf.function(lambda t: tf.reshape(t, (2, 2)), input_signature=[tf.TensorSpec(None)])
    run_time = _raised(lambda: reshape(tf.constant([1.0, 2.0, 3.0])))
    assert isinstance(run_time, tf.errors.OpError)
    text = door.error_message(run_time)
    assert "Input to reshape is a tensor with 3 values" in text
    assert "Detected at node" not in text and "Graph execution error" not in text

    class Fails(keras.layers.Layer):
        def call(self, t):
            raise ValueError("inside the layer")

    keras_error = _raised(lambda: keras.Sequential([keras.Input((2,)), Fails()]))
    assert "\x1b[1m" in str(keras_error)  # Keras still highlights the layer's own message
    highlighted = door.error_message(keras_error)
    assert "inside the layer" in highlighted and "Arguments received" not in highlighted
    assert door.error_message(ValueError("plain")) == "plain"


def test_tracing_mistakes_are_recognised_from_tensorflows_real_errors():
    control_flow = _raised(lambda: tf.function(lambda t: bool(t > 0), autograph=False)(tf.constant(1.0)))
    numpy_call = _raised(lambda: tf.function(lambda t: np.round(t), autograph=False)(tf.constant(1.0)))
    assert door.is_python_control_flow_error(control_flow)
    assert not door.is_numpy_on_symbolic_error(control_flow)
    assert door.is_numpy_on_symbolic_error(numpy_call)
    assert not door.is_python_control_flow_error(numpy_call)
    other = ValueError("shapes (2,) and (3,) are incompatible")
    assert not door.is_python_control_flow_error(other) and not door.is_numpy_on_symbolic_error(other)


def _section(text: str, title: str) -> str:
    """The lines of one ``# --- title ---`` section of a file."""
    start = text.index(f"# --- {title}")
    end = text.find("\n# --- ", start + 1)
    return text[start : None if end < 0 else end]


def test_every_door_function_of_the_questions_has_a_canary_here():
    # A door function without a canary would let an upgrade break the questions silently.
    # The Keras internals the TensorFlow door re-exports count as its own (they live in keras_internals.py).
    sections = [_section(Path(m.__file__).read_text(), "The gradient questions") for m in (door, keras_internals)]
    this_source = Path(__file__).read_text()
    functions = re.findall(r"^def ([a-z]\w*)\(", "\n".join(sections), re.M)
    assert len(functions) >= 10  # the scan finds the section's functions
    tested = _section(this_source, "The gradient questions")
    assert [name for name in functions if f"door.{name}(" not in tested] == []


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
