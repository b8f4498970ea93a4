"""`cnsq view` in a real browser (Debian's Chromium, driven by Playwright) over the demo's results,
its imagery served by a tile server that needs the token.

    CNSQ_SCREENSHOT=docs/view.png python -m pytest tests/browser/test_view_browser.py

also writes the screenshot the README shows.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mercantile
import pytest

from cnsq.results.geojson import convert
from support.browser import launch, require_browser
from support.projects import SECRETS
from support.servers import TileServer

TOKEN = SECRETS["TILE_ACCESS_TOKEN"]
WIDTH, HEIGHT, PANEL = 1280, 800, 320


def above(results: Path, thresh: float) -> tuple[int, str]:
    """convert-geojson's count and output for ``thresh`` (score 1, as the demo thresholds)."""
    out = io.StringIO()
    with results.open(newline="") as handle:
        report = convert(handle, out, thresh_ind=1, thresh=thresh)
    return report.kept, out.getvalue()


def wait_for(page, expression: str, timeout: float = 30.0) -> None:
    """Poll ``expression`` in the page until it is true. (Playwright's wait_for_function evaluates
    a string with eval, which the page's Content-Security-Policy forbids, as it should.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(f"() => Boolean({expression})"):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:.0f}s: {expression}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    require_browser()
    from playwright.sync_api import sync_playwright

    from cnsq.local.demo import run_demo

    root = tmp_path_factory.mktemp("view")
    demo = root / "demo"
    run_demo(demo)
    content = {f"{p.parent.name}-{p.stem}-{p.parent.parent.name}": p.read_bytes()
               for p in (demo / "tiles").glob("*/*/*.png")}
    tiles = TileServer(content=content, only_content=True)  # the demo's zooms 12 to 15
    view = subprocess.Popen(
        [sys.executable, "-m", "cnsq.cli", "view", str(demo / "results.csv"), "--thresh_ind", "1",
         "--tile-endpoint", tiles.url + "/{z}/{x}/{y}.png?access_token={token}", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TILE_ACCESS_TOKEN": TOKEN, "XDG_CACHE_HOME": str(root / "cache")})
    url = view.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), view.stderr.read()
    seen: list[tuple[str, dict]] = []
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT},
                                accept_downloads=True)
        page.on("request", lambda request: seen.append((request.url, request.headers)))
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        page.goto(url)
        wait_for(page, "window.cnsqView && cnsqView.painted && cnsqView.above !== null")
        page.wait_for_load_state("networkidle")
        yield {"page": page, "seen": seen, "demo": demo, "tiles": tiles, "url": url, "view": view,
               "console": console, "browser": browser}
        browser.close()
    view.terminate()
    view.communicate(timeout=10)
    tiles.close()


def test_the_tiles_above_the_threshold_are_drawn(session):
    page, results = session["page"], session["demo"] / "results.csv"
    expected, _ = above(results, 0.5)
    assert expected > 0
    drawn = page.evaluate("cnsqView.drawn")
    assert drawn == 80  # the demo's tiles, each on its own at the zoom that fits them
    assert page.evaluate("cnsqView.drawnAbove") == expected
    assert page.locator("#count").get_attribute("data-above") == str(expected)
    assert page.locator("#count").inner_text().startswith(f"{expected} of 80 tiles")
    assert page.locator("#histogram rect").count() == 20


def test_moving_the_slider_recounts(session):
    page, results = session["page"], session["demo"] / "results.csv"
    slider = page.locator("#thresh")
    before = page.locator("#count").get_attribute("data-above")
    slider.focus()
    for _ in range(45):  # 0.5 → 0.05 in steps of 0.01, as a user's arrow keys move it
        page.keyboard.press("ArrowLeft")
    value = float(slider.input_value())
    assert value == pytest.approx(0.05)
    expected, _ = above(results, value)
    assert str(expected) != before  # the demo has scores between 0.05 and 0.5
    wait_for(page, f"document.querySelector('#count').dataset.above === '{expected}'")
    assert page.evaluate("cnsqView.drawnAbove") == expected
    slider.fill("0.5")  # back where it started, for the tests that follow
    wait_for(page, f"document.querySelector('#count').dataset.above === '{above(results, 0.5)[0]}'")


def test_a_click_shows_the_tile_id_and_every_score(session):
    page, results = session["page"], session["demo"] / "results.csv"
    with results.open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    tile_id, output = max(rows, key=lambda row: json.loads(row[1])[1])
    x, y, z = (int(v) for v in tile_id.split("-"))
    centre = mercantile.ul(x + 0.5, y + 0.5, z)
    at = page.evaluate(
        "([lat, lng]) => { const p = cnsqView.map.latLngToContainerPoint([lat, lng]);"
        " return [p.x, p.y]; }", [centre.lat, centre.lng])
    page.mouse.click(at[0], at[1])
    wait_for(page, f"document.querySelector('#info').innerText.includes('{tile_id}')")
    info = page.locator("#info").inner_text()
    for score in json.loads(output):
        assert f"{score:.6g}"[:5] in info, (score, info)


def test_the_download_button_gives_what_convert_geojson_writes(session):
    page, results = session["page"], session["demo"] / "results.csv"
    with page.expect_download() as event:
        page.locator("#download").click()
    download = event.value
    assert download.suggested_filename == "cnsq-above-0.5.geojson"
    _, expected = above(results, 0.5)
    assert Path(download.path()).read_text() == expected


def test_the_screenshot_shows_imagery_under_the_overlay(session, tmp_path):
    from PIL import Image

    page = session["page"]
    shot = tmp_path / "view.png"
    page.screenshot(path=str(shot))
    if os.environ.get("CNSQ_SCREENSHOT"):
        page.screenshot(path=os.environ["CNSQ_SCREENSHOT"])
    image = Image.open(shot).convert("RGB").crop((0, 0, WIDTH - PANEL, HEIGHT))
    pixels = list(zip(*(band.tobytes() for band in image.split()), strict=True))
    # The demo's land is green, its lakes blue; the overlay tints the tiles above in red/orange.
    land = sum(1 for r, g, b in pixels if g > r + 8 and g > b + 20 and 70 < g < 170)
    water = sum(1 for r, g, b in pixels if b > r + 60 and b > g + 40)
    overlay = sum(1 for r, g, b in pixels if r > g + 30)  # imagery alone is never red
    assert land > 0.10 * len(pixels), land
    assert water > 0.002 * len(pixels), water
    assert overlay > 0.02 * len(pixels), overlay


def test_no_request_from_the_page_carries_the_token(session):
    seen, tiles, url = session["seen"], session["tiles"], session["url"]
    assert any("/imagery/" in address for address, _ in seen)
    assert all(address.startswith(url) for address, _ in seen), \
        [a for a, _ in seen if not a.startswith(url)][:3]
    for address, headers in seen:
        assert TOKEN not in address and TOKEN not in json.dumps(headers)
    assert tiles.tokens and set(tiles.tokens) == {TOKEN}  # the server added it, for the endpoint


def test_a_stopped_server_is_said_on_the_page(session):
    page, view = session["page"], session["view"]
    view.terminate()  # last: the tests above need it
    view.wait(10)
    page.evaluate("cnsqView.map.panBy([60, 0], {animate: false})")
    wait_for(page, "document.querySelector('#status').innerText.includes('not answering')")
    assert "error" in page.locator("#status").get_attribute("class")


def test_the_page_works_under_its_content_security_policy(session):
    """The page's policy allows its own scripts and server only; nothing it does is refused."""
    refused = [m for m in session["console"] if "Content Security Policy" in m]
    assert refused == []


