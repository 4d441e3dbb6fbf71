"""A real headless browser for the page tests: Debian's chromium, driven by Selenium through Debian's
chromium-driver.

Why Selenium with Debian's driver rather than Playwright: Debian builds `chromium` and `chromium-driver`
from one source at one version, so the driver always speaks the browser's protocol, and `selenium` is a
pure-Python wheel on PyPI. Playwright's wheel brings its own Node driver, built against browser builds it
downloads from its own servers (which this machine and CI cannot reach); pointed at Debian's chromium it
works only while the two versions' DevTools protocols happen to agree.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def require_chromium() -> None:
    """Fail (never skip) with the fix when the browser or its driver is missing."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        raise AssertionError(
            f"{' and '.join(missing)} missing: run `make system-deps` "
            "(installs Debian's chromium and chromium-driver)"
        )


@contextmanager
def headless_chromium(workdir: Path) -> Iterator[WebDriver]:
    """A fresh headless chromium with its own profile under `workdir`, its console log recorded."""
    require_chromium()
    workdir.mkdir(parents=True, exist_ok=True)
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--disable-gpu",
        "--disable-dev-shm-usage",  # small /dev/shm in containers
        "--window-size=1280,1000",
        f"--user-data-dir={workdir / 'profile'}",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",  # no calls home: the machine has no way out anyway
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(argument)
    if os.geteuid() == 0:
        # Chromium will not start its sandbox as root, and CI runs as root.
        options.add_argument("--no-sandbox")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(workdir / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: WebDriver) -> list[dict[str, Any]]:
    """The browser's log entries at error level since the last call (the log is drained when read):
    script errors, console.error, CSP violations, and failed or refused requests (source `network`)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def texts(driver: WebDriver, selector: str) -> list[str]:
    """The visible text of every element `selector` matches, in page order."""
    return [element.text for element in driver.find_elements(By.CSS_SELECTOR, selector)]


def shown(driver: WebDriver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_displayed()
