"""The web page in headless Chromium (selenium), for the tests that drive it: open it on a served app,
choose an index, fill fields, press a button and wait for the page's answer, read its galleries."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

WAIT_S = 120
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)


def browser_tools() -> tuple[str, str]:
    """Paths of chromium and chromedriver; skips (fails under CI=true) when they or selenium are missing."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        chromium = None
    if chromium and driver:
        return chromium, driver
    reason = "needs chromium, chromedriver (apt-get install chromium chromium-driver) and selenium (pip)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass
class Page:
    """The page open in a browser, with the few moves the tests make on it."""

    driver: Any
    wait: Any

    def element(self, element_id: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def choose_index(self, name: str) -> None:
        from selenium.webdriver.common.by import By

        self.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#index option[value='{name}']"))
        self.select("index", name)

    def select(self, element_id: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.element(element_id)).select_by_value(value)

    def options(self, element_id: str) -> list[str]:
        from selenium.webdriver.support.ui import Select

        return [o.get_attribute("value") for o in Select(self.element(element_id)).options]

    def fill(self, values: dict[str, Any]) -> None:
        """Replace the text of each field `id` with `str(value)`."""
        for element_id, value in values.items():
            box = self.element(element_id)
            box.clear()
            box.send_keys(str(value))

    def press(self, button_id: str) -> None:
        """Click `button_id` and wait for the page's answer; an error state fails with the page's status."""
        from selenium.webdriver.common.by import By

        self.element(button_id).click()
        state = lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")  # noqa: E731
        self.wait.until(lambda d: state(d) in ("done", "error"))
        assert state(self.driver) == "done", self.element("status").text

    def attribute(self, image: Path, knobs: dict[str, Any]) -> None:
        """Upload `image`, set the query's knobs (`top_k`, `timesteps`, ...) and run it to the answer."""
        self.element("image").send_keys(str(image))
        self.fill(knobs)
        self.press("run")

    def gallery(self, method: str, kind: str) -> list[str]:
        """The sample ids of one gallery, in the order shown."""
        from selenium.webdriver.common.by import By

        cards = self.driver.find_elements(
            By.CSS_SELECTOR, f".method[data-method={method}] .gallery[data-kind={kind}] .card"
        )
        return [card.get_attribute("data-sample-id") for card in cards]


@contextmanager
def open_page(url: str, profile: Path) -> Iterator[Page]:
    """Headless Chromium on the page at `url` (a browser profile under `profile`), closed afterwards."""
    chromium, chromedriver = browser_tools()
    from selenium import webdriver
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    try:
        driver.get(url + "/")
        yield Page(driver, WebDriverWait(driver, WAIT_S))
    finally:
        driver.quit()
