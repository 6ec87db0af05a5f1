"""A DiT end to end: a pipeline folder with `transformer/` indexed by `retrac index create/run`, queried by
`retrac attribute --label` and over HTTP (the ASGI app), each answer equal to the in-memory engine's under
the same label; a learned-sigma DiT refused by POST /v1/indexes in one line."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel
from fastapi.testclient import TestClient
from PIL import Image

from api_schemas import QuerySpec
from api_schemas.attribution import AttributionsPublic
from api_schemas.generation import GenerationPublic
from cli import main
from retrac.attribution import Attributor
from retrac.datasets import ImageDataset
from retrac.evaluation.sampling import generate
from service.main import create_app
from service.settings import Settings
from storage import GradientStore
from tests.retrac.dit_model import TIMESTEPS, save_dit_pipeline
from tests.service.browser import open_page
from tests.service.conftest import API_KEY, QUERY, assert_create_refused
from tests.service.servers import serve_in_thread
from tests.service.test_attribute import assert_matches, png

STORE = "dit"
KNOBS = [f"--{name.replace('_', '-')}={QUERY[name]}" for name in ("top_k", "timesteps", "draws")]


@dataclass(frozen=True)
class Built:
    settings: Settings
    store: Path
    reference: Attributor
    query: np.ndarray  # uint8 (8, 8): training digit 5 mirrored


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Models and stores roots: a tiny DiT pipeline (and a learned-sigma one), store `dit` of 8 digits
    created and filled by the CLI."""
    base = tmp_path_factory.mktemp("dit")
    pipeline = save_dit_pipeline(base / "models" / "dit")
    save_dit_pipeline(base / "models" / "sigma", out_channels=2)
    (base / "stores").mkdir()
    store = base / "stores" / STORE
    assert main(["index", "create", str(store), "--checkpoint", f"{pipeline}:weight=0.5", "--loss", "mse",
                 "--data", "builtin:digits", "--limit", "8", "--no-replay", "--grid", "2",
                 "--slot-noise", "independent",
                 "--projector", "sketch", "--dim", "256", "--dtype", "float32", "--shard-size", "4"]) == 0
    assert main(["index", "run", str(store)]) == 0
    reference = Attributor(GradientStore.open(store).plan)
    reference.index()
    query = np.ascontiguousarray(reference.plan.dataset.to_uint8(5)[:, ::-1])
    settings = Settings(stores_root=base / "stores", models_root=base / "models", data_root=base / "data",
                        api_key=API_KEY, max_top_k=20, max_query_gradients=64)
    return Built(settings, store, reference, query)


def expected(built: Built, label: int | str, query: np.ndarray | None = None) -> list:
    pixels = built.query if query is None else query
    image = torch.from_numpy(pixels.copy()).float().div(255).mul(2).sub(1)[None, None]
    spec = QuerySpec(timesteps=QUERY["timesteps"], draws=QUERY["draws"], seed=QUERY["seed"], label=label)
    return built.reference.attribute(image, spec, top_k=QUERY["top_k"])


