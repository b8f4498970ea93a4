"""A real browser for page tests and the benchmark: Debian's Chromium driven by Playwright.

`.ci/run` installs Chromium (the package ``chromium``) when it is missing and sets
CNSQ_REQUIRE_BROWSER=1, so that in CI a missing browser fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil

# Headless, and quiet on a closed network: no background requests, updates or sync, whose
# refused connections would only slow the browser down.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    return os.environ.get("CNSQ_CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")


def launch(playwright):
    """A headless Chromium from the system (Playwright cannot download one here)."""
    return playwright.chromium.launch(executable_path=chromium_path(), args=ARGS)


def require_browser():
    """Skip when no Chromium is installed, unless CNSQ_REQUIRE_BROWSER is set (CI): then fail."""
    import pytest

    missing = []
    if chromium_path() is None:
        missing.append("Chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Playwright (pip install -e '.[test]')")
    if missing:
        message = "no browser for the page tests: install " + " and ".join(missing)
        if os.environ.get("CNSQ_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
