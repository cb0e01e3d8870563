#!/usr/bin/env python3
"""Set up and run gradmagic locally, with nothing but Python installed.

    python3 dev.py lab    # create .venv, install gradmagic + JupyterLab, open the notebooks
    python3 dev.py test   # create .venv, install the test tools, run lint and the whole suite

Both commands create the virtual environment ``.venv`` next to this file on first
use and reinstall only when ``pyproject.toml`` changes. Extra arguments after
``test`` go to pytest (``python3 dev.py test -k magics``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("GRADMAGIC_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")


def _tensorflow_extra() -> str:
    """``tensorflow-cpu`` where Google publishes it (Linux/Windows x86-64), else ``tensorflow``."""
    machine = platform.machine().lower()
    if sys.platform.startswith(("linux", "win")) and machine in {"x86_64", "amd64"}:
        return "cpu"
    return "tensorflow"


def _run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def _install(extras: str) -> None:
    """Create the venv and install ``.[extras]`` unless the same install is recorded."""
    if not PYTHON.exists():
        print(f"Creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    wanted = f"{_tensorflow_extra()},{extras}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + wanted.encode()).hexdigest()
    stamp = VENV / f".gradmagic-{wanted.replace(',', '-')}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    _run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    _run(PYTHON, "-m", "pip", "install", "--quiet", "-e", f".[{wanted}]")
    stamp.write_text(digest)


def lab(args: list[str]) -> None:
    """Install gradmagic with JupyterLab and open the tutorial notebooks."""
    _install("lab")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Jupyter refuses to start as root (containers, CI machines) unless told it may.
    as_root = ["--allow-root"] if getattr(os, "geteuid", lambda: 1)() == 0 and "--allow-root" not in args else []
    _run(BIN / "jupyter", "lab", "--notebook-dir", ROOT / "notebooks", *as_root, *args)


def test(args: list[str]) -> None:
    """Install the test tools, then lint and run the whole test suite."""
    _install("lab,test")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _run(PYTHON, "-m", "ruff", "check", ".")
    _run(PYTHON, "-m", "ruff", "format", "--check", ".")
    _run(PYTHON, "-m", "pytest", *args)


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
