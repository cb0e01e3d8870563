"""Property-based tests of the front-ends: bad and odd arguments to gm.explore, %gradients, %gradients_explore.

The contract for any value: ``gm.explore`` raises only a ``GradmagicError`` whose text names the argument
and what was received; a magic either works or raises a one-line ``UsageError``; and the model's variables
and build state are bit-identical afterwards. Examples are derandomized (the same ones on every run) and
the models are built once per module, so the file runs in a fixed, small budget.
"""

from __future__ import annotations

import string
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import fingerprint
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import gradmagic as gm
from gradmagic.errors import ComputeError
from gradmagic.widgets.explorer_args import MAX_POINTS, OPTIONS

# The autouse seeding fixture is function-scoped but only seeds Keras: no example depends on it.
SETTINGS = {
    "derandomize": True,
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}

X = np.random.default_rng(0).normal(size=(6, 2)).astype("float32")
Y = np.random.default_rng(1).normal(size=(6, 1)).astype("float32")


@pytest.fixture(scope="module")
def built():
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(3, activation="tanh", name="hidden"), keras.layers.Dense(1, name="out")],
        name="built",
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def _unbuilt():
    """No Input: any TensorFlow call on it would build it."""
    return keras.Sequential([keras.layers.Dense(3), keras.layers.Dense(1)], name="unbuilt")


def _state(model):
    return model.built, fingerprint(model)


# --- gm.explore ---------------------------------------------------------------------------------------------------


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


SOMETHING = st.one_of(
    st.booleans(),
    st.integers(-(10**9), 10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-3, 3), max_size=3),
    st.builds(np.zeros, st.integers(0, 3)),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sampled_from([np.int64(0), np.float32(2.5), np.bool_(True), 1j, b"bytes", object()]),
)
ANYTHING = st.none() | SOMETHING

BAD_OPTION = {
    "points": ANYTHING.filter(lambda v: not (_is_int(v) and 2 <= v <= MAX_POINTS))
    | st.integers(max_value=1)
    | st.integers(min_value=MAX_POINTS + 1),
    "training": ANYTHING.filter(lambda v: not isinstance(v, (bool, np.bool_))),
    "max_sliders": ANYTHING.filter(lambda v: not (_is_int(v) and v >= 1)) | st.integers(max_value=0),
    "use_ipympl": SOMETHING.filter(lambda v: not isinstance(v, (bool, np.bool_))),
    "reference": SOMETHING.filter(lambda v: not callable(v)),
    "reference_grad": SOMETHING.filter(lambda v: not callable(v)),
    "feature_names": st.one_of(
        st.lists(st.text(max_size=3), max_size=4).filter(lambda names: len(names) != 2 or len(set(names)) != 2),
        st.lists(st.integers(), min_size=2, max_size=2),
        st.text(max_size=4),
        SOMETHING.filter(lambda v: not isinstance(v, (list, str))),
    ),
}

FLOATS = st.floats(-1e3, 1e3, width=32) | st.sampled_from([np.nan, np.inf, -np.inf])
BAD_X = st.one_of(
    hnp.arrays("float32", st.tuples(st.integers(1, 5), st.just(2)), elements=FLOATS).filter(
        lambda a: not np.isfinite(a).all()
    ),
    hnp.arrays("float32", st.tuples(st.just(0), st.integers(0, 3))),
    hnp.arrays("complex64", st.tuples(st.integers(1, 4), st.just(2))),
    hnp.arrays(hnp.unicode_string_dtypes(max_len=3), st.tuples(st.integers(1, 4), st.just(2))),
    hnp.arrays("float32", st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))),
    st.lists(st.lists(st.floats(-5, 5), min_size=1, max_size=3), min_size=2, max_size=4).filter(
        lambda rows: len({len(r) for r in rows}) > 1
    ),
    st.sets(st.floats(-5, 5), max_size=3),
    st.text(max_size=5),
    st.none(),
    st.lists(hnp.arrays("float32", st.tuples(st.integers(1, 3), st.just(2))), min_size=2, max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), st.just(X), min_size=1),
    st.builds(lambda n: tf.data.Dataset.from_tensor_slices(X).batch(n), st.integers(1, 3)),
    st.builds(lambda n: (X[i : i + n] for i in range(0, 6, n)), st.integers(1, 3)),
)
BAD_Y = st.one_of(
    hnp.arrays("float32", st.tuples(st.integers(0, 12).filter(lambda n: n != 6), st.integers(1, 2))),
    st.floats(allow_nan=True) | st.integers(),
    st.text(max_size=4),
    st.dictionaries(st.sampled_from(["out", "z"]), st.just(Y), min_size=1),
    st.lists(st.just(Y), min_size=2, max_size=2),
    hnp.arrays(hnp.unicode_string_dtypes(max_len=2), st.just((6, 1))),
)
UNKNOWN = st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(
    lambda name: name not in (*OPTIONS, "model", "x", "y", "reference", "reference_grad")
)


