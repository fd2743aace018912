"""A real headless browser for tests of HTML pages: Debian's chromium and chromedriver, driven by Selenium.

``.ci/run`` installs them (``apt-get install chromium chromium-driver``) where it can; where the browser,
the driver or Selenium is missing, :func:`headless_chromium` raises ``pytest.skip`` with the reason.

    python tests/browser.py PAGE.html OUT.png [WIDTH HEIGHT]   # a screenshot of a page, as the README's
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


def _first_on_path(names: tuple[str, ...]) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


def headless_chromium(width: int = 1400, height: int = 1000):
    """A Selenium Chrome driver on a headless chromium that keeps the browser console (``get_log('browser')``)."""
    import pytest

    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pipenv sync --dev)")
    browser, driver = _first_on_path(BROWSERS), _first_on_path(DRIVERS)
    if browser is None or driver is None:
        pytest.skip(f"no headless browser: {' / '.join(BROWSERS)} and {' / '.join(DRIVERS)} not on PATH "
                    "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


def wait_for(driver, script: str, timeout: float = 10.0):
    """Run ``script`` until it returns something truthy (a page drawing after its images load); returns that."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))


def screenshot(page: str | Path, out: str | Path, width: int = 1400, height: int = 1000) -> None:
    """Open ``page`` from disk and save what the browser shows as a PNG."""
    driver = headless_chromium(width, height)
    try:
        driver.get(Path(page).resolve().as_uri())
        wait_for(driver, "return document.body.dataset.rendered")
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


if __name__ == "__main__":
    screenshot(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:5]))
