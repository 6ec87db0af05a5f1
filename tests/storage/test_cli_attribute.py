"""`retrac attribute`: a store's rankings for image files, equal to the in-memory engine's."""

from __future__ import annotations

import json

import numpy as np

from api_schemas import QuerySpec
from retrac.attribution import Attributor
from cli import main
from storage import GradientStore


def test_attribute_prints_the_engine_ranking_and_draws_a_gallery(reference_store, tmp_path, capsys) -> None:
    plan = GradientStore.open(reference_store).plan
    files = []
    for row in (2, 9):
        path = tmp_path / f"query-{row}.npy"
        np.save(path, ((plan.dataset.images[row, 0] + 1) / 2).numpy())
        files.append(str(path))
    gallery = tmp_path / "gallery.png"
    code = main(["attribute", str(reference_store), *files, "--top-k", "3", "--timesteps", "6", "--draws", "2",
                 "--seed", "4", "--json", "--gallery", str(gallery)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)  # stdout is pure JSON
    expected = Attributor(plan).attribute(
        plan.dataset.images[[2, 9]], QuerySpec(timesteps=6, draws=2, seed=4), top_k=3
    )
    for got, want in zip(printed["results"], expected, strict=True):
        for method in ("tracin", "retrac"):
            for side in ("proponents", "opponents"):
                printed_side, want_side = got["methods"][method][side], getattr(want.methods[method], side)
                assert [i["sample_id"] for i in printed_side] == [i.sample_id for i in want_side]
                np.testing.assert_allclose(
                    [i["score"] for i in printed_side], [i.score for i in want_side], rtol=2e-3
                )
    assert gallery.stat().st_size > 1000 and gallery.read_bytes()[:4] == b"\x89PNG"


def test_attribute_with_a_bad_image_exits_2(reference_store, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["attribute", str(reference_store), str(bad)]) == 2
    assert capsys.readouterr().err.startswith("retrac: error:")

