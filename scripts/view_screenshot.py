#!/usr/bin/env python3
"""The README's picture of `cnsq view`: the demo's results over its imagery, one tile clicked.

    python scripts/view_screenshot.py docs/view.png

Runs, in a temporary folder, what the README tells a new user to run (`cnsq demo`, then the
`cnsq view` command it prints), and photographs the page in Debian's Chromium with Playwright.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests")]

import mercantile  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from support.browser import launch  # noqa: E402


def until(page, expression: str, timeout: float = 30.0) -> None:
    """Poll ``expression`` until it is true: Playwright's wait_for_function evaluates a string
    with eval, which the page's Content-Security-Policy forbids, as it should."""
    import time

    deadline = time.monotonic() + timeout
    while not page.evaluate(f"() => Boolean({expression})"):
        if time.monotonic() > deadline:
            raise SystemExit(f"not true within {timeout:.0f} s: {expression}")
        time.sleep(0.05)


def main(target: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        cnsq = [sys.executable, "-m", "cnsq.cli"]
        subprocess.run([*cnsq, "demo"], cwd=work, check=True, stdout=subprocess.DEVNULL)
        view = subprocess.Popen([*cnsq, "view", "cnsq-demo/results.csv", "--tile-endpoint",
                                 "cnsq-demo/tiles", "--port", "0"], cwd=work,
                                stdout=subprocess.PIPE, text=True)
        try:
            url = view.stdout.readline().strip()
            with Path(work, "cnsq-demo", "results.csv").open(newline="") as handle:
                rows = list(csv.reader(handle))[1:]
            x, y, z = (int(v) for v in max(rows, key=lambda r: json.loads(r[1])[1])[0].split("-"))
            centre = mercantile.ul(x + 0.5, y + 0.5, z)
            with sync_playwright() as playwright:
                browser = launch(playwright)
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(url)
                until(page, "window.cnsqView && cnsqView.painted && cnsqView.above !== null")
                page.wait_for_load_state("networkidle")
                at = page.evaluate("([lat, lng]) => { const p = cnsqView.map.latLngToContainerPoint("
                                   "[lat, lng]); return [p.x, p.y]; }", [centre.lat, centre.lng])
                page.mouse.click(*at)
                until(page, "document.querySelector('#info table') !== null")
                page.screenshot(path=str(target))
                browser.close()
            from PIL import Image

            # 256 colours are plenty for a picture in a README, at two thirds of the bytes.
            Image.open(target).convert("RGB").quantize(256).save(target, optimize=True)
        finally:
            view.terminate()
            view.wait(10)
    print(f"wrote {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/view.png"))
