"""How the package hangs together: front-ends use the core's public names, errors have one home, imports stay lazy."""

from __future__ import annotations

import ast
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import gradmagic
from gradmagic.errors import GradmagicError

PACKAGE = Path(gradmagic.__file__).parent
# The front-ends (and the lazy top-level namespace) may see the core only through gradmagic.core's re-exports.
FRONT_ENDS = [*sorted((PACKAGE / "widgets").glob("*.py")), *sorted((PACKAGE / "magics").glob("*.py")),
              PACKAGE / "plots.py", PACKAGE / "__init__.py"]  # fmt: skip


def _deep_core_imports(path: Path) -> list[str]:
    """Every import in ``path`` (at any depth, TYPE_CHECKING blocks included) of a module below gradmagic.core."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.name}:{node.lineno} {name}" for name in names if name.startswith("gradmagic.core.")]
    return found


def test_the_scan_sees_deep_imports(tmp_path):
    # The rule below must be able to fail: a file with both spellings of a deep import is caught.
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import gradmagic.core\nfrom gradmagic.core import explain\n"
        "def f():\n    import gradmagic.core.monitor.callback\n"
        "    from gradmagic.core.questions.inputs import model_spec\n"
    )
    assert _deep_core_imports(sample) == [
        "sample.py:4 gradmagic.core.monitor.callback",
        "sample.py:5 gradmagic.core.questions.inputs",
    ]


@pytest.mark.parametrize("path", FRONT_ENDS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_front_ends_import_only_the_core_public_names(path):
    assert _deep_core_imports(path) == []


def test_every_public_name_of_the_core_resolves():
    core = importlib.import_module("gradmagic.core")
    missing = [name for name in core.__all__ if not hasattr(core, name)]
    assert missing == []
    lazy = [name for name, module in gradmagic._LAZY.items() if module == "gradmagic.core"]
    assert set(lazy) <= set(core.__all__)


def test_import_gradmagic_does_not_import_tensorflow():
    code = (
        "import json, sys\n"
        "import gradmagic\n"
        "gradmagic.GradmagicError, gradmagic.GradientAnomalyError\n"
        "print(json.dumps({m: m in sys.modules for m in ('tensorflow', 'keras', 'gradmagic.core')}))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "tensorflow": False,
        "keras": False,
        "gradmagic.core": False,
    }


def test_the_core_imports_no_ipython_or_widgets():
    # TensorFlow itself may import parts of IPython; gradmagic's core must add nothing of it.
    code = (
        "import sys, keras, tensorflow\n"
        "before = set(sys.modules)\n"
        "import gradmagic.core\n"
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} & {'IPython', 'ipywidgets', 'matplotlib'}))"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _all_subclasses(cls: type) -> set[type]:
    return set(cls.__subclasses__()).union(*(_all_subclasses(c) for c in cls.__subclasses__()))


def test_every_gradmagic_error_is_defined_in_errors():
    for module in pkgutil.walk_packages(gradmagic.__path__, "gradmagic."):
        importlib.import_module(module.name)
    # Only the package's own classes: a test may subclass GradmagicError for its own purposes.
    ours = [c for c in _all_subclasses(GradmagicError) if c.__module__.startswith("gradmagic")]
    homes = {c.__qualname__: c.__module__ for c in ours}
    assert {"GradientAnomalyError", "MonitorArgumentError", "PanelArgumentError", "LayerError"} <= set(homes)
    assert {name: home for name, home in homes.items() if home != "gradmagic.errors"} == {}


def test_errors_moved_to_errors_keep_their_old_import_paths():
    from gradmagic import errors
    from gradmagic.core.monitor.anomaly import GradientAnomalyError
    from gradmagic.core.monitor.arguments import MonitorArgumentError
    from gradmagic.core.monitor.callback import MonitorArgumentError as FromCallback
    from gradmagic.widgets.training_panel import PanelArgumentError

    assert GradientAnomalyError is errors.GradientAnomalyError is gradmagic.GradientAnomalyError
    assert MonitorArgumentError is FromCallback is errors.MonitorArgumentError
    assert PanelArgumentError is errors.PanelArgumentError


@pytest.mark.parametrize("name", ["numpy", "openvino"])
def test_a_keras_backend_without_autodiff_is_refused_with_the_fix(name):
    from gradmagic.core.backends import check_backend

    assert check_backend() == "tensorflow"  # what this suite runs on
    assert [check_backend(b) for b in ("tensorflow", "jax", "torch")] == ["tensorflow", "jax", "torch"]
    with pytest.raises(GradmagicError) as info:
        check_backend(name)
    message = str(info.value)
    assert f"'{name}'" in message and "KERAS_BACKEND" in message and "'jax'" in message and "\n" not in message


def test_importing_one_core_module_imports_no_other_public_module():
    """The core re-exports lazily: a helper module alone must not pull in TensorFlow's implementations."""
    code = (
        "import sys; import gradmagic.core.display; "
        "print(any(m.startswith('gradmagic.core.questions.gradients') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# gradmagic's own private attributes read outside their class (the cache key reading its own slots).
_OWN_PRIVATE = {"_held", "_died", "_repr_html_"}


def _framework_internals(source: str) -> list[str]:
    """Uses of framework internals in one module: ``tensorflow.python``, protobufs, private attributes."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [getattr(node, "module", None) or "", *(alias.name for alias in node.names)]
            found += [f"line {node.lineno}: import {n}" for n in names if "tensorflow.python" in n or "pb2" in n]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner not in ("self", "cls") and node.attr not in _OWN_PRIVATE:
                found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            name = node.args[1] if len(node.args) > 1 else None
            on_self = isinstance(node.args[0], ast.Name) and node.args[0].id == "self"
            private = isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value.startswith("_")
            if private and not name.value.startswith("__") and not on_self:
                found.append(f"line {node.lineno}: {node.func.id}(..., {name.value!r})")
    return found


def test_the_internals_scan_finds_what_it_guards():
    source = (
        "from tensorflow.python.framework.ops import get_gradient_function\n"
        "from tensorflow.core.framework import summary_pb2\n"
        "x = model._compile_loss\n"
        "y = getattr(optimizer, '_trainable_variables', [])\n"
        "z = self._own\n"
    )
    assert len(_framework_internals(source)) == 4


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(PACKAGE.rglob("*.py")) if "backends" not in p.relative_to(PACKAGE).parts],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_framework_internals_are_used_only_behind_the_backend_door(path):
    assert _framework_internals(path.read_text()) == [], (
        f"{path.relative_to(PACKAGE)} uses a TensorFlow/Keras internal: put it behind a function in "
        f"gradmagic/core/backends/tensorflow.py (with a canary in tests/test_backend_tensorflow.py)"
    )
