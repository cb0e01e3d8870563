"""Drive a real JupyterLab in Debian's Chromium with Playwright (for browser tests and benchmarks).

JupyterLab runs on loopback with no token, rooted in a folder of the caller's;
Chromium is the system one (``playwright install`` cannot download browsers here).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str | None:
    """The system Chromium, or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def jupyter_lab(
    root: Path,
    timeout: float = 90.0,
    launcher: Sequence[str | Path] = (sys.executable, "-m", "jupyterlab"),
    env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """Run JupyterLab on a free loopback port; yield its base URL; stop it afterwards.

    Args:
        root: The server's root folder (its log goes there too).
        timeout: Seconds to wait for ``/lab`` to answer.
        launcher: The command that starts JupyterLab (another environment's ``jupyter lab``).
        env: The server's environment. Defaults to this process's.
        extra_args: More server options.
    """
    port = _free_port()
    command = [
        *map(str, launcher),
        "--no-browser",
        f"--port={port}",
        "--ip=127.0.0.1",
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        "--allow-root",
        f"--ServerApp.root_dir={root}",
        *extra_args,
    ]
    log = (root / "jupyter.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/lab", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    log.flush()
                    tail = (root / "jupyter.log").read_text()[-3000:]
                    raise RuntimeError(f"JupyterLab did not start:\n{tail}") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@contextlib.contextmanager
def browser_page(viewport: tuple[int, int] = (1400, 1000)) -> Iterator[Any]:
    """A Playwright page in headless system Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            yield page
        finally:
            browser.close()


def run_notebook(page: Any, url: str, name: str, cells: int, settle: float = 4.0) -> None:
    """Open a notebook in JupyterLab and run its first ``cells`` cells with Shift+Enter."""
    page.goto(f"{url}/lab/tree/{name}")
    page.wait_for_selector(".jp-Notebook", timeout=90_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    time.sleep(settle)  # let the kernel start before the first Shift+Enter
    page.locator(".jp-Cell .jp-InputArea-editor").first.click()
    for _ in range(cells):
        page.keyboard.press("Shift+Enter")
        time.sleep(0.3)


# Resolves with performance.now() once the canvas shows other pixels than `before`.
WAIT_FOR_NEW_PIXELS = """
([selector, before, timeoutMs]) => new Promise((resolve, reject) => {
  const start = performance.now();
  const poll = () => {
    const canvas = document.querySelector(selector);
    if (canvas && canvas.toDataURL() !== before) { resolve(performance.now()); return; }
    if (performance.now() - start > timeoutMs) { reject(new Error("canvas did not change")); return; }
    requestAnimationFrame(poll);
  };
  poll();
})
"""

# Records the time of the next keydown, so latency is measured inside the page.
MARK_KEYDOWN = """
() => { window.__gmKeydown = null;
  document.addEventListener("keydown", () => { window.__gmKeydown = performance.now(); },
                            {capture: true, once: true}); }
"""