@st.composite
def explore_mistakes(draw):
    """One bad argument (the others valid): its name, explore's keyword arguments, the text it must show."""
    argument = draw(st.sampled_from([*BAD_OPTION, "x", "y", "unknown option"]))
    kwargs = {"x": X, "use_ipympl": False, "points": 5}
    if argument in BAD_OPTION:
        kwargs[argument] = draw(BAD_OPTION[argument])
        return argument, kwargs, f"{argument}="
    if argument == "unknown option":
        name = draw(UNKNOWN)
        kwargs[name] = draw(ANYTHING)
        return argument, kwargs, f"explore(..., {name}=...)"
    kwargs[argument] = draw(BAD_X if argument == "x" else BAD_Y)
    return argument, kwargs, f"Received: {argument}"


@settings(max_examples=150, **SETTINGS)
@given(mistake=explore_mistakes())
def test_explore_refuses_bad_arguments_before_touching_the_model(built, mistake):
    argument, kwargs, named = mistake
    x = kwargs.pop("x")
    for model in (built, _unbuilt()):
        before = _state(model)
        with pytest.raises(gm.GradmagicError) as raised:
            gm.explore(model, x, **kwargs)
        text = str(raised.value)
        assert named in text, (argument, text)
        assert "Expected" in text and "Fix" in text, text
        assert _state(model) == before  # the unbuilt one stays unbuilt: no TensorFlow call ran


ODD_BUT_VALID_X = hnp.arrays(
    "float64",
    st.tuples(st.integers(1, 6), st.just(2)),
    elements=st.one_of(st.floats(-1e6, 1e6), st.floats(-1e-20, 1e-20), st.sampled_from([0.0, -0.0, 1e30])),
)


@settings(max_examples=25, **SETTINGS)
@given(x=ODD_BUT_VALID_X, feature=st.integers(0, 1))
def test_odd_but_valid_x_gives_a_panel_that_agrees_with_the_core(built, x, feature):
    before = _state(built)
    panel = gm.explore(built, x, use_ipympl=False, points=5)
    panel.feature_select.value = feature
    view = panel.view
    assert np.all(np.isfinite(view.line)) and np.all(np.isfinite(view.values)) and np.all(np.isfinite(view.grads))
    assert view.line[0] < view.line[-1]  # a real range, even for a feature with one value
    # Truth: the core on the point alone (another batch size, so another graph: float32 rounding apart).
    truth = gm.input_gradients(built, view.point[None]).array[0, 0]
    np.testing.assert_allclose(view.gradient, truth, rtol=1e-5, atol=1e-6)
    assert _state(built) == before


class _UserBug(Exception):
    pass


@st.composite
def broken_references(draw):
    """A reference curve that raises or returns something other than one finite value per point (6 points)."""
    kind = draw(st.sampled_from(["raises", "shape", "non-finite", "not numbers"]))
    if kind == "raises":
        error = draw(st.sampled_from([ValueError, TypeError, ZeroDivisionError, KeyError, _UserBug, IndexError]))
        message = draw(st.text(string.ascii_letters + " ", max_size=12))

        def reference(points):
            raise error(message)

        return kind, reference, error
    if kind == "shape":
        shape = draw(
            hnp.array_shapes(min_dims=0, max_dims=3, max_side=7).filter(lambda s: s not in ((6,), (6, 1), (6, 2)))
        )
        return kind, lambda points: np.zeros(shape), None
    if kind == "non-finite":
        values = draw(hnp.arrays("float64", st.sampled_from([(6,), (6, 1), (6, 2)]), elements=FLOATS))
        assume(not np.isfinite(values).all())
        return kind, lambda points: values, None
    value = draw(st.sampled_from([None, "text", {"a": 1}, [1j] * 6, np.array(["a"] * 6), object()]))
    return kind, lambda points: value, None


