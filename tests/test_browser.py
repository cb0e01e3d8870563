"""The explorer in a real browser: JupyterLab + Chromium, driven like a user with the keyboard.

Locally the test skips when Chromium is missing; in CI (``CI`` set) it fails instead,
so it can never silently not run there.
"""

from __future__ import annotations

import os
import re
import time

import numpy as np
import pytest
from browser import make_notebook
from lab_driver import MARK_KEYDOWN, WAIT_FOR_NEW_PIXELS, browser_page, chromium_path, jupyter_lab, run_notebook

import gradmagic as gm
from gradmagic import examples

CANVAS = ".jupyter-matplotlib-canvas-div canvas"

if chromium_path() is None:
    if os.environ.get("CI"):
        pytest.fail("Chromium is required in CI for the browser test: apt-get install chromium", pytrace=False)
    pytest.skip(
        "Chromium is not installed (apt-get install chromium); skipping the browser test", allow_module_level=True
    )


def _readout(page) -> dict[str, str]:
    text = page.locator(".gm-readout").inner_text()
    rows = [line.split("\t") for line in text.splitlines() if "\t" in line]
    return {key.strip(): value.strip() for key, value in rows}


def test_slider_move_repaints_the_plots_with_the_cores_numbers(tmp_path):
    cells = make_notebook.write(tmp_path)
    with jupyter_lab(tmp_path) as url, browser_page() as page:
        run_notebook(page, url, "explorer.ipynb", cells)
        page.wait_for_selector(".widget-slider .noUi-handle", timeout=180_000)
        page.wait_for_function(f"() => {{ const c = document.querySelector('{CANVAS}'); return c && c.width > 0; }}")
        page.wait_for_selector(".gm-readout", timeout=60_000)
        time.sleep(1.0)
        plot = page.locator(".gradmagic-explorer .jupyter-matplotlib-canvas-div").first
        plot.screenshot(path=tmp_path / "before.png")
        before_readout = _readout(page)
        before_text = page.locator(".gm-readout").inner_text()
        before_pixels = page.evaluate(f"() => document.querySelector('{CANVAS}').toDataURL()")

        page.locator(".widget-slider .noUi-handle").first.click()
        for _ in range(5):
            page.keyboard.press("ArrowRight")
        page.evaluate(WAIT_FOR_NEW_PIXELS, [CANVAS, before_pixels, 15_000])
        page.wait_for_function(
            "before => document.querySelector('.gm-readout').innerText !== before", arg=before_text, timeout=15_000
        )
        time.sleep(1.0)  # let the last coalesced frame land
        plot.screenshot(path=tmp_path / "after.png")
        page.screenshot(path=tmp_path / "page.png")
        after = _readout(page)

    assert (tmp_path / "before.png").read_bytes() != (tmp_path / "after.png").read_bytes()
    point = float(re.search(r"x0=([-0-9.e]+)", after["point"]).group(1))
    assert point > float(re.search(r"x0=([-0-9.e]+)", before_readout["point"]).group(1))
    # The same net in this process (seeded, untrained) gives the core's value at that point.
    model = examples.regression_net(seed=1)
    expected = gm.input_gradients(model, np.array([[point]], "float32")).array.item()
    shown = float(after["d y / d x0"])
    assert shown == pytest.approx(expected, rel=1e-4, abs=1e-7)
    print(f"screenshots in {tmp_path}; d y/d x0 at {point}: shown {shown}, core {expected}")


# A short hash of the canvas pixels, computed in the page (a data URL is megabytes of text).
CANVAS_HASH = """
selector => { const c = document.querySelector(selector); if (!c || !c.width) return null;
  const s = c.toDataURL(); let h = 0;
  for (let i = 0; i < s.length; i += 7) h = (h * 31 + s.charCodeAt(i)) | 0;
  return h; }
"""


def _output_text(page) -> str:
    return page.evaluate("() => Array.from(document.querySelectorAll('.jp-OutputArea-output')).map(o => o.innerText)")


