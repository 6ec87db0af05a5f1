"""`GET .../diagnostics/norms` and `retrac eval norms` report one statistic under one name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api_schemas import SlotSpec
from api_schemas.diagnostics import NormTimestepPublic
from api_schemas.indexes import IndexCreate
from cli import main
from retrac.computers import GradientComputerCache
from service.main import create_app
from service.repository import StoreRepository
from service.settings import Settings
from storage import run_pending
from tests.service.conftest import API_KEY, index_spec

NORM_TOLERANCE = 1e-5
"""Relative: both sides compute the same float32 norms (~1e-7 relative each); the fits in float64."""


def test_api_and_cli_norm_statistics_agree(own_roots: Settings, tmp_path: Path) -> None:
    # A replayed-slot-only index: its stored pairs are exactly what `retrac eval norms` recomputes.
    spec = index_spec().model_copy(update={"slots": SlotSpec(replay=True)})
    store = StoreRepository(own_roots).create(IndexCreate(name="replayed", spec=spec))
    run_pending(store, GradientComputerCache("cpu", threads=1))
    with TestClient(create_app(own_roots), headers={"X-API-Key": API_KEY}) as client:
        response = client.get("/v1/indexes/replayed/diagnostics/norms", params={"checkpoint": -1})
    assert response.status_code == 200, response.text
    api = NormTimestepPublic.model_validate(response.json())

    out = tmp_path / "norms"
    code = main(["eval", "norms", str(own_roots.models_root / "run"), "--out", str(out),
                 "--curve-samples", "2", "--curve-timesteps", "3"])
    assert code == 0
    cli = json.loads((out / "norms.json").read_text())
    assert api.count == cli["samples"] == 48
    for name in ("pearson", "spearman", "slope"):
        assert getattr(api, name) == pytest.approx(cli[name], rel=NORM_TOLERANCE), name
