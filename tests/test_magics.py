"""%gradients through a real InteractiveShell, checked against the core called directly."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_unchanged, fingerprint, mlp
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import gradmagic as gm
from gradmagic.magics import GradientMagics, ResultList, layer_summary, split_line
from gradmagic.plots import layer_norms, norm_figure

# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ip():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "gradmagic")
    yield shell
    shell.run_line_magic("unload_ext", "gradmagic")


def _linear(n_in=3, n_out=2):
    model = keras.Sequential([keras.Input((n_in,)), keras.layers.Dense(n_out, name="linear")], name="lin")
    model.compile(optimizer="sgd", loss="mse")
    return model


def _flagged():
    """A model with a NaN gradient (a division by zero) and a disconnected layer (stop_gradient)."""
    inp = keras.Input((2,), name="x")
    nan_src = keras.layers.Dense(3, name="nan_src")(inp)
    # The branch `where` does not select divides by zero: its gradient is 0 * inf = NaN.
    divided = keras.layers.Lambda(
        lambda t: keras.ops.where(keras.ops.ones_like(t) > 0, t, t / 0.0), name="divide_by_zero"
    )(nan_src)
    frozen = keras.layers.Dense(3, name="frozen")(inp)
    stopped = keras.layers.Lambda(keras.ops.stop_gradient, name="stop")(frozen)
    out = keras.layers.Dense(1, name="head")(keras.layers.Concatenate(name="merge")([divided, stopped]))
    model = keras.Model(inp, out, name="flagged")
    model.compile(optimizer="sgd", loss="mse")
    return model


@pytest.fixture(scope="module")
def ns(ip):
    """Tiny models and data in the shell's namespace (module-wide: compiled functions are reused)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3)).astype("float32")
    y = rng.normal(size=(5, 2)).astype("float32")
    values = {
        "model": mlp((3, 4, 2)),
        "lin": _linear(),
        "rounding": _rounding(),
        "x": x,
        "y": y,
        "data": {"x": x, "y": y},
    }
    ip.push(values)
    return values


def _rounding():
    """Dense 'pre' -> Lambda(tf.round) 'lam' -> Dense 'post': the Round stops every gradient to 'pre'."""
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(3, name="pre"),
            keras.layers.Lambda(tf.round, output_shape=(3,), name="lam"),
            keras.layers.Dense(2, name="post"),
        ],
        name="rounding",
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def _gradients(ip, line):
    return ip.run_line_magic("gradients", line)


def _assert_same_report(got, want):
    """Two reports (explain, check_gradients) agree: text exactly, numbers to float rounding.

    Each check_gradients call builds its own float64 copy of the model and so its own compiled graphs:
    their numbers agree to rounding, which is all two different graphs promise.
    """

    def walk(a, b, where):
        if isinstance(a, dict):
            assert list(a) == list(b), where
            for key in a:
                walk(a[key], b[key], f"{where}[{key!r}]")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), where
            for index, (u, v) in enumerate(zip(a, b)):
                walk(u, v, f"{where}[{index}]")
        elif isinstance(a, (float, np.floating)) and not isinstance(a, bool):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12, equal_nan=True, err_msg=where)
        else:
            assert a == b, where

    assert type(got) is type(want)
    walk(got.to_dict(), want.to_dict(), "to_dict()")
    if hasattr(want, "loss"):
        assert got.loss == pytest.approx(want.loss, rel=1e-6)


def _assert_same(got, want):
    """Two core results hold the same numbers (arrays, loss) and labels.

    Exact on purpose: the magic and the direct call reach the same cached compiled function with the same
    inputs, so this is one graph run twice, and any difference means the magic changed what it passed.
    """
    assert type(got) is type(want)
    assert [row.labels for row in got] == [row.labels for row in want]
    for a, b in zip([row.array for row in got], [row.array for row in want], strict=True):
        np.testing.assert_array_equal(a, b)
    assert getattr(got, "loss", None) == getattr(want, "loss", None)


# --- loading ------------------------------------------------------------------------------------------------------


