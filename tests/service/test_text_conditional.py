"""A text-conditional pipeline end to end: `retrac index create/run` over an image folder with a
metadata.jsonl of captions, `retrac attribute --prompt`, then the same store over HTTP (the ASGI app)
and on the web page, each answer equal to the in-memory engine's under the same prompt."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from api_schemas import QuerySpec
from api_schemas.attribution import AttributionsPublic
from cli import main
from retrac.attribution import Attributor
from service.main import create_app
from service.settings import Settings
from storage import GradientStore
from tests.retrac.text_pipeline import SIDE, save_text_pipeline, write_captioned_folder
from tests.service.browser import open_page
from tests.service.conftest import API_KEY, INDEX, QUERY, assert_create_refused
from tests.service.servers import serve_in_thread
from tests.service.test_attribute import assert_matches, png

STORE, PROMPT = "text", "a red bar"


@dataclass(frozen=True)
class Built:
    settings: Settings
    store: Path
    reference: Attributor
    query: np.ndarray  # uint8 (8, 8)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Models, data and stores roots: the tiny text pipeline, six captioned images, and store `text`
    (grid and random slots, sketched) created and filled by the CLI."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("text")
    pipeline = save_text_pipeline(base / "models" / "pipeline")
    data = write_captioned_folder(base / "data" / "captioned")
    (base / "stores").mkdir()
    store = base / "stores" / STORE
    assert main(["index", "create", str(store), "--checkpoint", f"{pipeline}:weight=1", "--data", str(data),
                 "--loss", "mse", "--no-replay", "--grid", "2", "--slot-noise", "independent",
                 "--random", "1", "--projector", "sketch",
                 "--dim", "128", "--dtype", "float32", "--shard-size", "3"]) == 0
    assert main(["index", "run", str(store)]) == 0
    reference = Attributor(GradientStore.open(store).plan)
    reference.index()
    query = np.random.default_rng(7).integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
    settings = Settings(stores_root=base / "stores", models_root=base / "models", data_root=base / "data",
                        api_key=API_KEY, max_top_k=20, max_query_gradients=64)
    return Built(settings, store, reference, query)


def expected(built: Built, prompt: str) -> list:
    image = torch.from_numpy(built.query).float().div(255).mul(2).sub(1)[None, None]
    spec = QuerySpec(timesteps=QUERY["timesteps"], draws=QUERY["draws"], seed=QUERY["seed"], prompt=prompt)
    return built.reference.attribute(image, spec, top_k=QUERY["top_k"])


def test_cli_indexes_and_attributes_under_a_prompt(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    assert main(["index", "inspect", str(built.store), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["text"]["max_length"] == 8
    assert described["fingerprints"]["text"]["captions"]
    query = tmp_path / "query.png"
    query.write_bytes(png(built.query))
    knobs = ["--top-k", str(QUERY["top_k"]), "--timesteps", str(QUERY["timesteps"]), "--draws",
             str(QUERY["draws"]), "--seed", str(QUERY["seed"])]
    assert main(["attribute", str(built.store), str(query), *knobs, "--prompt", PROMPT, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["prompt"] == PROMPT
    want = expected(built, PROMPT)
    for method in ("tracin", "retrac"):
        got = printed["data"][0]["methods"][method]["proponents"]
        assert [i["sample_id"] for i in got] == [i.sample_id for i in want[0].methods[method].proponents]
        np.testing.assert_allclose(
            [i["score"] for i in got], [i.score for i in want[0].methods[method].proponents], rtol=1e-5
        )
    # no prompt: one line saying to give one (or the empty one explicitly), exit code 2
    assert main(["attribute", str(built.store), str(query), *knobs]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "text-conditional: give the query's prompt" in error
    # generating from it is refused in one line, not attempted without its text
    assert main(["eval", "generate", str(built.store), "--out", str(tmp_path / "generated")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "generating from a text-conditional model is not handled" in error


def test_http_answers_under_the_prompt_and_refuses_a_missing_one(built: Built, client: TestClient) -> None:
    with TestClient(create_app(built.settings), headers={"X-API-Key": API_KEY}) as session:
        assert session.get(f"/v1/indexes/{STORE}").json()["text_conditional"] is True
        generated = session.post(f"/v1/indexes/{STORE}/generate", json={"steps": 2})
        assert generated.status_code == 422
        assert "text-conditional model is not handled" in generated.json()["detail"]
        files = {"images": ("query.png", png(built.query), "image/png")}
        response = session.post(
            f"/v1/indexes/{STORE}/attribute/upload", files=files, data={**QUERY, "prompt": PROMPT}
        )
        assert response.status_code == 200, response.text
        answer = AttributionsPublic.model_validate(response.json())
        assert answer.prompt == PROMPT
        assert_matches(answer, expected(built, PROMPT))
        image = {"array": (built.query / 255).tolist()}
        empty = session.post(
            f"/v1/indexes/{STORE}/attribute", json={**QUERY, "images": [image], "prompt": ""}
        )
        assert empty.status_code == 200, empty.text
        assert_matches(AttributionsPublic.model_validate(empty.json()), expected(built, ""))
        missing = session.post(f"/v1/indexes/{STORE}/attribute", json={**QUERY, "images": [image]})
        assert missing.status_code == 422
        assert "text-conditional: give the query's prompt" in missing.json()["detail"]
    # an unconditional index refuses a prompt rather than ignore it
    image = {"array": np.zeros((8, 8)).tolist()}
    refused = client.post(
        f"/v1/indexes/{INDEX}/attribute", json={**QUERY, "images": [image], "prompt": "a dot"}
    )
    assert refused.status_code == 422
    assert "not text-conditional: it takes no prompt" in refused.json()["detail"]
    assert client.get(f"/v1/indexes/{INDEX}").json()["text_conditional"] is False


@pytest.mark.redis
def test_create_refuses_a_dataset_without_captions_in_one_line(built: Built) -> None:
    """POST /v1/indexes of the text pipeline over data without captions: a 422 before any store is written."""
    spec = {"dataset": {"source": "builtin:faces", "resolution": 8, "limit": 4},
            "checkpoints": [{"path": "pipeline"}], "loss": "mse", "slots": {"replay": False, "grid": 1},
            "projector": {"dim": 64}}
    message = "text-conditional but the dataset 'builtin:faces' has no captions"
    assert_create_refused(built.settings, "nocaptions", spec, message)


def test_page_shows_the_prompt_field_and_attributes_under_it(built: Built, tmp_path: Path) -> None:
    query = tmp_path / "query.png"
    query.write_bytes(png(built.query))
    with serve_in_thread(create_app(built.settings)) as url, open_page(url, tmp_path / "profile") as page:
        page.choose_index(STORE)
        assert page.element("prompt-field").is_displayed()
        assert not page.element("label-field").is_displayed()
        page.element("prompt").send_keys(PROMPT)
        page.attribute(query, {f: QUERY[f] for f in ("top_k", "timesteps", "draws", "seed")})
        shown = page.gallery("retrac", "proponents")
        assert shown == [i.sample_id for i in expected(built, PROMPT)[0].methods["retrac"].proponents]
        assert f'prompt "{PROMPT}"' in page.element("timings").text