# Record each new canvas frame in the page itself until an output says "fit done": the page samples
# every 25 ms with no round-trip to the test process, so a loaded machine cannot hide frames from it.
RECORD_FRAMES_UNTIL_FIT_DONE = (
    """
selector => { const hash = """
    + CANVAS_HASH.strip()
    + """;
  window.__gmFrames = []; window.__gmFitDone = false;
  const timer = setInterval(() => {
    const outputs = Array.from(document.querySelectorAll('.jp-OutputArea-output')).map(o => o.innerText);
    if (outputs.some(t => t.includes('fit done'))) { window.__gmFitDone = true; clearInterval(timer); return; }
    const frame = hash(selector); const seen = window.__gmFrames;
    if (frame !== null && (!seen.length || seen[seen.length - 1] !== frame)) seen.push(frame);
  }, 25); }
"""
)


def test_training_panel_repaints_while_fit_runs_in_the_same_cell(tmp_path):
    cells = make_notebook.write(tmp_path, "training.ipynb", make_notebook.TRAINING_CELLS)
    with jupyter_lab(tmp_path) as url, browser_page() as page:
        run_notebook(page, url, "training.ipynb", cells)
        page.wait_for_function("() => document.body.innerText.includes('fit started')", timeout=180_000)
        # Sample the canvas while the cell that runs fit is still busy.
        page.evaluate(RECORD_FRAMES_UNTIL_FIT_DONE, CANVAS)
        page.wait_for_function("() => window.__gmFitDone", timeout=180_000, polling=200)
        frames_during_fit = page.evaluate("() => window.__gmFrames")
        time.sleep(1.0)  # the final frame, drawn when fit ends
        final = page.evaluate(CANVAS_HASH, CANVAS)
        page.screenshot(path=tmp_path / "page.png")
        done = next(text for text in _output_text(page) if "fit done" in text)

    steps, redraws = map(int, re.search(r"fit done: (\d+) steps, (\d+) redraws", done).groups())
    assert steps == 12 * 256
    # The canvas showed new curves while the kernel was busy in fit, not only afterwards (with
    # ipympl this needs the canvas sized without the front-end's handshake, which waits for fit).
    assert len(frames_during_fit) >= 3, (frames_during_fit, redraws)
    assert final != frames_during_fit[0] and redraws >= 2
    print(f"{len(frames_during_fit)} frames seen during fit, {redraws} redraws; screenshot in {tmp_path}")


def test_path_slider_on_the_image_view_repaints_the_maps(tmp_path):
    cells = make_notebook.write(tmp_path, "image.ipynb", make_notebook.IMAGE_CELLS)
    with jupyter_lab(tmp_path) as url, browser_page() as page:
        run_notebook(page, url, "image.ipynb", cells)
        page.wait_for_selector(".widget-slider .noUi-handle", timeout=180_000)
        page.wait_for_function(f"() => {{ const c = document.querySelector('{CANVAS}'); return c && c.width > 0; }}")
        page.wait_for_selector(".gm-readout", timeout=60_000)
        time.sleep(1.0)
        before_text = page.locator(".gm-readout").inner_text()
        before_pixels = page.evaluate(f"() => document.querySelector('{CANVAS}').toDataURL()")
        page.locator(".widget-slider .noUi-handle").first.click()  # the path slider, at a = 1
        page.evaluate(MARK_KEYDOWN)
        page.keyboard.press("ArrowLeft")
        changed = page.evaluate(WAIT_FOR_NEW_PIXELS, [CANVAS, before_pixels, 15_000])
        latency = changed - page.evaluate("() => window.__gmKeydown")
        for _ in range(4):
            page.keyboard.press("ArrowLeft")
        page.wait_for_function(
            "before => document.querySelector('.gm-readout').innerText !== before", arg=before_text, timeout=15_000
        )
        time.sleep(1.0)  # let the last coalesced frame land
        after_pixels = page.evaluate(f"() => document.querySelector('{CANVAS}').toDataURL()")
        page.screenshot(path=tmp_path / "page.png")
        after = _readout(page)

    assert after_pixels != before_pixels
    assert float(after["a"]) == pytest.approx(1.0 - 5 / 15, abs=1e-3)  # five steps of 1/15 down from 1
    print(f"path slider: first key press -> changed pixels {latency:.0f} ms; screenshot in {tmp_path}")
