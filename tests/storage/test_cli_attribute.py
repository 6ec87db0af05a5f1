"""`retrac attribute`: a store's rankings for image files, equal to the in-memory engine's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from api_schemas import QuerySpec
from cli import main
from retrac.attribution import Attributor
from storage import GradientStore


def test_attribute_prints_the_engine_ranking_and_draws_a_gallery(reference_store, tmp_path, capsys) -> None:
    plan = GradientStore.open(reference_store).plan
    files = []
    for row in (2, 9):
        path = tmp_path / f"query-{row}.npy"
        np.save(path, ((plan.dataset.images[row, 0] + 1) / 2).numpy())
        files.append(str(path))
    gallery = tmp_path / "gallery.png"
    code = main(["attribute", str(reference_store), *files, "--top-k", "3", "--timesteps", "6", "--draws",
                 "2", "--seed", "4", "--json", "--gallery", str(gallery)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)  # stdout is pure JSON
    expected = Attributor(plan).attribute(
        plan.dataset.images[[2, 9]], QuerySpec(timesteps=6, draws=2, seed=4), top_k=3
    )
    for got, want in zip(printed["data"], expected, strict=True):
        for method in ("tracin", "retrac"):
            for side in ("proponents", "opponents"):
                printed_side, want_side = got["methods"][method][side], getattr(want.methods[method], side)
                assert [i["sample_id"] for i in printed_side] == [i.sample_id for i in want_side]
                np.testing.assert_allclose(
                    [i["score"] for i in printed_side], [i.score for i in want_side], rtol=2e-3
                )
    assert gallery.stat().st_size > 1000
    assert gallery.read_bytes()[:4] == b"\x89PNG"


def test_attribute_says_in_one_line_what_decoding_the_queries_converted(
    reference_store, tmp_path, capsys
) -> None:
    from PIL import Image

    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(rgb)
    grey = tmp_path / "grey.npy"
    np.save(grey, np.full((8, 8), 0.5, np.float32))
    assert main(["attribute", str(reference_store), str(rgb), str(grey), "--timesteps", "2", "--draws", "1",
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["data"]) == 2
    notices = [line for line in captured.err.splitlines() if line.startswith("notice:")]
    assert notices == [
        "notice: query images: 1 of 2 converted from RGB to grey (ITU-R BT.601 luma); "
        "query images: 1 of 2 resized from 16x16 to 8x8 px (bilinear)"
    ]


def test_attribute_with_a_bad_image_exits_2(reference_store, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["attribute", str(reference_store), str(bad)]) == 2
    assert capsys.readouterr().err.startswith("retrac: error:")



def test_attribute_takes_a_folder_and_prints_every_score_as_csv(reference_store, tmp_path, capsys) -> None:
    import csv
    import io

    plan = GradientStore.open(reference_store).plan
    folder = tmp_path / "queries"
    folder.mkdir()
    for row in (4, 1):
        np.save(folder / f"q{row}.npy", ((plan.dataset.images[row, 0] + 1) / 2).numpy())
    assert main(["attribute", str(reference_store), str(folder), "--all", "--format", "csv", "--timesteps",
                 "3", "--draws", "1", "--threads", "1"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted({r["query"] for r in rows}) == [str(folder / "q1.npy"), str(folder / "q4.npy")]
    n, checkpoints = plan.num_rows, len(plan.checkpoints)
    slots = GradientStore.open(reference_store).num_slots
    assert len(rows) == 2 * 2 * n  # queries x methods x every sample once
    one = [r for r in rows if r["query"].endswith("q1.npy") and r["method"] == "retrac"]
    assert sorted(r["sample_id"] for r in one) == sorted(plan.dataset.ids)
    assert [int(r["rank"]) for r in one] == list(range(1, n + 1))
    assert {r["side"] for r in one} == {"proponents"}
    scores = [float(r["score"]) for r in one]
    assert scores == sorted(scores, reverse=True)
    for row in one:  # the contributions of the checkpoints, and the bands, each sum to the score
        parts = [float(row[f"contribution_{c}"]) for c in range(checkpoints)]
        bands = [float(row[band]) for band in ("coarse", "middle", "fine")]
        assert sum(parts) == pytest.approx(float(row["score"]), rel=1e-5, abs=1e-9)
        assert sum(bands) == pytest.approx(float(row["score"]), rel=1e-5, abs=1e-9)
        assert [row[f"timestep_{s}"].isdigit() for s in range(slots)] == [True] * slots


def test_csv_columns_choose_what_is_printed(reference_store, tmp_path, capsys) -> None:
    import csv
    import io

    query = tmp_path / "q.npy"
    np.save(query, np.full((8, 8), 0.5, np.float32))
    assert main(["attribute", str(reference_store), str(query), "--format", "csv", "--columns", "sample_id",
                 "--columns", "bands", "--top-k", "2", "--timesteps", "2", "--draws", "1"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["sample_id", "coarse", "middle", "fine"]
    assert len(rows) == 1 + 2 * 2 * 2
    assert main(["attribute", str(reference_store), str(query), "--columns", "colour"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("retrac: error: --columns: unknown column 'colour'")
    assert error.count("\n") == 1


def test_a_missing_query_file_is_refused_before_the_store_is_opened(tmp_path, capsys) -> None:
    missing = tmp_path / "missing.png"
    assert main(["attribute", str(tmp_path / "no-store.zarr"), str(missing)]) == 2
    error = capsys.readouterr().err
    assert error == f"retrac: error: {missing}: no such query image file or folder; give existing images\n"


def test_bad_query_knobs_exit_2_with_one_line(reference_store, tmp_path, capsys) -> None:
    for flags, says in (
        (["--timesteps", "0"], "timesteps"),
        (["--draws", "0"], "draws"),
        (["--top-k", "0"], "--top-k"),
    ):
        assert main(["attribute", str(reference_store), str(tmp_path), *flags]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1, error
        assert error[0].startswith("retrac: error:"), error
        assert says in error[0], error


def test_self_influence_prints_the_stores_ranking(reference_store, capsys) -> None:
    from storage.queries import self_influence

    store = GradientStore.open(reference_store)
    expected = self_influence(store)
    assert main(["self-influence", str(reference_store), "--top-k", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for method in ("tracin", "retrac"):
        top = np.argsort(-expected[method], kind="stable")[:3]
        assert [e["sample_id"] for e in printed[method]] == [store.sample_ids[i] for i in top]


def test_an_unreadable_image_is_named_without_python_internals(reference_store, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["attribute", str(reference_store), str(bad)]) == 2
    error = capsys.readouterr().err
    assert "bad.png" in error, error
    assert "BytesIO" not in error, error
    assert "0x" not in error, error


def test_the_ann_build_says_how_far_it_is(reference_store, tmp_path, capsys) -> None:
    import shutil

    store = tmp_path / "index.zarr"
    shutil.copytree(reference_store, store)
    assert main(["index", "ann", str(store)]) == 0
    error = capsys.readouterr().err
    rows = GradientStore.open(store).num_rows
    assert "ann: rows sampled: 100%" in error
    assert "ann: rows added: 100%" in error
    assert f"{rows}/{rows}" in error
    assert "ann: lists trained: 100%" in error
    assert "2/2" in error
