"""Bad requests, one kind per row: each gets a 4xx whose message says what to fix (a 405 with the
methods the path takes); the service stays up, no store changes on disk, and a refused index spec
loads no dataset. `test_keep_alive` sends the same rows over one connection."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import retrac.plan
from api_schemas import DatasetSpec
from api_schemas.indexes import IndexCreate
from api_schemas.specs import MAX_PATH_LENGTH
from retrac.datasets import load_dataset
from service.repository import StoreRepository
from service.settings import Settings
from tests.service.conftest import API_KEY, BUILDING, INDEX, QUERY, index_spec

UPLOAD = f"/v1/indexes/{INDEX}/attribute/upload"
JSON = f"/v1/indexes/{INDEX}/attribute"


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


DIGIT = png(np.full((8, 8), 128, dtype=np.uint8))


def upload(data: bytes, name: str = "q.png", **fields: Any) -> dict[str, Any]:
    return {"files": {"images": (name, data, "application/octet-stream")}, "data": {**QUERY, **fields}}


def body(**fields: Any) -> dict[str, Any]:
    return {"json": {**QUERY, "images": [{"base64": base64.b64encode(DIGIT).decode()}], **fields}}


@dataclass(frozen=True)
class Bad:
    """One kind of bad request: how to send it, the status it must get, words its message must hold."""

    kind: str
    method: str
    url: str
    status: int
    says: str
    send: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] | None = None
    allow: str | None = None
    """The `Allow` header a 405 must carry."""


def bad_path_specs(bad: Callable[[str], str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """An index spec with `bad(path)` for each of its paths in turn: (its field, the spec) by name."""
    spec = index_spec().model_dump(mode="json")
    external = {**spec, "run": None, "loss": "mse", "slots": {"replay": False, "grid": 2}}
    return {
        "run path": ("spec.run", {**spec, "run": bad("run")}),
        "dataset source": (
            "spec.dataset.source",
            {**spec, "dataset": {**spec["dataset"], "source": bad("images/x")}},
        ),
        "scheduler path": ("spec.scheduler", {**spec, "scheduler": bad("run/scheduler")}),
        "VAE path": ("spec.vae", {**spec, "vae": bad("run/vae")}),
        "checkpoint path": (
            "spec.checkpoints.0.path",
            {**external, "checkpoints": [{"path": bad("run/checkpoints/epoch-0002")}]},
        ),
    }


TOO_LONG = "a" * 10_000
NAME_MAX = 255
"""The longest file name (one part of a path) of common file systems."""


CASES = [
    Bad("not an image", "post", UPLOAD, 422, "not a readable image", upload(b"hello, I am text")),
    Bad(
        "truncated PNG",
        "post",
        UPLOAD,
        422,
        "not a readable image",
        upload(png(np.zeros((64, 64), np.uint8))[:60]),
    ),
    Bad("empty file", "post", UPLOAD, 422, "is empty", upload(b"")),
    Bad(
        "huge dimensions",
        "post",
        UPLOAD,
        422,
        "largest side accepted",
        upload(png(np.zeros((4100, 4100), np.uint8))),
    ),
    Bad(
        "side over 16x the index's resolution (8 px)",
        "post",
        UPLOAD,
        422,
        "the largest side accepted is 128",
        upload(png(np.zeros((129, 16), np.uint8))),
    ),
    Bad(
        ".npy side over 16x the index's resolution",
        "post",
        UPLOAD,
        422,
        "the largest side accepted is 128",
        upload(npy(np.zeros((16, 129), np.uint8)), "q.npy"),
    ),
    Bad(
        "wrong channel count",
        "post",
        UPLOAD,
        422,
        "channel axis of size 1 or 3",
        upload(npy(np.zeros((8, 8, 2), np.float32)), "q.npy"),
    ),
    Bad(
        "empty .npy of shape (0, 0)",
        "post",
        UPLOAD,
        422,
        "have no pixels",
        upload(npy(np.zeros((0, 0), np.uint8)), "q.npy"),
    ),
    Bad(
        ".npy header declaring an enormous shape",
        "post",
        UPLOAD,
        422,
        "do not hold",
        upload(npy(np.zeros((8, 8), np.uint8)).replace(b"(8, 8)", b"(9999999, 999999)"), "q.npy"),
    ),
    Bad(
        "NaN in an array",
        "post",
        UPLOAD,
        422,
        "NaN",
        upload(npy(np.full((8, 8), np.nan, np.float32)), "q.npy"),
    ),
    Bad(
        "float pixels outside [0, 1]",
        "post",
        JSON,
        422,
        "must lie in [0, 1]",
        {"json": {**QUERY, "images": [{"array": [[2.0] * 8] * 8}]}},
    ),
    Bad(
        "ragged nested array",
        "post",
        JSON,
        422,
        "same number of pixels",
        {"json": {**QUERY, "images": [{"array": [[0.5] * 8, [0.5] * 7]}]}},
    ),
    Bad(
        "bad base64",
        "post",
        JSON,
        422,
        "not valid base64",
        {"json": {**QUERY, "images": [{"base64": "***"}]}},
    ),
    Bad("unknown index", "post", "/v1/indexes/nope/attribute", 404, "GET /v1/indexes", body()),
    Bad(
        "index still building, no job",
        "post",
        f"/v1/indexes/{BUILDING}/attribute",
        409,
        f'no job is building it: start its job with POST /v1/jobs {{"index": "{BUILDING}"}}',
        body(),
    ),
    Bad("bad method", "post", JSON, 422, "methods", body(methods=["tracn"])),
    Bad("top_k 0", "post", JSON, 422, "top_k", body(top_k=0)),
    Bad("top_k huge", "post", JSON, 422, "top_k", body(top_k=100_000)),
    Bad("top_k over the service limit", "post", JSON, 422, "at most 20", body(top_k=50)),
    Bad(
        "K*M over the limit",
        "post",
        JSON,
        422,
        "lower timesteps (K) or draws (M)",
        body(timesteps=100, draws=16),
    ),
    Bad(
        "too many images",
        "post",
        UPLOAD,
        422,
        "at most 4",
        {"files": [("images", (f"{i}.png", DIGIT, "image/png")) for i in range(5)], "data": QUERY},
    ),
    Bad("body over the size limit", "post", UPLOAD, 413, "at most", upload(b"\x00" * (300 << 10))),
    Bad(
        "chunked body over the size limit (no Content-Length)",
        "post",
        JSON,
        413,
        "at most",
        {"content": [b"{" + b" " * (64 << 10)] * 5, "headers": {"content-type": "application/json"}},
    ),
    Bad("checkpoint out of range", "post", JSON, 422, "checkpoints 0..2", body(checkpoints=[3])),
    Bad("unknown field", "post", JSON, 422, "topk", body(topk=3)),
    Bad(
        "malformed JSON",
        "post",
        JSON,
        422,
        "JSON",
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
    ),
    Bad(
        "path traversal in a sample id",
        "get",
        f"/v1/indexes/{INDEX}/samples/..%2F..%2Fetc%2Fpasswd",
        422,
        "a sample id is a relative path such as '2/0084.png'",
    ),
    Bad("dots as a sample id", "get", f"/v1/indexes/{INDEX}/samples/%2E%2E", 422, "sample_id"),
    Bad("path traversal in an index name", "get", "/v1/indexes/%2E%2E/samples/x", 422, "name"),
    Bad("unknown sample", "get", f"/v1/indexes/{INDEX}/samples/digit-9999-9", 404, "sample ids come from"),
    Bad("thumbnail size 0", "get", f"/v1/indexes/{INDEX}/samples/digit-0000-0?size=0", 422, "size"),
    Bad("unknown job", "get", "/v1/jobs/no-such-job", 404, "no job"),
    Bad(
        "missing API key",
        "post",
        "/v1/indexes",
        401,
        "X-API-Key",
        {"json": {"name": "new", "spec": index_spec().model_dump(mode="json")}},
        headers={},
    ),
    Bad(
        "wrong API key",
        "delete",
        f"/v1/indexes/{INDEX}",
        403,
        "wrong API key",
        headers={"X-API-Key": "guess"},
    ),
    Bad(
        "spec path outside the models root",
        "post",
        "/v1/indexes",
        422,
        "leaves the configured root",
        {"json": {"name": "escape", "spec": index_spec(run="../../etc").model_dump(mode="json")}},
    ),
    *(
        Bad(
            f"NUL byte in the {where}",
            "post",
            "/v1/indexes",
            422,
            "NUL byte",
            {"json": {"name": "nul", "spec": spec}},
        )
        for where, (_, spec) in bad_path_specs(lambda path: f"{path[:2]}\x00{path[2:]}").items()
    ),
    *(
        Bad(
            f"{where} of 10,000 characters",
            "post",
            "/v1/indexes",
            422,
            f"{field}: String should have at most {MAX_PATH_LENGTH} characters",
            {"json": {"name": "long", "spec": spec}},
        )
        for where, (field, spec) in bad_path_specs(lambda path: f"{path}/{TOO_LONG}").items()
    ),
    *(
        Bad(
            f"{where} with a part longer than a file name may be",
            "post",
            "/v1/indexes",
            422,
            f"{field}: a part of a path has at most {NAME_MAX} characters",
            {"json": {"name": "long", "spec": spec}},
        )
        for where, (field, spec) in bad_path_specs(lambda path: f"{path}/{'a' * (NAME_MAX + 1)}").items()
    ),
    Bad(
        "index name of 10,000 characters",
        "post",
        "/v1/indexes",
        422,
        "name: String should have at most 64 characters",
        {"json": {"name": TOO_LONG, "spec": index_spec().model_dump(mode="json")}},
    ),
    Bad(
        "caption column of 10,000 characters",
        "post",
        "/v1/indexes",
        422,
        "spec.dataset.caption_column: String should have at most 64 characters",
        {
            "json": {
                "name": "long",
                "spec": {
                    **index_spec().model_dump(mode="json"),
                    "dataset": {"source": "builtin:digits", "caption_column": TOO_LONG},
                },
            }
        },
    ),
    Bad(
        "dataset of another shape than the model",
        "post",
        "/v1/indexes",
        422,
        "but the model takes 1x8x8",
        {
            "json": {
                "name": "shape",
                "spec": {
                    **index_spec().model_dump(mode="json"),
                    "dataset": {"source": "builtin:digits", "resolution": 12, "limit": 48},
                },
            }
        },
    ),
    Bad(
        "the largest resolution for a model of 8 px (7.5 GB if it were loaded)",
        "post",
        "/v1/indexes",
        422,
        "give resolution 8 and channels 1",
        {
            "json": {
                "name": "huge",
                "spec": {
                    **index_spec().model_dump(mode="json"),
                    "dataset": {"source": "builtin:digits", "resolution": 1024},
                },
            }
        },
    ),
    Bad(
        "scheduler folder without a config",
        "post",
        "/v1/indexes",
        422,
        "no scheduler_config.json",
        {
            "json": {
                "name": "nosched",
                "spec": index_spec()
                .model_copy(update={"scheduler": "run/checkpoints"})
                .model_dump(mode="json"),
            }
        },
    ),
    Bad(
        "index name taken",
        "post",
        "/v1/indexes",
        409,
        "exists already",
        {"json": {"name": INDEX, "spec": index_spec().model_dump(mode="json")}},
    ),
    Bad(
        "index name with a slash",
        "post",
        "/v1/indexes",
        422,
        "name",
        {"json": {"name": "a/b", "spec": index_spec().model_dump(mode="json")}},
    ),
    Bad(
        "self-influence of a building index",
        "get",
        f"/v1/indexes/{BUILDING}/diagnostics/self-influence",
        409,
        "still being built (0/144 rows done), and no job is building it",
    ),
    Bad("GET on a POST-only route", "get", JSON, 405, "use POST", allow="POST"),
    Bad("GET on the upload route", "get", UPLOAD, 405, "use POST", allow="POST"),
    Bad("GET on the jobs collection", "get", "/v1/jobs", 405, "use POST", allow="POST"),
    Bad("PUT on the indexes collection", "put", "/v1/indexes", 405, "use GET, POST", allow="GET, POST"),
    Bad("PUT on an index", "put", f"/v1/indexes/{INDEX}", 405, "use DELETE, GET", allow="DELETE, GET"),
    Bad("POST on health", "post", "/v1/health", 405, "use GET", allow="GET"),
    Bad("unknown API path", "get", "/v1/nothing-here", 404, "the API is described at /docs"),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the stores root with its size and modification time."""
    return {
        str(f.relative_to(root)): (f.stat().st_size, f.stat().st_mtime_ns)
        for f in root.rglob("*")
        if f.is_file()
    }


