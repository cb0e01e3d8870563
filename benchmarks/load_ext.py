"""Measure ``%load_ext gradmagic`` in fresh processes; check it leaves TensorFlow unloaded.

    python benchmarks/load_ext.py [--runs 5]

Each run starts a new Python process, creates an IPython shell (not timed), then
times ``%load_ext gradmagic`` alone and reports whether ``tensorflow`` (or
``keras``) is in ``sys.modules`` afterwards. The target is <= 0.5 s with
TensorFlow unloaded: TensorFlow takes seconds to import and is only needed once
a gradient is asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

TARGET_SECONDS = 0.5

_CHILD = """
import json, sys, time
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
start = time.perf_counter()
shell.run_line_magic("load_ext", "gradmagic")
seconds = time.perf_counter() - start
print(json.dumps({
    "seconds": seconds,
    "registered": "gradients" in shell.magics_manager.magics["line"],
    "tensorflow": "tensorflow" in sys.modules,
    "keras": "keras" in sys.modules,
}))
"""


def measure_once() -> dict:
    """Run one fresh process and return its measurement."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes to time (default 5)")
    runs = parser.parse_args().runs
    results = [measure_once() for _ in range(runs)]
    times = [r["seconds"] for r in results]
    median = statistics.median(times)
    spread = f"min {min(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms"
    print(f"%load_ext gradmagic: median {median * 1000:.1f} ms over {runs} fresh processes ({spread})")
    print(f"target: <= {TARGET_SECONDS * 1000:.0f} ms")
    print(f"magic registered: {all(r['registered'] for r in results)}")
    print(f"tensorflow imported by %load_ext: {any(r['tensorflow'] for r in results)}")
    print(f"keras imported by %load_ext: {any(r['keras'] for r in results)}")
    ok = median <= TARGET_SECONDS and not any(r["tensorflow"] for r in results)
    print("OK" if ok else "NOT OK")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