def test_load_ext_in_a_fresh_process_registers_without_importing_tensorflow():
    code = (
        "import json, sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "ip.run_line_magic('load_ext', 'gradmagic')\n"
        "print(json.dumps({'magic': 'gradients' in ip.magics_manager.magics['line'],\n"
        "                  'tensorflow': 'tensorflow' in sys.modules, 'keras': 'keras' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"magic": True, "tensorflow": False, "keras": False}


def test_unload_and_reload_ext(ip, ns):
    manager = ip.magics_manager
    ip.run_line_magic("unload_ext", "gradmagic")
    assert "gradients" not in manager.magics["line"]
    assert GradientMagics.__name__ not in manager.registry
    with pytest.raises(UsageError, match="not found"):
        _gradients(ip, "lin x y")

    ip.run_line_magic("load_ext", "gradmagic")
    ip.run_line_magic("reload_ext", "gradmagic")
    assert manager.magics["line"]["gradients"].__self__ is manager.registry[GradientMagics.__name__]
    _assert_same(_gradients(ip, "lin x y"), gm.weight_gradients(ns["lin"], ns["x"], ns["y"]))


# --- each --wrt mode against the core and a closed form -----------------------------------------------------------


def test_weights_are_the_core_result_and_the_closed_form(ip, ns):
    got = _gradients(ip, "lin x y")
    _assert_same(got, gm.weight_gradients(ns["lin"], ns["x"], ns["y"]))
    # MSE over all entries: dL/dW = 2/N x^T (xW + b - y).
    w, b = (v.numpy() for v in ns["lin"].layers[0].weights)
    residual = ns["x"] @ w + b - ns["y"]
    np.testing.assert_allclose(got.arrays()[0], 2.0 / residual.size * ns["x"].T @ residual, rtol=1e-5, atol=1e-6)

    by_index = _gradients(ip, "model x y --layer 1")
    _assert_same(by_index, gm.weight_gradients(ns["model"], ns["x"], ns["y"], layer=1))
    by_name = _gradients(ip, f"model x y --layer {ns['model'].layers[1].name}")
    _assert_same(by_name, by_index)


def test_output_mode_is_the_core_result(ip, ns):
    got = _gradients(ip, "model x y --wrt output --layer 0")
    _assert_same(got, gm.output_gradients(ns["model"], ns["x"], ns["y"], 0))
    assert got.array.shape == (5, 4)


def test_input_mode_is_the_core_result_and_the_kernel(ip, ns):
    kernel = ns["lin"].layers[0].kernel.numpy()  # (3, 2): d out_j / d x_i = W[i, j]
    full = _gradients(ip, "lin x --wrt input")
    _assert_same(full, gm.input_gradients(ns["lin"], ns["x"]))
    np.testing.assert_allclose(full.array, np.broadcast_to(kernel.T, (5, 2, 3)), rtol=1e-6)

    unit = _gradients(ip, "lin x --wrt input --output-index 1")
    _assert_same(unit, gm.input_gradients(ns["lin"], ns["x"], output=1))
    np.testing.assert_allclose(unit.array, np.broadcast_to(kernel[:, 1], (5, 3)), rtol=1e-6)


def test_loss_and_training_options_reach_the_core(ip, ns):
    _assert_same(_gradients(ip, "lin x y --loss mae"), gm.weight_gradients(ns["lin"], ns["x"], ns["y"], loss="mae"))

    ip.run_cell("import keras\ndef half_squares(t, p):\n    return 0.5 * keras.ops.sum((p - t) ** 2, axis=-1)")
    custom = gm.weight_gradients(ns["lin"], ns["x"], ns["y"], loss=ip.user_ns["half_squares"])
    _assert_same(_gradients(ip, "lin x y --loss half_squares"), custom)

    bn = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(), keras.layers.Dense(2)]
    )
    bn.compile(loss="mse")
    ip.push({"bn": bn})
    before = fingerprint(bn)
    training = _gradients(ip, "bn x y --training")
    _assert_same(training, gm.weight_gradients(bn, ns["x"], ns["y"], training=True))
    inference = gm.weight_gradients(bn, ns["x"], ns["y"])
    assert not np.allclose(training.arrays()[0], inference.arrays()[0])  # batch statistics were used
    assert_unchanged(bn, before)


# --- -o, assignment, expressions, several layers ------------------------------------------------------------------