@pytest.fixture
def dataset_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The source of every dataset the engine loads while the test runs."""
    loads: list[str] = []

    def counted(spec: DatasetSpec, *args: Any, **kwargs: Any) -> Any:
        loads.append(spec.source)
        return load_dataset(spec, *args, **kwargs)

    monkeypatch.setattr(retrac.plan, "load_dataset", counted)
    return loads


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_bad_request_is_refused_clearly(
    case: Bad, client: TestClient, settings: Settings, dataset_loads: list[str]
) -> None:
    before = snapshot(settings.stores_root)
    headers = {"X-API-Key": API_KEY} if case.headers is None else case.headers
    send = dict(case.send)
    headers |= send.pop("headers", {})
    if case.headers == {}:
        client.headers.pop("X-API-Key")
    try:
        response = client.request(case.method.upper(), case.url, headers=headers, **send)
    finally:
        client.headers["X-API-Key"] = API_KEY
    assert response.status_code == case.status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert case.says in detail
    assert response.headers.get("allow") == case.allow
    if case.url == "/v1/indexes":
        assert dataset_loads == []  # a refused spec is refused before its dataset is loaded
    assert str(settings.stores_root.parent) not in response.text  # no server path in any message
    assert client.get("/v1/health").status_code == 200
    assert snapshot(settings.stores_root) == before


def test_an_accepted_spec_loads_its_dataset(own_roots: Settings, dataset_loads: list[str]) -> None:
    """The counter above sees the engine's loads: a spec that passes every check is loaded once."""
    StoreRepository(own_roots).create(IndexCreate(name="counted", spec=index_spec()))
    assert dataset_loads == [index_spec().dataset.source]
