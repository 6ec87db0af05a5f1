"""A class-conditional model end to end: `retrac train --class-conditional` on an image folder of class
subfolders, `retrac index create/run`, `retrac attribute --label`, then the same store over HTTP (the
ASGI app) and on the web page, each answer equal to the in-memory engine's under the same label."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sklearn.datasets import load_digits

from api_schemas import QuerySpec
from api_schemas.attribution import AttributionsPublic
from cli import main
from retrac.attribution import Attributor
from service.main import create_app
from service.settings import Settings
from storage import GradientStore
from tests.service.browser import open_page
from tests.service.conftest import API_KEY, INDEX, QUERY, assert_create_refused
from tests.service.servers import serve_in_thread
from tests.service.test_attribute import assert_matches, png

NAMES = {0: "zero", 1: "one", 2: "two"}
"""Class subfolders by digit: sorted as names they number one = 0, two = 1, zero = 2."""
PER_CLASS = 6
STORE = "cond"


@dataclass(frozen=True)
class Built:
    settings: Settings
    store: Path
    reference: Attributor
    query: np.ndarray  # uint8 (8, 8): a held-out "two"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Models, data and stores roots: 18 digits in class subfolders, a class-conditional micro run trained
    by the CLI, and store `cond` (replayed and grid slots) created and filled by the CLI."""
    base = tmp_path_factory.mktemp("cond")
    digits = load_digits()
    picked = {digit: np.flatnonzero(digits.target == digit) for digit in NAMES}
    for digit, name in NAMES.items():
        (base / "data" / "digits" / name).mkdir(parents=True)
        for i in picked[digit][:PER_CLASS]:
            (base / "data" / "digits" / name / f"{i:04d}.png").write_bytes(
                png((digits.images[i] * 255 / 16).astype(np.uint8))
            )
    (base / "stores").mkdir()
    data, run, store = base / "data" / "digits", base / "models" / "run", base / "stores" / STORE
    assert main(["train", str(run), "--data", str(data), "--resolution", "8", "--preset", "micro", "--epochs",
                 "2", "--batch-size", "9", "--save-every", "1", "--class-conditional"]) == 0
    assert (
        json.loads((run / "checkpoints" / "epoch-0002" / "config.json").read_text())["num_class_embeds"] == 3
    )
    assert main(["index", "create", str(store), "--run", str(run), "--grid", "1", "--projector", "sketch",
                 "--slot-noise", "independent", "--dim", "256", "--dtype", "float32",
                 "--shard-size", "9"]) == 0
    assert main(["index", "run", str(store)]) == 0
    reference = Attributor(GradientStore.open(store).plan)
    reference.index()
    query = (digits.images[picked[2][PER_CLASS]] * 255 / 16).astype(np.uint8)
    settings = Settings(stores_root=base / "stores", models_root=base / "models", data_root=base / "data",
                        api_key=API_KEY, max_top_k=20, max_query_gradients=64)
    return Built(settings, store, reference, query)


def expected(built: Built, label: int | str) -> list:
    image = torch.from_numpy(built.query).float().div(255).mul(2).sub(1)[None, None]
    spec = QuerySpec(timesteps=QUERY["timesteps"], draws=QUERY["draws"], seed=QUERY["seed"], label=label)
    return built.reference.attribute(image, spec, top_k=QUERY["top_k"])