def test_o_stores_the_core_object_and_displays_its_table_once(ip, ns):
    with capture_output() as cap:
        returned = _gradients(ip, "model x y -o stored")
    assert returned is None
    _assert_same(ip.user_ns["stored"], gm.weight_gradients(ns["model"], ns["x"], ns["y"]))
    assert len(cap.outputs) == 1
    assert cap.outputs[0].data["text/html"] == ip.user_ns["stored"]._repr_html_()


def test_assignment_form_stores_the_result_without_displaying_it(ip, ns):
    with capture_output() as cap:
        cell = ip.run_cell("assigned = %gradients model x[:2] y[:2]")
    assert cell.success, cell.error_in_exec
    _assert_same(ip.user_ns["assigned"], gm.weight_gradients(ns["model"], ns["x"][:2], ns["y"][:2]))
    assert cap.outputs == []
    assert "Out" not in cap.stdout


def test_plain_call_is_shown_as_out_once_and_a_semicolon_silences_it(ip, ns):
    with capture_output() as cap:
        cell = ip.run_cell("%gradients model x y")
    assert isinstance(cell.result, gm.WeightGradients)
    assert cap.outputs == []  # only the displayhook shows it
    assert cap.stdout.count("dLoss/dW of model") == 1

    with capture_output() as cap:
        silenced = ip.run_cell("%gradients model x y;")
    assert silenced.success and silenced.result is None
    assert "dLoss/dW" not in cap.stdout


@pytest.mark.parametrize(
    "line",
    [
        "model x[:3] y[:3]",
        "model data['x'][:3] data['y'][:3]",
        "model x[0:3, :] y[0:3, :]",  # spaces inside brackets stay in the expression
        'model "x[:3] * 1" "y[:3]"',  # a quoted expression with spaces
        "[model][0] np.asarray(x)[:3] y[:3] --layer 1",
    ],
)
def test_arguments_are_python_expressions(ip, ns, line):
    ip.push({"np": np})
    layer = 1 if "--layer" in line else None
    _assert_same(_gradients(ip, line), gm.weight_gradients(ns["model"], ns["x"][:3], ns["y"][:3], layer=layer))


def test_split_line_keeps_expressions_whole():
    assert split_line("m x[0, :] {'a': xa, 'b': xb} --layer 1,3  # note") == [
        "m",
        "x[0, :]",
        "{'a': xa, 'b': xb}",
        "--layer",
        "1,3",
    ]
    assert split_line('m "x * 2" y --loss "mae";') == ["m", "x * 2", "y", "--loss", "mae"]


def test_several_layers_give_one_core_result_per_layer(ip, ns):
    model, x, y = ns["model"], ns["x"], ns["y"]
    second = model.layers[1].name
    for line in (f"model x y --layer 0 --layer {second}", f"model x y --layer 0,{second}"):
        got = _gradients(ip, line)
        assert isinstance(got, ResultList) and len(got) == 2
        _assert_same(got[0], gm.weight_gradients(model, x, y, layer=0))
        _assert_same(got[1], gm.weight_gradients(model, x, y, layer=second))

    outputs = _gradients(ip, "model x y --wrt output --layer 0,1 -o per_layer")
    assert outputs is None
    stored = ip.user_ns["per_layer"]
    for layer, result in zip((0, 1), stored, strict=True):
        _assert_same(result, gm.output_gradients(model, x, y, layer))
    html = ip.display_formatter.format(stored)[0]["text/html"]
    assert html == stored[0]._repr_html_() + stored[1]._repr_html_()


# --- --explain and --check: the core's reports -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "kwargs"),
    [
        ("", {}),
        ("y", {"y": True}),
        ("y --loss mae --training", {"y": True, "loss": "mae", "training": True}),
    ],
)
def test_explain_is_the_core_report_and_flags_the_round_layer(ip, ns, options, kwargs):
    model = ns["rounding"]
    before = fingerprint(model)

    got = _gradients(ip, f"rounding x {options} --explain")

    want = gm.explain(model, ns["x"], ns["y"] if kwargs.pop("y", False) else None, **kwargs)
    assert isinstance(got, gm.Explanation)
    _assert_same_report(got, want)
    assert [(r.name, r.verdict, r.op) for r in got.blocked] == [("lam", "no gradient", "Round")]
    assert [(r.name, r.verdict) for r in want.blocked] == [("lam", "no gradient")]
    assert {(d.path, d.cut_layer, d.cut_op) for d in got.disconnected} == {
        ("rounding/pre/kernel", "lam", "Round"),
        ("rounding/pre/bias", "lam", "Round"),
    }
    assert_unchanged(model, before)


