"""Real headless Chromium for the status page's tests (``tests/test_status_page.py``, the refused-search test).

Chromium comes from the system (``apt-get install -y chromium``), driven by Playwright's Python package with
``executable_path`` (never ``playwright install``: it downloads). Screenshots go to ``$PANAL_ARTIFACTS`` when
set (CI keeps them), else to the test's tmp_path. The ``browser`` fixture itself is in conftest.py.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

from conftest import InProcessHub
from playwright.async_api import Browser, Page, expect

__all__ = ["artifacts", "js_errors", "open_page"]

# Playwright's expectations wait on a condition, 5 s by default: a page that re-renders after a fetch
# on a loaded CI machine (several browsers and hubs at once) can take longer than that.
expect.set_options(timeout=20_000)


#: each open page's script errors, as :func:`open_page` collects them
_ERRORS: weakref.WeakKeyDictionary[Page, list[str]] = weakref.WeakKeyDictionary()


def js_errors(page: Page) -> list[str]:
    """The script errors of a page :func:`open_page` opened (not the board's refusals of v1/)."""
    return _ERRORS[page]


def _refusal(text: str) -> bool:
    """Chromium's own console line for a request the board refused on purpose (a v1/ call, a 429), not a script
    error."""
    return "v1/" in text or text.startswith("Failed to load resource: the server responded with a status of 429")


def artifacts(tmp_path: Path) -> Path:
    root = Path(os.environ.get("PANAL_ARTIFACTS") or tmp_path)
    root.mkdir(parents=True, exist_ok=True)
    return root


async def open_page(browser: Browser, hub: InProcessHub, width: int = 1280, height: int = 900,
                    color_scheme: Any = "light") -> Page:
    """The status page, live; :func:`js_errors` says its script errors."""
    assert hub.address is not None
    context = await browser.new_context(ignore_https_errors=True, viewport={"width": width, "height": height},
                                        color_scheme=color_scheme)
    page = await context.new_page()
    errors = _ERRORS[page] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" and not _refusal(msg.text) else None)
    await page.goto(hub.address.url + "/")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=10_000)
    return page