def test_cli_indexes_and_attributes_under_a_label(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    assert main(["index", "inspect", str(built.store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"] == {"one": 0, "two": 1, "zero": 2}
    query = tmp_path / "two.png"
    query.write_bytes(png(built.query))
    knobs = ["--top-k", str(QUERY["top_k"]), "--timesteps", str(QUERY["timesteps"]), "--draws",
             str(QUERY["draws"]), "--seed", str(QUERY["seed"])]
    assert main(["attribute", str(built.store), str(query), *knobs, "--label", "two", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["label"] == "two"
    want = expected(built, 1)  # "two" is class 1
    for method in ("tracin", "retrac"):
        got = printed["data"][0]["methods"][method]["proponents"]
        assert [i["sample_id"] for i in got] == [i.sample_id for i in want[0].methods[method].proponents]
        np.testing.assert_allclose(
            [i["score"] for i in got], [i.score for i in want[0].methods[method].proponents], rtol=1e-5
        )
    # no label: one line saying to give one, exit code 2
    assert main(["attribute", str(built.store), str(query), *knobs]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "class-conditional: give the query's label (one of: one, two, zero)" in error


def test_http_answers_under_the_label_and_refuses_a_missing_one(built: Built, client: TestClient) -> None:
    with TestClient(create_app(built.settings), headers={"X-API-Key": API_KEY}) as session:
        described = session.get(f"/v1/indexes/{STORE}").json()
        assert described["classes"] == {"one": 0, "two": 1, "zero": 2}
        files = {"images": ("two.png", png(built.query), "image/png")}
        response = session.post(
            f"/v1/indexes/{STORE}/attribute/upload", files=files, data={**QUERY, "label": "two"}
        )
        assert response.status_code == 200, response.text
        answer = AttributionsPublic.model_validate(response.json())
        assert answer.label == "two"
        assert_matches(answer, expected(built, "two"))
        image = {"array": (built.query / 255).tolist()}
        by_integer = session.post(
            f"/v1/indexes/{STORE}/attribute", json={**QUERY, "images": [image], "label": 2}
        )
        assert by_integer.status_code == 200, by_integer.text
        assert_matches(AttributionsPublic.model_validate(by_integer.json()), expected(built, "zero"))
        unlabelled = session.post(f"/v1/indexes/{STORE}/attribute", json={**QUERY, "images": [image]})
        assert unlabelled.status_code == 422
        assert "class-conditional: give the query's label" in unlabelled.json()["detail"]
        unknown = session.post(
            f"/v1/indexes/{STORE}/attribute", json={**QUERY, "images": [image], "label": "nine"}
        )
        assert unknown.status_code == 422
        assert "label 'nine' is not a class" in unknown.json()["detail"]
    # an unconditional index refuses a label rather than ignore it
    image = {"array": np.zeros((8, 8)).tolist()}
    refused = client.post(f"/v1/indexes/{INDEX}/attribute", json={**QUERY, "images": [image], "label": 1})
    assert refused.status_code == 422
    assert "unconditional: it takes no label" in refused.json()["detail"]
    assert client.get(f"/v1/indexes/{INDEX}").json()["classes"] is None


def test_generate_refuses_guidance_without_a_null_class_and_a_label_unconditionally(
    built: Built, client: TestClient
) -> None:
    """POST /generate of a class-conditional UNet under a label answers; with a guidance scale it is
    refused in one line (no null class), as is a label sent to an unconditional index."""
    with TestClient(create_app(built.settings), headers={"X-API-Key": API_KEY}) as session:
        url = f"/v1/indexes/{STORE}/generate"
        made = session.post(url, json={"label": "two", "steps": 2})
        assert made.status_code == 200, made.text
        assert [(g["label"], g["guidance_scale"], g["steps"]) for g in made.json()["data"]] == [
            ("two", None, 2)
        ]
        guided = session.post(url, json={"label": "two", "steps": 2, "guidance_scale": 3.0})
        assert guided.status_code == 400, guided.text
        assert "\n" not in guided.json()["detail"]
        assert "has no null class" in guided.json()["detail"]
    refused = client.post(f"/v1/indexes/{INDEX}/generate", json={"label": 1, "steps": 2})
    assert refused.status_code == 422
    assert "unconditional: it takes no label" in refused.json()["detail"]


@pytest.mark.redis
def test_create_refuses_a_dataset_without_labels_in_one_line(built: Built) -> None:
    """POST /v1/indexes of the class-conditional run over data without class labels: a 422 before any store
    is written."""
    spec = {"dataset": {"source": "builtin:faces", "resolution": 8, "limit": 4}, "run": "run",
            "slots": {"replay": False, "grid": 1}, "projector": {"dim": 64}}
    message = "the model is class-conditional but the dataset 'builtin:faces' has no class labels"
    assert_create_refused(built.settings, "nolabels", spec, message)


def test_page_shows_the_label_field_and_attributes_under_it(built: Built, tmp_path: Path) -> None:
    query = tmp_path / "two.png"
    query.write_bytes(png(built.query))
    with serve_in_thread(create_app(built.settings)) as url, open_page(url, tmp_path / "profile") as page:
        page.choose_index(STORE)
        assert page.element("label-field").is_displayed()
        assert page.options("label") == ["one", "two", "zero"]
        page.select("label", "two")
        page.attribute(query, {f: QUERY[f] for f in ("top_k", "timesteps", "draws", "seed")})
        shown = page.gallery("retrac", "proponents")
        assert shown == [i.sample_id for i in expected(built, "two")[0].methods["retrac"].proponents]
        assert "label two" in page.element("timings").text