def test_check_passes_on_a_healthy_model_with_the_core_numbers(ip, ns):
    model, x, y = ns["model"], ns["x"], ns["y"]
    before = fingerprint(model)

    got = _gradients(ip, "model x y --check")

    want = gm.check_gradients(model, x, y)
    assert isinstance(got, gm.GradientCheck)
    assert got.passed and got.dtype == "float64"
    assert got.max_rel_error == pytest.approx(want.max_rel_error, rel=1e-6)
    _assert_same_report(got, want)

    options = _gradients(ip, "model x y --check --loss mae --training")
    want = gm.check_gradients(model, x, y, loss="mae", training=True)
    _assert_same_report(options, want)
    assert options.loss != pytest.approx(got.loss, rel=1e-3)  # mae, not the compiled mse
    assert any("training=True" in note for note in options.notes)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("line", "kind"), [("rounding x --explain", gm.Explanation), ("lin x y --check", gm.GradientCheck)]
)
def test_explain_and_check_with_o_and_assignment_store_the_core_object(ip, ns, line, kind):
    with capture_output() as cap:
        assert _gradients(ip, f"{line} -o report") is None
    stored = ip.user_ns["report"]
    assert type(stored) is kind
    assert len(cap.outputs) == 1
    assert cap.outputs[0].data["text/html"] == stored._repr_html_()

    with capture_output() as cap:
        cell = ip.run_cell(f"assigned = %gradients {line}")
    assert cell.success, cell.error_in_exec
    assert type(ip.user_ns["assigned"]) is kind
    _assert_same_report(ip.user_ns["assigned"], stored)
    assert cap.outputs == [] and "Out" not in cap.stdout

    with capture_output() as cap:
        cell = ip.run_cell(f"%gradients {line}")
    assert type(cell.result) is kind and cap.outputs == []
    assert cap.stdout.count(repr(cell.result).splitlines()[0]) == 1  # shown once, as Out


# --- display: table, --full, --plot, summary ----------------------------------------------------------------------


def _rows_by_layer(html):
    """Map each table row's layer name to its CSS class."""
    rows = re.findall(r'<tr class="(gm-\w+)"[^>]*>(.*?)</tr>', html)
    return {re.findall(r"<td>(.*?)</td>", cells)[1]: css for css, cells in rows}


def test_html_table_marks_nan_and_disconnected_rows(ip):
    model = _flagged()
    x, y = np.ones((4, 2), "float32"), np.zeros((4, 1), "float32")
    ip.push({"flagged": model, "xf": x, "yf": y})
    result = _gradients(ip, "flagged xf yf")
    _assert_same(result, gm.weight_gradients(model, x, y))
    formatted, _ = ip.display_formatter.format(result)
    assert _rows_by_layer(formatted["text/html"]) == {
        "nan_src": "gm-nonfinite",
        "frozen": "gm-disconnected",
        "head": "gm-ok",
    }
    assert "<th>norm</th>" in formatted["text/html"] and "<th>NaN</th>" in formatted["text/html"]
    assert "NaN/Inf" in formatted["text/plain"]

    norms = dict((label, (norm, bad)) for label, norm, bad in layer_norms([result]))
    assert norms["2 frozen"] == (None, False)
    assert np.isnan(norms["1 nan_src"][0]) and norms["1 nan_src"][1]
    head = np.concatenate([a.ravel() for a in gm.weight_gradients(model, x, y, layer="head").arrays()])
    # Every layer's gradients there, one layer's here: two compiled graphs, equal to float32 rounding.
    np.testing.assert_allclose(norms["6 head"][0], np.linalg.norm(head), rtol=1e-5)


