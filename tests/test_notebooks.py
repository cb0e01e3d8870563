"""Every tutorial notebook runs top to bottom on a fresh kernel, within what Binder gives it.

Each notebook asserts its own numbers in its cells, so executing it is the test. It runs in a
subprocess pinned to 2 CPUs (Binder's share), which starts the kernel with nbclient and reaps it at
shutdown, so ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of that subprocess is the kernel's peak resident
memory. Wall time covers kernel start, every cell and shutdown. ``pytest -s`` shows the numbers; they
are also recorded as properties in JUnit XML.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

#: Binder's guarantees: a tutorial must finish within 2 minutes on 2 CPUs and peak below 1 GB.
MAX_SECONDS = 120.0
MAX_PEAK_BYTES = 1_000_000_000
CPUS = 2
#: Importing TensorFlow alone takes more; less means the kernel's memory was not measured.
MIN_PLAUSIBLE_PEAK_BYTES = 100_000_000

# Runs in a fresh interpreter: argv = [notebook, working directory, CPUs]; prints one JSON line.
_RUNNER = """
import json, os, resource, sys, time
import nbformat
from nbclient import NotebookClient

if hasattr(os, "sched_setaffinity"):  # the kernel inherits this: Binder-sized CPU share
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: int(sys.argv[3])])
notebook = nbformat.read(sys.argv[1], as_version=4)
start = time.perf_counter()
NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
seconds = time.perf_counter() - start
# The kernel is this process's child, reaped at shutdown; ru_maxrss is KiB on Linux, bytes on macOS.
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"seconds": seconds, "peak_bytes": peak}))
"""


def test_there_are_tutorials_and_the_readme_lists_each():
    assert NOTEBOOKS, "notebooks/ has no .ipynb files"
    readme = (ROOT / "README.md").read_text()
    missing = [path.name for path in NOTEBOOKS if f"notebooks/{path.name}" not in readme]
    assert not missing, f"README.md does not list {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_shaped_as_a_tutorial(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs are committed"
    assert "widgets" not in notebook.metadata, f"{path.name}: widget state is committed"
    first, last = notebook.cells[0], notebook.cells[-1]
    # Opens with the question in a user's words (an italic quote ending in "?"), ends with what to try next.
    assert first.cell_type == "markdown" and re.search(r'\*"[^"]+\?"\*', first.source), first.source
    assert last.cell_type == "markdown" and last.source.startswith("## What to try next"), last.source
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert "assert " in code, f"{path.name} asserts nothing, so executing it tests nothing"
    # keras.utils.set_random_seed, or on JAX/PyTorch its Python and NumPy steps alone (it also imports TensorFlow).
    seeded = "set_random_seed" in code or ("random.seed(" in code and "np.random.seed(" in code)
    assert seeded, f"{path.name} is not seeded"


def _without_jax(env: dict[str, str], folder: Path) -> dict[str, str]:
    """``env`` for a kernel in which ``import jax`` fails as if JAX were not installed.

    Binder's environment has no JAX (``binder/requirements.txt``), but this suite's has, for its JAX
    pass; next to JAX, every ``import tensorflow`` imports it too (tf.lite does), some 130 MB more. A
    TensorFlow tutorial's kernel is measured as it runs on Binder, so a package named ``jax`` that
    raises ImportError comes first on its path (TensorFlow catches that).
    """
    shim = folder / "jax"
    shim.mkdir()
    (shim / "__init__.py").write_text('raise ImportError("JAX is left out, as in the Binder environment")\n')
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH", "")]))}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_clean_within_binder_limits(path, record_property, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}
    if 'os.environ["KERAS_BACKEND"] = "jax"' not in path.read_text().replace('\\"', '"'):
        env = _without_jax(env, tmp_path)
    run = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(path), str(path.parent), str(CPUS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if run.returncode != 0:
        pytest.fail(f"{path.name} failed on a fresh kernel:\n{run.stderr[-6000:]}", pytrace=False)
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    seconds, peak = measured["seconds"], measured["peak_bytes"]
    record_property("seconds", round(seconds, 1))
    record_property("peak_kernel_bytes", peak)
    print(
        f"\n{path.stem}: {seconds:.1f} s, kernel peak RSS {peak / 1e6:.0f} MB "
        f"(limits: {MAX_SECONDS:.0f} s, {MAX_PEAK_BYTES / 1e6:.0f} MB, {CPUS} CPUs)"
    )
    assert seconds < MAX_SECONDS, f"{path.name} took {seconds:.1f} s; Binder users wait at most {MAX_SECONDS:.0f} s"
    assert peak > MIN_PLAUSIBLE_PEAK_BYTES, f"kernel memory was not measured ({peak} bytes)"
    assert peak < MAX_PEAK_BYTES, f"{path.name}'s kernel peaked at {peak / 1e6:.0f} MB; Binder guarantees 1 GB"
