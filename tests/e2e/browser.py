"""The real browser of the page tests: Debian's chromium driven by Playwright (never
`playwright install`), and the script errors a page shows, any of which fails a test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def require_chromium() -> None:
    """At a test module's top: skip it without chromium, or fail in CI, which must have it."""
    if CHROMIUM.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    pytest.skip(f"{CHROMIUM} is missing: run `make browser`", allow_module_level=True)


@contextmanager
def launched() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Problems:
    """Script errors (and CSP refusals) seen by a page, but for console lines that start with
    one of `expected` (the browser's own line for a 4xx a test asks for, say)."""

    def __init__(self, page: Page, expected: tuple[str, ...] = ("Failed to load resource",)):
        self.expected = expected
        self.seen: list[str] = []
        page.on("pageerror", lambda error: self.seen.append(f"page error: {error}"))
        page.on("console", self.console)

    def console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not message.text.startswith(self.expected):
            self.seen.append(f"console: {message.text}")