def test_cli_indexes_and_attributes_under_a_label(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    assert main(["index", "inspect", str(built.store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"] == {str(d): d for d in range(10)}
    query = tmp_path / "five.png"
    query.write_bytes(png(built.query))
    knobs = [*KNOBS, "--seed", str(QUERY["seed"])]
    assert main(["attribute", str(built.store), str(query), *knobs, "--label", "5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    want = expected(built, 5)
    for method in ("tracin", "retrac"):
        got = printed["data"][0]["methods"][method]["proponents"]
        assert [i["sample_id"] for i in got] == [i.sample_id for i in want[0].methods[method].proponents]
        scores = [i.score for i in want[0].methods[method].proponents]
        np.testing.assert_allclose([i["score"] for i in got], scores, rtol=1e-5)
    assert main(["attribute", str(built.store), str(query), *knobs]) == 2  # a DiT needs the query's label
    assert "class-conditional: give the query's label" in capsys.readouterr().err


def test_http_answers_under_the_label(built: Built) -> None:
    with TestClient(create_app(built.settings), headers={"X-API-Key": API_KEY}) as session:
        files = {"images": ("five.png", png(built.query), "image/png")}
        upload = f"/v1/indexes/{STORE}/attribute/upload"
        response = session.post(upload, files=files, data={**QUERY, "label": "5"})
        assert response.status_code == 200, response.text
        answer = AttributionsPublic.model_validate(response.json())
        assert answer.label == "5"
        assert_matches(answer, expected(built, 5))
        other = session.post(f"/v1/indexes/{STORE}/attribute",
                             json={**QUERY, "images": [{"array": (built.query / 255).tolist()}], "label": 2})
        assert other.status_code == 200, other.text
        assert_matches(AttributionsPublic.model_validate(other.json()), expected(built, 2))


@pytest.mark.redis
def test_create_refuses_a_learned_sigma_dit_in_one_line(built: Built) -> None:
    spec = {"dataset": {"source": "builtin:digits", "resolution": 8, "limit": 4}, "loss": "mse",
            "checkpoints": [{"path": "sigma", "weight": 1.0}], "slots": {"replay": False, "grid": 1},
            "projector": {"dim": 64}}
    assert_create_refused(built.settings, "sigma", spec, "maps 1 channels to 2 (learned variances")


def test_eval_generate_records_the_label_and_attributes_under_it(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`retrac eval generate` with guidance: generated.json records each image's label, and the printed
    attributions equal `retrac attribute` of the written PNG under that recorded label."""
    out = tmp_path / "generated"
    knobs = KNOBS
    capsys.readouterr()
    assert main(["eval", "generate", str(built.store), "--count", "2", "--label", "3",
                 "--guidance-scale", "2.5", "--steps", "3", "--out", str(out), *knobs, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    records = json.loads((out / "generated.json").read_text())
    assert [d["image"] for d in printed["data"]] == [str(out / r["file"]) for r in records]
    assert [r["label"] for r in records] == ["3", "3"]
    assert records[1]["guidance_scale"] == 2.5
    assert printed["label"] == "3"
    again = records[1]
    assert main(["attribute", str(built.store), str(out / again["file"]), "--label", again["label"], *knobs,
                 "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)["data"][0]
    for method in ("tracin", "retrac"):  # the query gradients of one image against those of two, batched
        got, want = printed["data"][1]["methods"][method], alone["methods"][method]
        for side in ("proponents", "opponents"):
            assert [i["sample_id"] for i in got[side]] == [i["sample_id"] for i in want[side]]
            scores = [i["score"] for i in want[side]]
            np.testing.assert_allclose([i["score"] for i in got[side]], scores, rtol=1e-5)
    # a DiT generates under a label only: one line saying to give one
    assert main(["eval", "generate", str(built.store), "--steps", "2", "--out", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "give the query's label" in error


def test_http_generates_under_a_label_with_guidance_and_attributes_it(built: Built) -> None:
    """POST /generate: each PNG equals `generate()` on the pipeline folder loaded by plain diffusers with
    the same arguments, its record says what made it, and uploading it under its label answers as the
    in-memory engine does; a label the model lacks is refused in one line."""
    body = {"count": 2, "label": "3", "guidance_scale": 2.5, "sampler": "ddim", "steps": 3, "seed": 7}
    with TestClient(create_app(built.settings), headers={"X-API-Key": API_KEY}) as session:
        response = session.post(f"/v1/indexes/{STORE}/generate", json=body)
        assert response.status_code == 200, response.text
        answer = GenerationPublic.model_validate(response.json())
        folder = built.settings.models_root / "dit"
        direct = generate(DiTTransformer2DModel.from_pretrained(folder / "transformer"),
                          DDPMScheduler.from_pretrained(folder / "scheduler"), 2, sampler="ddim", steps=3,
                          seed=7, label=3, guidance_scale=2.5)
        want = ImageDataset(direct, ("0", "1"), "direct")
        assert answer.count == 2
        assert [g.image for g in answer.data] == [0, 1]
        for i, made in enumerate(answer.data):
            assert (made.label, made.guidance_scale, made.sampler, made.steps, made.seed,
                    made.checkpoint) == ("3", 2.5, "ddim", 3, 7, 0)
            pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(made.png_base64))))
            np.testing.assert_array_equal(pixels, want.to_uint8(i))
        made = answer.data[1]
        files = {"images": ("generated.png", base64.b64decode(made.png_base64), "image/png")}
        attributed = session.post(f"/v1/indexes/{STORE}/attribute/upload", files=files,
                                  data={**QUERY, "label": made.label})
        assert attributed.status_code == 200, attributed.text
        assert_matches(
            AttributionsPublic.model_validate(attributed.json()), expected(built, 3, want.to_uint8(1))
        )
        refused = session.post(f"/v1/indexes/{STORE}/generate", json={**body, "label": 12})
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"].startswith(
            "label '12' is not a class of this index; give one of: 0 (0)"
        )
        too_long = session.post(f"/v1/indexes/{STORE}/generate", json={**body, "steps": TIMESTEPS + 1})
        assert too_long.status_code == 400, too_long.text
        assert (
            too_long.json()["detail"]
            == f"{TIMESTEPS + 1} denoising steps; give 1 to the schedule's {TIMESTEPS}"
        )
        too_many = session.post(f"/v1/indexes/{STORE}/generate", json={**body, "count": 9})
        assert too_many.status_code == 422, too_many.text


def test_page_generates_a_query_and_attributes_it_under_its_label(built: Built, tmp_path: Path) -> None:
    """The page's "Generate a query" (label 3, guidance 2.5, seed 7) shows the image the API generates
    with those arguments and the galleries of that image attributed under label 3."""
    with serve_in_thread(create_app(built.settings)) as url, open_page(url, tmp_path / "profile") as page:
        page.element("api_key").send_keys(API_KEY)
        page.choose_index(STORE)
        page.select("label", "3")
        page.fill({**{f: QUERY[f] for f in ("top_k", "timesteps", "draws", "seed")}, "guidance_scale": 2.5,
                   "sampling_seed": 7})
        page.press("generate")
        caption = page.element("preview-caption").text
        assert caption == "generated: label 3, guidance 2.5, ddim 50 steps, seed 7, checkpoint 0"
        shown = page.gallery("retrac", "proponents")
    with TestClient(create_app(built.settings), headers={"X-API-Key": API_KEY}) as session:
        body = {"label": "3", "guidance_scale": 2.5, "seed": 7}
        made = session.post(f"/v1/indexes/{STORE}/generate", json=body).json()["data"][0]
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(made["png_base64"]))))
    assert shown == [i.sample_id for i in expected(built, 3, pixels)[0].methods["retrac"].proponents]