@settings(max_examples=40, **SETTINGS)
@given(broken=broken_references(), which=st.sampled_from(["reference", "reference_grad"]))
def test_a_broken_reference_is_a_compute_error_naming_it(built, broken, which):
    kind, reference, error = broken
    before = _state(built)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NumPy's own complaints about odd values are not the subject here
        with pytest.raises(ComputeError) as raised:
            gm.explore(built, X, use_ipympl=False, points=5, **{which: reference})
    assert f"Received: {which}=" in str(raised.value)
    if kind == "raises":
        assert isinstance(raised.value.__cause__, error)  # the user's traceback stays one step away
    assert _state(built) == before


# --- the magics ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ip(built):
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "gradmagic")
    yield shell
    shell.run_line_magic("unload_ext", "gradmagic")


def _namespace(built):
    return {"model": built, "x": X, "y": Y, "keras": keras, "np": np, "curve": lambda p: p[:, 0] ** 2}


# Free text only where the magic does not evaluate it, and never with parentheses anywhere a token could
# land in an evaluated slot: no generated line can call a function.
SAFE = st.text(string.ascii_letters + string.digits + ",;:-_.[]'\"# ", max_size=8)
# Data and bad expressions: what the core judges as x or y, or what fails before it.
DATA = ["x", "y", "x[:2]", "y[:2]", "x[:, :1]", "x * 2", "nosuch", "None", "1", "'text'", "[1, 2]", "{'a': x}",
        "x[:2", "x]", "'", '"', "x.T", "[x, x]", "y[:, 0]"]  # fmt: skip
# Objects that are no data at all: a model, a module, functions.
OBJECTS = ["model", "np", "keras", "curve", "lambda p: p"]
LAYERS = st.one_of(
    st.lists(st.sampled_from(["0", "1", "2", "-1", "7", "hidden", "out", "nosuch", "", " ", "1.5"]), max_size=4).map(
        ",".join
    ),
    SAFE,
)


def _valid_or_odd(valid, odd):
    """Mostly a value the magic accepts, a quarter of the time an odd one: so lines both work and fail."""
    return st.integers(0, 3).flatmap(lambda pick: odd if pick == 0 else st.sampled_from(valid))


GRADIENT_OPTIONS = {
    "--wrt": _valid_or_odd(["weights", "input", "weights"], st.just("output") | SAFE),
    "--layer": _valid_or_odd(["0", "1", "hidden", "out", "0,out"], LAYERS),
    "--loss": _valid_or_odd(["mse", "mae"], st.sampled_from(["msee", "5", "[1]", "None", "curve", "nosuch", "'x'"])),
    "--output-index": _valid_or_odd(["0", "-1"], st.integers(-3, 5).map(str) | SAFE),
    "-o": _valid_or_odd(["res"], st.sampled_from(["2res", "class", "a-b", "x"]) | SAFE),
}
STRAY = ["--bogus", "-", "--", ",", ";", "#", "]", "[", "'", "-h", "--layer", "--wrt"]


