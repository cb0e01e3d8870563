"""The Binder environment: ``binder/`` rebuilt the way repo2docker builds it, and the quickstart run in it.

repo2docker installs ``binder/requirements.txt`` (the root ``pyproject.toml`` is ignored once
``binder/`` exists), then runs ``binder/postBuild`` from the repository root. The ``slow`` tests do
the same once, in a fresh virtual environment, then check that the installed versions are exactly the
pinned ones, execute ``notebooks/00_quickstart.ipynb`` (the badge's target) with that environment's
``jupyter nbconvert``, and open it in that environment's JupyterLab in Chromium to see its widgets
render. Building downloads TensorFlow: a minute or two. ``slow`` tests run by default.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
BADGE_URL = "https://mybinder.org/v2/gh/gradmagic/gradmagic/HEAD?urlpath=lab/tree/notebooks/00_quickstart.ipynb"
BADGE = f"[![Binder](https://mybinder.org/badge_logo.svg)]({BADGE_URL})"
QUICKSTART = ROOT / "notebooks" / "00_quickstart.ipynb"

#: What the tutorials need on Binder; each must be pinned to one exact version.
REQUIRED = (
    "tensorflow-cpu",
    "keras",
    "ipywidgets",
    "jupyterlab-widgets",
    "ipympl",
    "matplotlib",
    "jupyterlab",
    "scikit-learn",
)

#: Widget model modules (as saved in widget state) and the JupyterLab extension that implements them.
_PROVIDERS = {
    "@jupyter-widgets/base": "@jupyter-widgets/jupyterlab-manager",
    "@jupyter-widgets/controls": "@jupyter-widgets/jupyterlab-manager",
    "@jupyter-widgets/output": "@jupyter-widgets/jupyterlab-manager",
    "jupyter-matplotlib": "jupyter-matplotlib",
}
#: Model-module major versions that jupyterlab-manager 5.x (the ipywidgets 8 front end) registers.
_MANAGER_MODELS = {"@jupyter-widgets/base": 2, "@jupyter-widgets/controls": 2, "@jupyter-widgets/output": 1}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    """``binder/requirements.txt`` as {canonical name: version}; anything but ``name==version`` fails."""
    found = {}
    for line in (BINDER / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)", line)
        assert match, f"binder/requirements.txt: {line!r} is not pinned as name==version"
        found[_canonical(match[1])] = match[2]
    return found


def _caret_allows(spec: str, version: str) -> bool:
    """npm's ``^x.y.z`` as widget modules use it: ``^0.12.0`` allows 0.12.*, ``^2.0.0`` allows 2.*."""
    wanted = [int(p) for p in spec.lstrip("^~").split(".") if p.isdigit()]
    have = [int(p) for p in re.findall(r"\d+", version)[:3]]
    if not spec.startswith("^"):
        return have[: len(wanted)] == wanted
    significant = next((i for i, part in enumerate(wanted) if part != 0), len(wanted) - 1)
    return have[: significant + 1] == wanted[: significant + 1] and have >= wanted


# --- fast checks of the files ----------------------------------------------------------------------------------------


def test_binder_files_pin_the_tutorial_stack():
    pinned = pins()
    missing = [name for name in REQUIRED if name not in pinned]
    assert not missing, f"binder/requirements.txt does not pin {missing}"
    assert pinned["ipympl"] == "0.10.0"
    assert "tensorflow" not in pinned, "pin tensorflow-cpu only: Binder has no GPU, and both would clash"
    # Next to TensorFlow, JAX is imported by every `import tensorflow` (tf.lite): 130 MB more in each kernel.
    assert "jax" not in pinned and "jaxlib" not in pinned, "the notebook on JAX installs it itself"
    assert re.fullmatch(r"python-3\.\d+", (BINDER / "runtime.txt").read_text().strip())
    post_build = BINDER / "postBuild"
    assert os.access(post_build, os.X_OK), "binder/postBuild must be executable"
    script = post_build.read_text()
    assert script.startswith("#!") and re.search(r"pip install .*--no-deps \.$", script, re.MULTILINE)


def test_readme_has_the_binder_badge_for_the_quickstart():
    readme = (ROOT / "README.md").read_text()
    assert BADGE in readme
    assert QUICKSTART.exists() and BADGE_URL.endswith(QUICKSTART.relative_to(ROOT).as_posix())


