"""gm.explore checks its arguments before any TensorFlow call; the user's reference curves fail clearly."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_unchanged, fingerprint

import gradmagic as gm
from gradmagic.errors import ComputeError, InputError
from gradmagic.widgets.explorer import Explorer

X1 = np.linspace(0.0, 1.0, 8, dtype="float32")[:, None]  # 8 rows, one feature
X2 = np.random.default_rng(0).normal(size=(6, 2)).astype("float32")


def _unbuilt():
    """No Input: any TensorFlow call on it would build it, so `not model.built` proves none happened."""
    return keras.Sequential([keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)], name="unbuilt")


@pytest.fixture(scope="module")
def two_features():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)])
    model.compile(loss="mse")
    return model


def _generator():
    yield X1


BAD = [
    # (x, keyword arguments, error class, text the message must hold)
    (X1, {"reference": 5}, gm.GradmagicError, r"reference=5 \(int\)"),
    (X1, {"reference_grad": np.ones(3)}, gm.GradmagicError, r"reference_grad=array of shape \(3,\)"),
    (X1, {"feature_names": ["a", "b"]}, InputError, r"feature_names=\['a', 'b'\]: 2 name\(s\) for 1 feature"),
    (X2, {"feature_names": ["a", "a"]}, InputError, "a name given twice"),
    (X1, {"feature_names": [1]}, InputError, "a name that is not a string"),
    (X1, {"feature_names": "x"}, InputError, r"feature_names='x' \(str\)"),
    (X1, {"points": 0}, gm.GradmagicError, "points=0. Expected an int from 2 to 10000"),
    (X1, {"points": -5}, gm.GradmagicError, "points=-5"),
    (X1, {"points": 2.5}, gm.GradmagicError, "points=2.5"),
    (X1, {"points": True}, gm.GradmagicError, "points=True"),
    (X1, {"points": "200"}, gm.GradmagicError, "points='200'"),
    (X1, {"points": 10**7}, gm.GradmagicError, "points=10000000"),
    (X1, {"training": "False"}, InputError, r"training='False' of type str. Expected True or False"),
    (X1, {"training": 0}, InputError, r"training=0 of type int. Expected True or False"),
    (X1, {"max_sliders": 0}, gm.GradmagicError, "max_sliders=0"),
    (X1, {"max_sliders": 2.0}, gm.GradmagicError, "max_sliders=2.0"),
    (X1, {"use_ipympl": "no"}, gm.GradmagicError, "use_ipympl='no'"),
    (X1, {"point": 50}, gm.GradmagicError, "point=...\\), an option explore does not have. Did you mean 'points'"),
    (tf.data.Dataset.from_tensor_slices(X1), {}, InputError, "x as a .*Dataset.*next\\(iter\\(dataset\\)\\)"),
    (_generator(), {}, InputError, "x as a generator"),
    ({1.0, 2.0}, {}, InputError, r"x=\{1.0, 2.0\} \(set\)"),
    ("abc", {}, InputError, r"x='abc' \(str\)"),
    (None, {}, InputError, r"x=None \(NoneType\)"),
    (X1 + 1j, {}, InputError, "x holding complex numbers.*x.real"),
    (np.array([["a"], ["b"]]), {}, InputError, "x holding dtype <U1"),
    ([[1.0, 2.0], [3.0]], {}, InputError, "not a rectangular array"),
    (np.zeros((0, 1), "float32"), {}, InputError, r"x of shape \(0, 1\), which is empty"),
    (np.array([[1.0], [np.nan]]), {}, InputError, "1 NaN or Inf value"),
    (np.array([[1.0], [np.inf]]), {}, InputError, "1 NaN or Inf value"),
    (np.array([[1e300], [0.0]]), {}, InputError, "values up to 1e\\+300. Expected \\|x\\| below 8.51e\\+37"),
    (np.zeros((2, 3, 3)), {}, InputError, r"x of shape \(2, 3, 3\) for model 'unbuilt'. Expected a model whose"),
    ([X1, X1], {}, InputError, r"x as a list of arrays for model 'unbuilt'. Expected"),
    ({"a": X1}, {}, InputError, r"x as a dict of arrays"),
    (X1, {"y": 5.0}, InputError, "y=5.0, a single value, for x with 8"),
    (X1, {"y": X1[:3]}, InputError, "y with 3 rows for x with 8"),
    (X1, {"y": {"out": X1}}, InputError, r"y=dict with keys \[.out.\] \(dict\).*one array of targets"),
    (X1, {"y": [[1.0], [2.0, 3.0]] * 4}, InputError, "y=.*not a rectangular array"),
    (X1, {"y": np.array(["a"] * 8)}, InputError, "y with dtype <U1"),
    (X1, {"y": tf.data.Dataset.from_tensor_slices(X1)}, InputError, "Dataset"),
]


@pytest.mark.parametrize(("x", "kwargs", "error", "message"), BAD)
def test_bad_arguments_are_refused_before_any_tensorflow_call(x, kwargs, error, message):
    model = _unbuilt()
    with pytest.raises(error, match=message) as raised:
        gm.explore(model, x, **kwargs)
    assert "Expected" in str(raised.value) and "Fix" in str(raised.value)
    assert not model.built  # nothing ran the model


def test_a_failed_explore_leaves_an_unbuilt_model_unbuilt():
    # Two features build the model for two inputs before the reference fails at the first view.
    model = _unbuilt()
    with pytest.raises(ComputeError, match=r"reference=.*raised ZeroDivisionError"):
        gm.explore(model, X2, reference=lambda p: 1 / 0)
    assert not model.built and model.weights == []
    # The proof that nothing of the failed build stayed: the same model now takes three features.
    x3 = np.random.default_rng(1).normal(size=(5, 3)).astype("float32")
    panel = gm.explore(model, x3, use_ipympl=False)
    assert panel.data.shape == (5, 3) and model.layers[0].kernel.shape == (3, 3)


def test_a_model_that_is_not_a_keras_model_is_named():
    with pytest.raises(gm.GradmagicError, match=r"model='not a model' \(str\). Expected a Keras 3 model"):
        gm.explore("not a model", X1)


def test_numpy_scalars_and_sequences_are_accepted(two_features):
    panel = gm.explore(
        two_features,
        X2,
        feature_names=np.array(["u", "v"]),
        points=np.int64(7),
        training=np.bool_(False),
        max_sliders=np.int32(1),
        use_ipympl=False,
        # A full analytic gradient (n, n_features) is read at the feature's column.
        reference_grad=lambda p: np.stack([2 * p[:, 0], 3 * p[:, 1]], axis=1),
    )
    panel.feature_select.value = 1
    panel.sliders[0].value = 0.5
    view = panel.view
    assert panel.names == ["u", "v"] and len(view.line) == 7
    np.testing.assert_allclose(view.reference_grads, 3 * view.line)  # NumPy on the same float32 values: exact
    assert view.reference_point_grad == pytest.approx(1.5)
    assert "reference d/d v" in panel.readout.value and "1.5" in panel.readout.value


@pytest.mark.parametrize("values", [[1.0], [1.0, 2.0, 3.0], [np.nan, 0.0], "ab", [[1.0, 2.0]], None, [1j, 0]])
def test_set_point_refuses_anything_but_one_finite_number_per_feature(two_features, values):
    panel = gm.explore(two_features, X2, use_ipympl=False, points=5)
    shown = panel.view
    with pytest.raises(gm.GradmagicError, match=r"values=.*Expected one finite number per feature \(2: 'x0', 'x1'\)"):
        panel.set_point(values)
    assert panel.view is shown


@pytest.mark.parametrize("row", [-1, 6, 2.0, True, "0", None])
def test_reset_to_sample_refuses_a_row_that_is_not_in_x(two_features, row):
    panel = gm.explore(two_features, X2, use_ipympl=False, points=5)
    with pytest.raises(gm.GradmagicError, match=r"row=.*an int from 0 to 5"):
        panel.reset_to_sample(row)
    panel.reset_to_sample(np.int64(5))
    assert panel.sample == 5


def _raising(points):
    raise ZeroDivisionError("division by zero in my curve")


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (_raising, r"reference=_raising, which raised ZeroDivisionError: division by zero in my curve"),
        (lambda p: p[:3, 0], r"returned shape \(3,\).*Expected one value per point, shape \(9,\) or \(9, 1\)"),
        (lambda p: np.log(p[:, 0] - 0.5), r"returned (nan|-inf) at point \[.*\].*NaN or Inf"),
        (lambda p: None, "returned values of dtype object"),
        (lambda p: p + 1j, "returned values of dtype complex"),
    ],
)
def test_a_failing_reference_is_a_compute_error_naming_it(reference, message):
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    before = fingerprint(model)
    with pytest.raises(ComputeError, match=message) as raised:
        gm.explore(model, X1, reference=reference, points=8)  # the curve and the point: 9 rows
    if reference is _raising:
        assert isinstance(raised.value.__cause__, ZeroDivisionError)  # the user's traceback stays reachable
    assert_unchanged(model, before)


def test_a_reference_failing_on_a_slider_move_is_shown_in_the_panel_and_the_panel_recovers():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])

    def slope(points):
        if np.any(points > 0.9):
            raise ValueError("slope undefined past 0.9")
        return np.ones(len(points))

    # The curve runs over the padded slider range, so only the point can pass 0.9: x only to 0.5.
    panel = gm.explore(model, X1 * 0.5, reference_grad=slope, points=5, use_ipympl=False)
    low, high = panel.sliders[0].min, panel.sliders[0].max
    assert high < 0.9
    panel.sliders[0].max = 2.0
    panel.sliders[0].value = 1.0
    assert "ComputeError" in panel.error.value and "reference_grad=" in panel.error.value
    assert "ValueError: slope undefined past 0.9" in panel.error.value
    assert panel.view.point[0] < 0.9  # the last good view stays
    panel.sliders[0].value = low
    assert panel.error.value == "" and panel.view.point[0] == pytest.approx(low)


def test_an_unexpected_error_in_a_panel_callback_is_shown_with_its_traceback(two_features):
    panel = Explorer(two_features, X2, use_ipympl=False, points=5)
    panel.updates.submit(("not a point", 0, 0, 0))  # a state compute cannot use: an internal failure
    assert "Traceback (most recent call last)" in panel.error.value and "compute_view" in panel.error.value


def test_a_dataframes_columns_name_the_features(two_features):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(X2, columns=["age", "income"])
    panel = gm.explore(two_features, frame, frame["age"], feature_names=frame.columns, use_ipympl=False, points=5)
    assert panel.names == ["age", "income"]
    np.testing.assert_array_equal(panel.data, X2)  # the same float32 values, converted, not computed
    with pytest.raises(InputError, match=r"feature_names=\['a'\]: 1 name\(s\) for 2 feature\(s\).*\['x0', 'x1'\]"):
        gm.explore(two_features, frame, feature_names=["a"])


@pytest.mark.parametrize("target", [None, "row", "scalar"])
def test_one_sample_without_its_batch_axis_is_one_row(two_features, target):
    y = {None: None, "row": np.array([0.5]), "scalar": 0.5}[target]
    panel = gm.explore(two_features, X2[0], y, use_ipympl=False, points=5)
    assert panel.data.shape == (1, 2)
    # Truth: a hand-written tape on the eager model (another graph than the panel's: float32 rounding apart).
    point = tf.constant(panel.view.point[None], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(point)
        out = two_features(point)
    np.testing.assert_allclose(panel.view.gradient, tape.gradient(out, point).numpy()[0], rtol=1e-5, atol=1e-6)
    if y is not None:
        assert panel.view.loss == pytest.approx((float(out[0, 0]) - 0.5) ** 2, rel=1e-5)  # mse of one sample
    # A model with one feature reads a 1-D x as a column, one row per value.
    one = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    assert gm.explore(one, X1[:, 0], use_ipympl=False, points=5).data.shape == (8, 1)