def test_full_shows_the_arrays_under_out(ip, ns, monkeypatch):
    events = []
    monkeypatch.setattr(ip.displayhook, "write_format_data", lambda data, md=None: events.append(("out", data)))
    monkeypatch.setattr(ip.display_pub, "publish", lambda data, **kw: events.append(("display", data)))
    callbacks = len(ip.events.callbacks["post_execute"])

    cell = ip.run_cell("%gradients lin x y --full")

    assert cell.success, cell.error_in_exec
    assert [kind for kind, _ in events] == ["out", "display"]  # arrays come after the table
    with np.printoptions(threshold=10_000, linewidth=110):
        kernel_text = np.array2string(gm.weight_gradients(ns["lin"], ns["x"], ns["y"]).arrays()[0])
    assert kernel_text in events[1][1]["text/plain"]
    assert "<pre>" in events[1][1]["text/html"]
    assert len(ip.events.callbacks["post_execute"]) == callbacks  # the one-shot display removed itself


def test_plot_draws_one_bar_per_layer_with_the_layer_norms(ip, ns):
    with capture_output() as cap:
        cell = ip.run_cell("%gradients model x y --plot -o plotted")
    assert cell.success, cell.error_in_exec
    assert [sorted(out.data) for out in cap.outputs] == [["text/html", "text/plain"], ["image/png", "text/plain"]]
    assert cap.outputs[1].data["image/png"][:8] == b"\x89PNG\r\n\x1a\n"

    model = ns["model"]
    expected = [
        np.linalg.norm(np.concatenate([a.ravel() for a in gm.weight_gradients(model, ns["x"], ns["y"], i).arrays()]))
        for i in range(len(model.layers))
    ]
    fig = norm_figure([ip.user_ns["plotted"]])
    ax = fig.axes[0]
    np.testing.assert_allclose([bar.get_height() for bar in ax.patches], expected, rtol=1e-5)
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{i} {lay.name}" for i, lay in enumerate(model.layers)]


def test_model_alone_prints_the_layer_summary(ip):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="hidden"), keras.layers.Dropout(0.5), keras.layers.Dense(2)]
    )
    ip.push({"summarised": model})
    with capture_output() as cap:
        assert _gradients(ip, "summarised") is None
    rows = layer_summary(model)
    assert len(rows) == len(model.layers)
    for index, (row, layer) in enumerate(zip(rows, model.layers, strict=True)):
        weights = layer.trainable_weights
        assert row == {
            "index": index,
            "name": layer.name,
            "type": type(layer).__name__,
            "output shape": str(tuple(layer.output.shape)),
            "trainable weights": len(weights),
            "params": sum(int(np.prod(w.shape)) for w in weights),
        }
        printed = re.search(rf"^{index}\s+{layer.name}\s+(.*)$", cap.stdout, re.MULTILINE).group(1).split("  ")
        assert [part.strip() for part in printed if part.strip()] == [str(v) for v in list(row.values())[2:]]
    assert "%gradients summarised x y --layer 2" in cap.stdout  # the last layer with weights


def test_help_documents_every_option_and_an_example_per_mode(ip):
    doc = ip.find_line_magic("gradients").__doc__
    options = ("--wrt", "--layer", "--loss", "--training", "--output-index", "-o VAR", "--full", "--plot")
    for option in (*options, "--explain", "--check"):
        assert option in doc
    examples = ("%gradients model x_train[:32] y_train[:32]", "--wrt output --layer 2", "--wrt input")
    for example in (*examples, "%gradients model x --explain", "%gradients model x y --check"):
        assert example in doc

    with capture_output() as cap:
        ip.run_cell("%gradients?")
    assert "%gradients model x --explain" in cap.stdout and "%gradients model x y --check" in cap.stdout
    assert "[--explain] [--check]" in cap.stdout


# --- user mistakes ------------------------------------------------------------------------------------------------