@st.composite
def gradients_lines(draw, vocabulary=tuple(DATA)):
    """A %gradients line: MODEL X [Y] (often valid, else odd) and options with valid or odd values."""
    model = draw(_valid_or_odd(["model"], st.sampled_from(vocabulary)))
    odd_pair = st.tuples(st.sampled_from(vocabulary), st.sampled_from((*vocabulary, "")))
    x, y = draw(_valid_or_odd([("x", "y"), ("x[:3]", "y[:3]")], odd_pair))
    options = []
    for flag in draw(st.lists(st.sampled_from(sorted(GRADIENT_OPTIONS)), max_size=2, unique=True)):
        options.append([flag, draw(GRADIENT_OPTIONS[flag])])
    # --explain and --check rarely: each builds its own graphs (and --check a float64 copy), seconds apiece.
    flags = ["--training", "--full", "--plot", "--training", "--full", "--plot", "--explain", "--check"]
    options += [[flag] for flag in draw(st.lists(st.sampled_from(flags), max_size=2))]
    options = [options[i] for i in draw(st.permutations(range(len(options))))]
    tokens = [model, x, *([y] if y else []), *(t for option in options for t in option)]
    if draw(st.integers(0, 3)) == 0:
        tokens.insert(draw(st.integers(0, len(tokens))), draw(st.sampled_from(STRAY)))
    return " ".join(_quoted(token) for token in tokens)


def _quoted(word):
    return f'"{word}"' if (" " in word.strip() or word == "") and '"' not in word else word


@st.composite
def explore_lines(draw):
    """A %gradients_explore line: MODEL X [Y] and references, often valid, else odd, plus stray tokens."""
    odd = st.sampled_from(DATA + OBJECTS)
    tokens = [
        draw(_valid_or_odd(["model"], odd)),
        draw(_valid_or_odd(["x", "x[:3]"], odd)),
        *[draw(_valid_or_odd(["y", "y[:3]"], odd)) for _ in range(draw(st.integers(0, 1)))],
    ]
    for flag in draw(st.lists(st.sampled_from(["--reference", "--reference-grad"]), max_size=2, unique=True)):
        tokens += [flag, draw(_valid_or_odd(["curve", "lambda p: 2 * p"], odd))]
    tokens += draw(st.lists(st.just("--training"), max_size=1))
    if draw(st.integers(0, 3)) == 0:
        tokens.insert(draw(st.integers(0, len(tokens))), draw(st.sampled_from(STRAY)))
    return " ".join(_quoted(token) for token in tokens)


def _run_magic(ip, built, magic, line):
    """Run the magic on a fresh namespace; return the UsageError text, or None if it worked."""
    ip.push(_namespace(built))  # -o may have overwritten a name in an earlier example
    before = _state(built)
    try:
        with warnings.catch_warnings(), capture_output():
            warnings.simplefilter("ignore")  # e.g. "Y is ignored with --wrt input": a valid line's warning
            ip.run_line_magic(magic, line)
    except UsageError as exc:
        event(f"{magic}: UsageError")
        return str(exc), before
    event(f"{magic}: worked")
    return None, before


@settings(max_examples=120, **SETTINGS)
@given(line=gradients_lines())
def test_gradients_magic_works_or_says_one_line(ip, built, line):
    error, before = _run_magic(ip, built, "gradients", line)
    if error is not None:
        assert error.strip() and "\n" not in error, (line, error)
    assert _state(built) == before, line


@settings(max_examples=40, **SETTINGS)
@given(line=gradients_lines(vocabulary=tuple(DATA + OBJECTS)))
def test_gradients_magic_with_objects_as_data_works_or_says_one_line(ip, built, line):
    error, before = _run_magic(ip, built, "gradients", line)
    if error is not None:
        assert error.strip() and "\n" not in error, (line, error)
    assert _state(built) == before, line


@settings(max_examples=25, **SETTINGS)
@given(line=gradients_lines())
def test_a_failing_gradients_line_leaves_an_unbuilt_model_unbuilt(ip, built, line):
    fresh = _unbuilt()  # a new one each time: a working line builds it, as the core may
    ip.push({**_namespace(built), "model": fresh})
    try:
        with warnings.catch_warnings(), capture_output():
            warnings.simplefilter("ignore")
            ip.run_line_magic("gradients", line)
    except UsageError as exc:
        assert "\n" not in str(exc), (line, str(exc))
        assert not fresh.built and not fresh.variables, line


@settings(max_examples=60, **SETTINGS)
@given(line=explore_lines())
def test_explore_magic_works_or_says_one_line(ip, built, line):
    error, before = _run_magic(ip, built, "gradients_explore", line)
    if error is not None:
        assert error.strip() and "\n" not in error, (line, error)
    assert _state(built) == before, line