# --- the environment, rebuilt once -----------------------------------------------------------------------------------


def _run(cmd: list, env: dict, what: str, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        pytest.fail(f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}", pytrace=False)
    return done, seconds


class BinderEnv:
    """A virtual environment built from ``binder/`` as repo2docker would, and how to run things in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.venv = root / "binder-venv"
        self.bin = self.venv / "bin"
        self.python = self.bin / "python"
        self.timings: dict[str, float] = {}
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}",  # as in the image: the environment's bin first
            VIRTUAL_ENV=str(self.venv),
            PYTHONNOUSERSITE="1",
            PIP_DISABLE_PIP_VERSION_CHECK="1",
            # Only this environment's kernels, extensions and settings, not the user's.
            JUPYTER_DATA_DIR=str(root / "jupyter-data"),
            JUPYTER_CONFIG_DIR=str(root / "jupyter-config"),
            TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
        )
        self.env = env

    def run(self, cmd: list, what: str, **kwargs) -> subprocess.CompletedProcess:
        done, seconds = _run(cmd, self.env, what, **kwargs)
        self.timings[what] = self.timings.get(what, 0.0) + seconds
        return done

    def build(self) -> None:
        self.run([sys.executable, "-m", "venv", self.venv], "python -m venv")
        self.run(
            [self.python, "-m", "pip", "install", "--quiet", "-r", BINDER / "requirements.txt"],
            "pip install -r binder/requirements.txt",
            timeout=1500,
        )
        self.run([BINDER / "postBuild"], "binder/postBuild", cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def binder_env(tmp_path_factory):
    runtime = (BINDER / "runtime.txt").read_text().strip()
    here = f"python-{sys.version_info.major}.{sys.version_info.minor}"
    assert runtime == here, f"binder/runtime.txt asks for {runtime}, but this test builds with {here}: align them"
    env = BinderEnv(tmp_path_factory.mktemp("binder"))
    env.build()
    yield env
    print("\nBinder environment, seconds per step:", {step: round(s) for step, s in env.timings.items()})
    print(f"Binder tests in total: {sum(env.timings.values()):.0f} s")


def _lab_extensions(env: BinderEnv) -> dict[str, str]:
    """The enabled, OK JupyterLab extensions of the environment: {name: version}."""
    listing = env.run([env.bin / "jupyter", "labextension", "list"], "jupyter labextension list")
    text = re.sub(r"\x1b\[[0-9;]*m", "", listing.stdout + listing.stderr)
    return dict(re.findall(r"^\s+(\S+) v(\S+) enabled\s+OK", text, re.MULTILINE))


@pytest.mark.slow
def test_binder_environment_has_exactly_the_pinned_versions(binder_env):
    pinned = pins()
    report = binder_env.run(
        [binder_env.python, "-c", "import importlib.metadata as m, json, sys; "
         "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))", *pinned],
        "reading installed versions",
    )  # fmt: skip
    assert json.loads(report.stdout) == pinned
    binder_env.run([binder_env.python, "-m", "pip", "check"], "pip check")
    extensions = _lab_extensions(binder_env)
    for needed in ("@jupyter-widgets/jupyterlab-manager", "jupyter-matplotlib"):
        assert needed in extensions, f"{needed} is not an enabled JupyterLab extension: {extensions}"


@pytest.mark.slow
def test_quickstart_runs_in_the_binder_environment_with_matching_widget_front_ends(binder_env, tmp_path):
    # The quickstart, plus a last cell that reports which environment the kernel ran in.
    notebook = nbformat.read(QUICKSTART, as_version=4)
    notebook.cells.append(
        nbformat.v4.new_code_cell(
            "import json, sys, gradmagic\nprint(json.dumps({'prefix': sys.prefix, 'gradmagic': gradmagic.__file__}))"
        )
    )
    copy = tmp_path / QUICKSTART.name
    nbformat.write(notebook, copy)
    binder_env.run(
        [binder_env.bin / "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
         "--ExecutePreprocessor.kernel_name=python3", "--ExecutePreprocessor.timeout=600", copy],
        "execute 00_quickstart (nbconvert)",
        timeout=900,
    )  # fmt: skip
    executed = nbformat.read(copy, as_version=4)
    printed = "".join(o.get("text", "") for o in executed.cells[-1].outputs if o.get("name") == "stdout")
    probe = json.loads(printed.strip().splitlines()[-1])
    venv = binder_env.venv.resolve()
    assert Path(probe["prefix"]).resolve() == venv, "the kernel did not run in the Binder environment"
    installed = Path(probe["gradmagic"]).resolve()
    assert venv in installed.parents, f"gradmagic was imported from {installed}, not from postBuild's install"

    # Every widget the kernel created names a JavaScript module and version; an installed
    # JupyterLab extension must provide that version, or the browser shows an error instead.
    state = executed.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    modules = {(m["model_module"], m["model_module_version"]) for m in state.values()}
    assert any(module == "jupyter-matplotlib" for module, _ in modules), "the explorer drew no ipympl canvas"
    extensions = _lab_extensions(binder_env)
    for module, version in sorted(modules):
        provider = _PROVIDERS.get(module)
        assert provider in extensions, f"no enabled JupyterLab extension renders widget module {module}"
        if provider == "jupyter-matplotlib":
            assert _caret_allows(version, extensions[provider]), (module, version, extensions[provider])
        else:
            assert extensions[provider].split(".")[0] == "5", extensions[provider]
            assert int(version.split(".")[0]) == _MANAGER_MODELS[module], (module, version)


# True once the explorer's readout shows a point within one slider step of x0 = 0.5.
_POINT_NEAR_HALF = """
() => {
  const match = /x0=([-0-9.e]+)/.exec(document.querySelector(".gm-readout")?.innerText ?? "");
  return match !== null && Math.abs(parseFloat(match[1]) - 0.5) < 0.07;
}
"""

# Waits for the open notebook's kernel, then runs every cell, as Run > Run All Cells does.
_RUN_ALL_WHEN_KERNEL_READY = """
async () => {
  const panel = window.jupyterapp.shell.currentWidget;
  await panel.context.ready;
  await panel.sessionContext.ready;
  window.jupyterapp.commands.execute("notebook:run-all-cells");  // not awaited: the cells run on
}
"""


@pytest.mark.slow
def test_quickstart_widgets_render_in_the_binder_jupyterlab(binder_env, tmp_path):
    """Open the badge's URL path in the environment's own JupyterLab, run all cells, see the explorer."""
    from lab_driver import browser_page, chromium_path, jupyter_lab

    if chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is required in CI for the browser test: apt-get install chromium", pytrace=False)
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    # A copy, so that JupyterLab's autosave cannot write outputs into the repository.
    (tmp_path / "notebooks").mkdir()
    shutil.copy(QUICKSTART, tmp_path / "notebooks" / QUICKSTART.name)
    start = time.perf_counter()
    with (
        jupyter_lab(
            tmp_path,
            launcher=[binder_env.bin / "jupyter", "lab"],
            env=binder_env.env,
            extra_args=["--LabApp.expose_app_in_browser=True"],
        ) as url,
        browser_page() as page,
    ):
        page.goto(f"{url}/lab/tree/notebooks/{QUICKSTART.name}")  # the badge's urlpath
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget", timeout=60_000)
        page.evaluate(_RUN_ALL_WHEN_KERNEL_READY)
        canvas = ".gradmagic-explorer .jupyter-matplotlib-canvas-div canvas"
        page.wait_for_function(
            f"() => {{ const c = document.querySelector('{canvas}'); return c && c.width > 0; }}", timeout=180_000
        )
        page.wait_for_selector(".gradmagic-explorer .widget-slider .noUi-handle", timeout=60_000)
        # The notebook moves the point to x = 0.5; the readout then shows the kernel's numbers there.
        page.wait_for_function(_POINT_NEAR_HALF, timeout=120_000)
        page.screenshot(path=tmp_path / "quickstart.png")
        readout = page.locator(".gm-readout").inner_text()
        body = page.locator("body").inner_text()
    binder_env.timings["JupyterLab + Chromium: run 00_quickstart"] = time.perf_counter() - start
    for error in ("Error displaying widget", "Failed to load model class", "Could not render"):
        assert error not in body, f"{error!r} in the page; screenshot {tmp_path / 'quickstart.png'}"
    rows = dict(line.split("\t", 1) for line in readout.splitlines() if "\t" in line)
    shown = float(rows["d y / d x0"])
    assert abs(shown - (-0.36)) < 0.05, f"readout {rows}: dy/dx near x = 0.5 should be near 2(0.5 - 5)/25 = -0.36"