MISTAKES = [
    ("nosuch x y", "'nosuch' is not defined"),
    ("model dta['x'] y", "'dta' is not defined in the notebook namespace. Did you mean 'data'"),
    ("model x[:, 9] y", "X = 'x[:, 9]', which failed to evaluate: IndexError"),
    ("x x y", "MODEL = 'x', which is a ndarray, not a Keras model"),
    ("model x y --bogus", "unrecognized arguments: --bogus"),
    ("model x y --wrt inputs", "invalid choice: 'inputs'"),
    ("model x y --wrt inputs", "Example: --wrt input."),
    ("model x y --output-index one --wrt input", "invalid int value: 'one'"),
    ("model x y --output-index one --wrt input", "Example: --output-index 0."),
    ("model x y -o", "argument -o: expected one argument"),
    ("model x y --layer", "argument --layer: expected one argument. Received: %gradients model x y --layer."),
    ("model x[:2 y", "lacks a closing ']'"),
    ("", "required: MODEL"),
    ("model x", "--wrt weights without Y"),
    ("model x y --wrt output", "--wrt output without --layer"),
    ("model x --wrt input --layer 1", "--layer with --wrt input"),
    ("model x y --output-index 0", "--output-index 0 with --wrt weights"),
    ("model --layer 1", "--layer but no X"),
    ("model x y -o 2res", "-o '2res'"),
    ("model x y --layer 7", "layer=7"),  # the core's messages, as they are
    ("model x y --layer dense_9", "no layer of that name"),
    ("model x y --loss msee", "loss='msee', which is not a Keras loss"),
    ("model x[:, :2] y", "expects (batch, 3)"),
    ("model x y[:2]", "y with 2 samples, but x has 5"),
    ("model x y --explain --check", "--explain and --check together"),
    ("model x --explain --layer 1", "--explain with --layer."),
    ("model x --explain --full", "--explain with --full."),
    ("model x --explain --output-index 0", "--explain with --output-index."),
    ("model x --explain --wrt weights", "--explain with --wrt."),
    ("model x y --check --layer 0 --plot", "--check with --layer, --plot."),
    ("model x --check", "--check without Y"),
    ("model x --explain --loss mae", "--loss mae with --explain but no Y"),
    ("model --check", "--check but no X"),
    ("model x y[:2] --check", "y with 2 samples, but x has 5"),  # the core's messages, as they are
    ("model x y --explain --loss msee", "loss='msee', which is not a Keras loss"),
    ("model x y --layer ,,,", "--layer ',,,', which has nothing but commas. Expected layer indices or names"),
    ("model x y --layer 1,,2", "--layer '1,,2', which has an empty item. Expected layer indices or names"),
    ("model x y --layer 1 --layer ''", "--layer '', which is empty"),
    ("model x y --layer 0,", "--layer '0,', which has an empty item"),
    ("model x y --loss 5", "--loss '5', which is an int. Expected a Keras loss name or a callable, e.g. --loss mae"),
    ("model x y --loss [1]", "--loss '[1]', which is a list"),
]


@pytest.mark.parametrize(("line", "message"), MISTAKES)
def test_user_mistakes_are_usage_errors_naming_the_problem(ip, ns, line, message):
    before = fingerprint(ns["model"])
    with pytest.raises(UsageError) as raised:
        _gradients(ip, line)
    assert message in str(raised.value)

    with capture_output() as cap:
        cell = ip.run_cell(f"%gradients {line}")
    assert isinstance(cell.error_in_exec, UsageError) and not cell.success
    assert "Traceback" not in cap.stdout + cap.stderr
    assert message in cap.stderr
    assert_unchanged(ns["model"], before)


EXPLORE_MISTAKES = [
    ("lin x --reference 5", "--reference '5', which is an int, not a function. Expected a callable"),
    ("lin x --reference-grad x", "--reference-grad 'x', which is a ndarray, not a function"),
    ("lin x --reference nosuch", "--reference = 'nosuch', but 'nosuch' is not defined"),
    (
        'lin x --reference "lambda p: 1 / 0"',
        "Received: reference=<lambda>, which raised ZeroDivisionError: division by zero",
    ),
    ('lin x --reference "lambda p: p[:2]"', "Received: reference=<lambda>, which returned shape (2, 3)"),
    ("lin x y[:2]", "Received: y with 2 rows for x with 5"),
    ("lin dataset", "Received: x as a _BatchDataset. The explorer needs the points themselves"),
    ("lin x y --bogus", "unrecognized arguments: --bogus. Received: %gradients_explore lin x y --bogus."),
    ("lin x[:2", "Received: %gradients_explore lin x[:2, which lacks a closing ']'"),
    ("nosuch x", "'nosuch' is not defined in the notebook namespace"),
    (
        "lin x --reference",
        "argument --reference: expected one argument. Received: %gradients_explore lin x --reference.",
    ),
    ("lin x --reference", 'Example: --reference "lambda p: (p - 5) ** 2 / 25".'),
    ("x x", "MODEL = 'x', which is a ndarray, not a Keras model"),
]