def test_a_large_file_is_drawn_then_its_tiles_at_their_zoom(session, tmp_path):
    """Past 4 MB the index's tiles are written while the page is already served: the page
    paints from parents, and zoomed in to the tiles it gets each tile (its request waits for
    them if need be), and a click on one shows its scores."""
    source = tmp_path / "results.csv"
    side = 400  # 160,000 results at zoom 17: about 5 MB
    with source.open("w") as out:
        out.write("tile,output\n")
        for i in range(side * side):
            p = (i * 7919 % 1000) / 1000
            out.write(f'{64000 + i % side}-{48000 + i // side}-17,"[{1 - p:.3f}, {p:.3f}]"\n')
    assert source.stat().st_size > 4 << 20
    view = subprocess.Popen([sys.executable, "-m", "cnsq.cli", "view", str(source), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        url = view.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), view.stderr.read()
        page = session["browser"].new_page(viewport={"width": WIDTH, "height": HEIGHT})
        try:
            page.goto(url)
            wait_for(page, "window.cnsqView && cnsqView.painted")
            assert page.evaluate("cnsqView.parents") > 0 and page.evaluate("cnsqView.drawn") == 0
            x, y = 64000 + side // 2, 48000 + side // 2
            centre = mercantile.ul(x + 0.5, y + 0.5, 17)
            page.evaluate("([lat, lng]) => { cnsqView.map.setView([lat, lng], 16); }",
                          [centre.lat, centre.lng])
            wait_for(page, "cnsqView.drawn > 0")
            at = page.evaluate(
                "([lat, lng]) => { const p = cnsqView.map.latLngToContainerPoint([lat, lng]);"
                " return [p.x, p.y]; }", [centre.lat, centre.lng])
            page.mouse.click(at[0], at[1])
            wait_for(page, f"document.querySelector('#info').innerText.includes('{x}-{y}-17')")
        finally:
            page.close()
    finally:
        view.terminate()
        _, err = view.communicate(timeout=10)
    assert "Traceback" not in err, err
    assert len(list((tmp_path / "cache").rglob("*.db"))) == 1  # written whole, in the cache
