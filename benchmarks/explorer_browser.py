"""Benchmark the explorer in a real browser: slider key press -> changed pixels.

Run: ``.venv/bin/python benchmarks/explorer_browser.py`` (needs Debian's Chromium).
Starts JupyterLab on loopback, opens the explorer on the seed net, and presses
ArrowRight on the slider 20 times, each time measuring inside the page the time
from the keydown event until the plot canvas shows new pixels. Target: <= 150 ms
median.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from browser import make_notebook
from lab_driver import MARK_KEYDOWN, WAIT_FOR_NEW_PIXELS, browser_page, jupyter_lab, run_notebook

CANVAS = ".jupyter-matplotlib-canvas-div canvas"


def main(moves: int = 20, image: bool = False) -> None:
    root = Path(tempfile.mkdtemp())
    if image:
        cells = make_notebook.write(root, "explorer.ipynb", make_notebook.MOBILENET_CELLS)
    else:
        cells = make_notebook.write(root)
    key = "ArrowLeft" if image else "ArrowRight"
    with jupyter_lab(root) as url, browser_page() as page:
        run_notebook(page, url, "explorer.ipynb", cells)
        page.wait_for_selector(".widget-slider .noUi-handle", timeout=180_000)
        page.wait_for_function(f"() => {{ const c = document.querySelector('{CANVAS}'); return c && c.width > 0; }}")
        time.sleep(2.0)
        page.locator(".widget-slider .noUi-handle").first.click()
        time.sleep(1.0)
        latencies = []
        for _ in range(moves):
            before = page.evaluate(f"() => document.querySelector('{CANVAS}').toDataURL()")
            page.evaluate(MARK_KEYDOWN)
            page.keyboard.press(key)
            changed = page.evaluate(WAIT_FOR_NEW_PIXELS, [CANVAS, before, 10_000])
            latencies.append(changed - page.evaluate("() => window.__gmKeydown"))
            time.sleep(0.3)  # one move at a time: latency, not throughput
    what = "image view (MobileNetV2 96x96), path slider" if image else "slider"
    print(f"{what} key press -> changed pixels over {moves} moves (ms):")
    print(f"  median {statistics.median(latencies):.1f}, min {min(latencies):.1f}, max {max(latencies):.1f}")
    print("  target: median <= 150 ms")


if __name__ == "__main__":
    main(image="--image" in sys.argv[1:])