@pytest.mark.parametrize(("line", "message"), EXPLORE_MISTAKES)
def test_explore_mistakes_are_one_line_usage_errors(ip, ns, line, message):
    ip.push({"dataset": tf.data.Dataset.from_tensor_slices(ns["x"]).batch(2)})
    before = fingerprint(ns["lin"])
    with pytest.raises(UsageError) as raised:
        ip.run_line_magic("gradients_explore", line)
    text = str(raised.value)
    assert message in text and "\n" not in text
    if "Received: reference=" not in message and "Received: x" not in message and " rows " not in message:
        assert "%gradients_explore MODEL X [Y]" in text  # the explore usage, not %gradients'

    with capture_output() as cap:
        cell = ip.run_cell(f"%gradients_explore {line}")
    assert isinstance(cell.error_in_exec, UsageError)
    assert "Traceback" not in cap.stdout + cap.stderr
    assert len(cap.stderr.strip().splitlines()) == 1 and message in cap.stderr
    assert_unchanged(ns["lin"], before)


def test_a_failing_reference_keeps_the_users_exception_chained(ip, ns):
    ip.run_cell("def broken(points):\n    raise KeyError('my curve')")
    with pytest.raises(UsageError, match="reference=broken, which raised KeyError") as raised:
        ip.run_line_magic("gradients_explore", "lin x --reference broken")
    assert isinstance(raised.value.__cause__, gm.GradmagicError)
    assert isinstance(raised.value.__cause__.__cause__, KeyError)  # the user's own traceback, one step away


class _PairBatches(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return self.x, self.y


@pytest.mark.parametrize(
    ("options", "function"),
    [
        ("", "weight_gradients"),  # no Y: the stream's batches carry the targets
        ("--wrt output --layer 0", "output_gradients"),
        ("--wrt input", "input_gradients"),
        ("--check", "check_gradients"),
        ("--explain --loss mae", "explain"),
    ],
)
@pytest.mark.parametrize("kind", ["dataset", "generator", "pydataset"])
def test_a_dataset_or_generator_as_x_reaches_the_core_unchanged(ip, ns, monkeypatch, options, function, kind):
    import gradmagic.core as core

    received = []

    class Reached(Exception):
        pass

    def spy(model, x, *args, **kwargs):
        received.append((x, args[:1] if args else kwargs.get("y")))
        raise Reached

    monkeypatch.setattr(core, function, spy)
    x, y = ns["x"], ns["y"]
    data = {
        "dataset": lambda: tf.data.Dataset.from_tensor_slices((x, y)).batch(2),
        "generator": lambda: ((x[i : i + 2], y[i : i + 2]) for i in range(0, 5, 2)),
        "pydataset": lambda: _PairBatches(x, y),
    }[kind]()
    ip.push({"stream": data})
    with pytest.raises(Reached):
        _gradients(ip, f"lin stream {options}")
    ((passed, targets),) = received
    assert passed is data  # not iterated, copied or converted by the magic
    assert targets in ((), (None,), None)  # no Y given: the core reads it from the stream
    if kind == "generator":
        assert next(data)[0].shape == (2, 3)  # the magic drew nothing from it


def test_a_dataset_without_y_gives_the_gradients_of_its_first_batch(ip, ns):
    ip.push({"batches": tf.data.Dataset.from_tensor_slices((ns["x"], ns["y"])).batch(2)})
    got = _gradients(ip, "lin batches")
    want = gm.weight_gradients(ns["lin"], ns["x"][:2], ns["y"][:2])
    assert got.loss == pytest.approx(want.loss, rel=1e-6)  # the same math on the same batch, maybe another graph
    for a, b in zip(got.arrays(), want.arrays(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_layer_without_weights_is_a_usage_error(ip, ns):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dropout(0.5, name="drop")])
    model.compile(loss="mse")
    ip.push({"dropping": model})
    before = fingerprint(model)
    with pytest.raises(UsageError, match=r"layer 1 'drop' \(Dropout\).*no weights"):
        _gradients(ip, "dropping x y --layer drop")
    assert_unchanged(model, before)


def test_targets_with_input_mode_warn_and_are_ignored(ip, ns):
    with pytest.warns(UserWarning, match="Y = 'y' with --wrt input"):
        got = _gradients(ip, "lin x y --wrt input")
    _assert_same(got, gm.input_gradients(ns["lin"], ns["x"]))
