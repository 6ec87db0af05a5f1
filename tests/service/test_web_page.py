"""The web page, driven in headless Chromium through a real uvicorn on loopback: pick the index, upload
an image, and see the same TracIn and ReTrac galleries as the API answers. Saves a screenshot under the
test's tmp folder; with RETRAC_UPDATE_SCREENSHOT=1 it also refreshes docs/screenshot.png, the README's
picture (a test run otherwise leaves the repository untouched)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from retrac.attribution import Attributor
from tests.service.conftest import INDEX, QUERY
from tests.service.servers import serve_in_thread
from tests.service.test_attribute import digit_pixels, png

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshot.png"
UPDATE_SCREENSHOT = "RETRAC_UPDATE_SCREENSHOT"
"""Set to 1 to copy the screenshot to `DOCS_SCREENSHOT`."""
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


@pytest.fixture(scope="module")
def served(app: FastAPI) -> Iterator[str]:
    """The test app under a real uvicorn in a thread, on a free loopback port."""
    with serve_in_thread(app) as url:
        yield url


def test_page_shows_both_methods_like_the_api(served: str, reference: Attributor, tmp_path: Path) -> None:
    chromium, chromedriver = browser_tools()
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    query = tmp_path / "query.png"
    query.write_bytes(png(digit_pixels(reference, 4)))
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    try:
        wait = WebDriverWait(driver, WAIT_S)
        driver.get(served + "/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#index option[value='{INDEX}']"))
        Select(driver.find_element(By.ID, "index")).select_by_value(INDEX)
        driver.find_element(By.ID, "image").send_keys(str(query))
        for field in ("top_k", "timesteps", "draws", "seed"):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(str(QUERY[field]))
        driver.find_element(By.ID, "run").click()
        wait.until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
        )
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", (
            driver.find_element(By.ID, "status").text
        )
        wait.until(
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('.card img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
        )

        shown = {
            (method, kind): [
                card.get_attribute("data-sample-id")
                for card in driver.find_elements(
                    By.CSS_SELECTOR, f".method[data-method={method}] .gallery[data-kind={kind}] .card"
                )
            ]
            for method in ("tracin", "retrac")
            for kind in ("proponents", "opponents")
        }
        for card in driver.find_elements(By.CSS_SELECTOR, ".card"):  # every tile names its sample
            rank, sample_id = card.get_attribute("data-rank"), card.get_attribute("data-sample-id")
            assert card.find_element(By.CSS_SELECTOR, ".id").text == f"#{rank} {sample_id}"
        answer = httpx.post(
            f"{served}/v1/indexes/{INDEX}/attribute/upload",
            data=QUERY,
            timeout=300,
            files={"images": ("query.png", query.read_bytes(), "image/png")},
        ).json()["data"][0]
        for (method, kind), ids in shown.items():
            assert ids == [i["sample_id"] for i in answer["methods"][method][kind]], (method, kind)
            assert len(ids) == QUERY["top_k"]

        screenshot = tmp_path / "page.png"
        assert driver.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:4] == b"\x89PNG"
        if os.environ.get(UPDATE_SCREENSHOT) == "1":
            shutil.copyfile(screenshot, DOCS_SCREENSHOT)
    finally:
        driver.quit()
