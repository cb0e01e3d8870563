#!/usr/bin/env python3
"""Set up and run gradmagic locally, with nothing but Python installed.

    python3 dev.py lab    # create .venv, install gradmagic + JupyterLab + JAX, open the notebooks
    python3 dev.py test   # create .venv, install the test tools, JAX and CPU PyTorch, lint, run every pass

Both commands create the virtual environment ``.venv`` next to this file on first
use and reinstall only when ``pyproject.toml`` changes.

``test`` runs ``ruff``, then the whole suite on TensorFlow, then ``tests/every_backend``
once more in a process per other Keras backend (``KERAS_BACKEND=jax``, then ``torch``:
Keras fixes its backend at import), and on PyTorch once more with every question traced
from its first call (``torch-traced``). It fails if any pass fails or runs no test. Extra
arguments after ``test`` replace the four passes by one pytest run with them, on the
backend ``KERAS_BACKEND`` names (TensorFlow when unset):
``python3 dev.py test -k magics``, ``KERAS_BACKEND=jax python3 dev.py test tests/every_backend``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import venv
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("GRADMAGIC_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")

#: The PyTorch release the suite runs with (its CPU build); the ``torch`` extra's range starts here.
TORCH = "2.13.0"
#: PyTorch's own package index of CPU-only builds, asked only if pip's configured sources have none.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: The Keras backends besides TensorFlow that ``tests/every_backend`` runs on, each in its own process.
OTHER_BACKENDS = ("jax", "torch")
#: tests/every_backend's setting for a PyTorch pass where every question runs as a traced graph.
TRACED_FROM_FIRST = {"GRADMAGIC_TEST_TRACE_FROM_CALL": "1"}


def _is_linux_x86_64() -> bool:
    return sys.platform.startswith("linux") and platform.machine().lower() in {"x86_64", "amd64"}


def _tensorflow_extra() -> str:
    """``tensorflow-cpu`` where Google publishes it (Linux/Windows x86-64), else ``tensorflow``."""
    machine = platform.machine().lower()
    if sys.platform.startswith(("linux", "win")) and machine in {"x86_64", "amd64"}:
        return "cpu"
    return "tensorflow"


def _run(*cmd: str | Path, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True, env=env)


def _install_cpu_torch() -> None:
    """Install PyTorch's CPU-only build: the lightest that runs the suite (no GPU is used).

    On Linux x86-64 the ``torch`` wheel on PyPI is a CUDA build that pulls about
    5.5 GB of ``nvidia-*`` packages and fails to import without them; the CPU build
    ``torch==X+cpu`` (about 190 MB to download, 870 MB installed with its
    dependencies) is published on PyTorch's own index. pip is asked for it from
    its configured sources first (a ``find-links`` folder or an index set in
    ``pip.conf`` or ``PIP_EXTRA_INDEX_URL``), then from that index. Elsewhere
    (macOS, Windows, Linux on ARM) PyPI's wheel is already CPU-only.
    """
    if not _is_linux_x86_64():
        _run(PYTHON, "-m", "pip", "install", "--quiet", f"torch=={TORCH}")
        return
    try:
        _run(PYTHON, "-m", "pip", "install", "--quiet", f"torch=={TORCH}+cpu")
    except subprocess.CalledProcessError:
        print(f"No CPU build of torch {TORCH} in pip's sources; asking {TORCH_CPU_INDEX}", flush=True)
        _run(PYTHON, "-m", "pip", "install", "--quiet", f"torch=={TORCH}+cpu", "--extra-index-url", TORCH_CPU_INDEX)


def _install(extras: str, torch: bool = False) -> None:
    """Create the venv and install ``.[extras]`` (and CPU PyTorch) unless the same install is recorded."""
    if not PYTHON.exists():
        print(f"Creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    wanted = f"{_tensorflow_extra()},{extras}" + (",torch" if torch else "")
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + wanted.encode()).hexdigest()
    stamp = VENV / f".gradmagic-{wanted.replace(',', '-')}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    _run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    if torch:
        # Before gradmagic[torch]: its range is then met by the CPU build, and pip adds no CUDA build.
        _install_cpu_torch()
    _run(PYTHON, "-m", "pip", "install", "--quiet", "-e", f".[{wanted}]")
    stamp.write_text(digest)


def lab(args: list[str]) -> None:
    """Install gradmagic with JupyterLab (and JAX, for the notebook on JAX) and open the tutorial notebooks."""
    _install("lab,jax")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Jupyter refuses to start as root (containers, CI machines) unless told it may.
    as_root = ["--allow-root"] if getattr(os, "geteuid", lambda: 1)() == 0 and "--allow-root" not in args else []
    _run(BIN / "jupyter", "lab", "--notebook-dir", ROOT / "notebooks", *as_root, *args)


def _counts(report: Path) -> dict[str, int]:
    """passed/failed/skipped as pytest's JUnit XML report counts them (errors count as failed)."""
    suites = ET.parse(report).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def _pytest_pass(
    name: str, backend: str, paths: list[str], reports: Path, extra_env: dict[str, str]
) -> tuple[int, dict[str, int] | None]:
    """One pytest process with Keras on ``backend``: (exit code, counts or None if pytest wrote no report)."""
    report = reports / f"{name}.xml"
    env = {**os.environ, "KERAS_BACKEND": backend, **extra_env}
    settings = " ".join(f"{k}={v}" for k, v in {"KERAS_BACKEND": backend, **extra_env}.items())
    print(f"\n=== {name}: {settings} pytest {' '.join(paths)}", flush=True)
    code = subprocess.run(
        [str(PYTHON), "-m", "pytest", *paths, f"--junitxml={report}"], cwd=ROOT, env=env, check=False
    ).returncode
    return code, (_counts(report) if report.exists() else None)


def test(args: list[str]) -> None:
    """Install the test tools, lint, then run the suite on TensorFlow and tests/every_backend on JAX and PyTorch."""
    _install("lab,test,jax", torch=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _run(PYTHON, "-m", "ruff", "check", ".")
    _run(PYTHON, "-m", "ruff", "format", "--check", ".")
    if args:
        _run(PYTHON, "-m", "pytest", *args)
        return
    passes = [("tensorflow", "tensorflow", [], {})] + [(b, b, ["tests/every_backend"], {}) for b in OTHER_BACKENDS]
    # PyTorch traces a question at its second call; most tests ask once, so run them traced from the first too.
    passes.append(("torch-traced", "torch", ["tests/every_backend"], TRACED_FROM_FIRST))
    failures: list[str] = []
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    with tempfile.TemporaryDirectory() as reports:
        for name, backend, paths, extra_env in passes:
            code, counts = _pytest_pass(name, backend, paths, Path(reports), extra_env)
            # Exit 5 (no test collected) is a failure too: a pass that ran nothing tested nothing.
            if code != 0 or counts is None or counts["passed"] == 0:
                failures.append(f"{name} (pytest exit {code})")
            for key, value in (counts or {}).items():
                totals[key] += value
    print("\n=== every pass: " + ("FAILED: " + ", ".join(failures) if failures else "all passed"))
    print(f"total: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped", flush=True)
    if failures:
        sys.exit(1)


def main() -> None:
    commands = {"lab": lab, "test": test}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    try:
        commands[sys.argv[1]](sys.argv[2:])
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)


if __name__ == "__main__":
    main()
