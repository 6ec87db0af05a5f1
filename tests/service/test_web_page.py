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
from tests.service.browser import open_page
from tests.service.conftest import INDEX, QUERY
from tests.service.servers import serve_in_thread
from tests.service.test_attribute import digit_pixels, png

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshot.png"
UPDATE_SCREENSHOT = "RETRAC_UPDATE_SCREENSHOT"
"""Set to 1 to copy the screenshot to `DOCS_SCREENSHOT`."""


@pytest.fixture(scope="module")
def served(app: FastAPI) -> Iterator[str]:
    """The test app under a real uvicorn in a thread, on a free loopback port."""
    with serve_in_thread(app) as url:
        yield url


def test_page_shows_both_methods_like_the_api(served: str, reference: Attributor, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    query = tmp_path / "query.png"
    query.write_bytes(png(digit_pixels(reference, 4)))
    with open_page(served, tmp_path / "profile") as page:
        page.choose_index(INDEX)
        page.attribute(query, {field: QUERY[field] for field in ("top_k", "timesteps", "draws", "seed")})
        page.wait.until(
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('.card img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
        )
        shown = {
            (method, kind): page.gallery(method, kind)
            for method in ("tracin", "retrac")
            for kind in ("proponents", "opponents")
        }
        for card in page.driver.find_elements(By.CSS_SELECTOR, ".card"):  # every tile names its sample
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
        assert page.driver.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:4] == b"\x89PNG"
        if os.environ.get(UPDATE_SCREENSHOT) == "1":
            shutil.copyfile(screenshot, DOCS_SCREENSHOT)
