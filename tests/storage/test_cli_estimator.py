"""`retrac index create --slot-noise shared` and `retrac attribute --estimator matched`: the store's
answer equals the engine's, says which estimator and settings made it, and what a store cannot answer
exits 2 with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from api_schemas import QuerySpec, SlotSpec
from api_schemas.specs import DEFAULT_KERNEL, DEFAULT_SLOTS, PAPER_SLOTS
from cli import main
from retrac.attribution import Attributor
from storage import GradientStore


@pytest.fixture(scope="module")
def shared_store(tiny_run, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("shared") / "index.zarr")
    assert main(["index", "create", path, "--run", str(tiny_run.folder), "--grid", "3", "--slot-noise",
                 "shared", "--slot-draws", "2", "--slot-seed", "4", "--dim", "256", "--shard-size",
                 "16"]) == 0
    assert main(["index", "run", path]) == 0
    return path


def test_matched_estimator_from_the_command_line(shared_store, tmp_path, capsys) -> None:
    plan = GradientStore.open(shared_store).plan
    assert plan.spec.slots.noise == "shared"
    assert plan.spec.slots.draws == 2
    query = tmp_path / "query.npy"
    np.save(query, ((plan.dataset.images[5, 0] + 1) / 2).numpy())
    capsys.readouterr()
    assert (
        main(["attribute", shared_store, str(query), "--estimator", "matched", "--top-k", "3", "--json",
              "--method", "tracin", "--method", "retrac"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    knobs = ("timesteps", "draws", "seed", "estimator", "search", "label", "prompt")
    ran = {key: printed[key] for key in knobs}
    assert ran == {
        "timesteps": 3, "draws": 2, "seed": 4, "estimator": "matched", "search": "exact",
        "label": None, "prompt": None,
    }
    result = printed["data"][0]
    want = Attributor(plan).attribute(plan.dataset.images[5:6], QuerySpec(estimator="matched"), top_k=3)[0]
    assert result["estimator"] == "matched"
    for method in ("tracin", "retrac"):
        got = result["methods"][method]["proponents"]
        assert [i["sample_id"] for i in got] == [i.sample_id for i in want.methods[method].proponents]
        for influence in got:
            assert set(influence["bands"]) == {"coarse", "middle", "fine"}
    assert result["methods"]["retrac"]["proponents"][0]["sample_id"] == plan.dataset.ids[5]


@pytest.mark.parametrize(
    ("store", "flags", "message"),
    [
        ("shared", ["--timesteps", "5"], "got timesteps=5"),
        ("reference", [], "needs an index with shared-noise grid slots"),
    ],
)
def test_a_matched_query_the_store_cannot_answer_exits_2(
    shared_store, reference_store, tmp_path, capsys, store, flags, message
) -> None:
    query = tmp_path / "query.npy"
    np.save(query, np.zeros((8, 8), dtype=np.float32))
    path = shared_store if store == "shared" else str(reference_store)
    capsys.readouterr()
    assert main(["attribute", path, str(query), "--estimator", "matched", *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("retrac: error:")
    assert message in error
    assert "\n" not in error


def test_the_defaults_build_the_measured_slots_and_attribute_with_the_matched_estimator(
    tiny_run, reference_store, tmp_path, capsys
) -> None:
    """`index create` without slot flags builds DEFAULT_SLOTS and the kernel; `attribute` without
    --estimator or --method then runs trak under the matched estimator (the same answer as asking for
    them), the paper's estimator and methods where the store has no shared slots or the user sets K,
    and the best method a store without the kernel serves, saying what trak needs."""
    path = str(tmp_path / "default.zarr")
    run = str(tiny_run.folder)
    assert main(["index", "create", path, "--run", run, "--dim", "64", "--shard-size", "16"]) == 0
    assert main(["index", "run", path]) == 0
    assert GradientStore.open(path).spec.slots == DEFAULT_SLOTS
    assert GradientStore.open(path).spec.kernel == DEFAULT_KERNEL
    query = tmp_path / "query.npy"
    np.save(query, np.full((8, 8), 0.3, dtype=np.float32))

    def answer(store: str, *flags: str) -> dict:
        capsys.readouterr()
        assert main(["attribute", store, str(query), "--top-k", "3", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    default = answer(path)
    assert default["estimator"] == "matched"
    assert default["data"][0]["estimator"] == "matched"
    shape = (default["timesteps"], default["draws"])
    assert shape == (DEFAULT_SLOTS.grid, DEFAULT_SLOTS.draws)
    assert list(default["data"][0]["methods"]) == ["trak"]
    assert default["notices"] == []  # the measured best ran: nothing to say beyond its name
    asked = answer(path, "--estimator", "matched", "--method", "trak")
    ran = ("timesteps", "draws", "seed", "estimator", "search", "data")
    assert {k: default[k] for k in ran} == {k: asked[k] for k in ran}
    own_k = answer(path, "--timesteps", "4")
    assert own_k["estimator"] == "paper"
    assert list(own_k["data"][0]["methods"]) == ["tracin", "retrac"]
    reference = answer(str(reference_store))
    assert reference["estimator"] == "paper"
    assert any("no shared-noise grid slots" in n for n in reference["notices"])
    assert list(reference["data"][0]["methods"]) == ["tracin", "retrac"]

    bare = str(tmp_path / "bare.zarr")
    flags = ["--dim", "64", "--shard-size", "16", "--no-kernel"]
    assert main(["index", "create", bare, "--run", run, *flags]) == 0
    assert main(["index", "run", bare]) == 0
    fallback = answer(bare)
    assert (fallback["estimator"], list(fallback["data"][0]["methods"])) == ("matched", ["retrac"])
    assert fallback["notices"] == [
        "methods retrac, the best this index serves (method trak needs the index's TRAK kernel and this "
        "index has none: create it with --kernel)"
    ]
    capsys.readouterr()
    assert main(["attribute", bare, str(query), "--method", "trak"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("this index has none: create it with --kernel")
    assert "\n" not in error


def test_the_paper_preset_builds_the_papers_slots_and_refuses_slot_flags(tiny_run, tmp_path, capsys) -> None:
    path = str(tmp_path / "paper.zarr")
    run = str(tiny_run.folder)
    assert main(["index", "create", path, "--run", run, "--dim", "64", "--preset", "paper"]) == 0
    assert GradientStore.open(path).spec.slots == PAPER_SLOTS == SlotSpec()
    capsys.readouterr()
    other = str(tmp_path / "other.zarr")
    assert main(["index", "create", other, "--run", run, "--preset", "paper", "--grid", "3"]) == 2
    error = capsys.readouterr().err
    assert "--preset paper fixes the slots" in error
    assert error.count("\n") == 1
