"""Stale only when an input really changed, and then named: the dataset, a checkpoint, the scheduler,
the replay record. The same input moved behind a link, rewritten with the same bytes or saved again by
another diffusers version is not a change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from api_schemas import DatasetSpec, IndexSpec, SlotSpec, TrainSpec
from retrac.datasets import load_dataset, old_sample_ids
from retrac.exceptions import SpecError
from retrac.models import WEIGHTS_NAME, fingerprint_checkpoint, sha256_file
from retrac.plan import IndexPlan
from retrac.replay import RECORD_NAME, TrainingRun
from retrac.training import train
from storage import GradientStore, StaleStoreError, StoreError
from storage.shards import ids_digest
from tests.conftest import TINY_DATASET
from tests.storage.helpers import tiny_index_spec


@pytest.fixture
def inputs(tmp_path: Path, tiny_run: TrainingRun) -> dict[str, Path]:
    """A copy of the tiny run, an image folder of 12 of its digits in two class folders, and two
    stores: `replay.zarr` of the run, `folder.zarr` of the image folder (grid slots)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run.folder, run)
    digits = load_dataset(TINY_DATASET)
    for i in range(12):
        (tmp_path / "images" / f"class-{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.to_uint8(i)).save(tmp_path / "images" / f"class-{i % 2}" / f"{i:02d}.png")
    GradientStore.create(tmp_path / "replay.zarr", tiny_index_spec(run))
    folder_data = DatasetSpec(source=str(tmp_path / "images"), resolution=8)
    GradientStore.create(
        tmp_path / "folder.zarr",
        tiny_index_spec(run, dataset=folder_data, slots=SlotSpec(replay=False, grid=2)),
    )
    return {"run": run, "images": tmp_path / "images", "base": tmp_path}


def stale_message(store: Path) -> str:
    with pytest.raises(StaleStoreError) as caught:
        GradientStore.open(store)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.endswith("then `retrac index run`)"), message
    return message


def move_behind_link(path: Path, elsewhere: Path) -> None:
    """Move `path` to `elsewhere` and leave a link at `path`: the same input, which still resolves."""
    elsewhere.parent.mkdir(parents=True, exist_ok=True)
    path.rename(elsewhere)
    path.symlink_to(elsewhere, target_is_directory=elsewhere.is_dir())


def rewrite_same_bytes(file: Path) -> None:
    data = file.read_bytes()
    file.unlink()
    file.write_bytes(data)  # another inode and mtime, the same content


def test_identical_inputs_moved_or_rewritten_are_not_stale(inputs: dict[str, Path]) -> None:
    run, base = inputs["run"], inputs["base"]
    rewrite_same_bytes(run / RECORD_NAME)
    rewrite_same_bytes(run / "checkpoints/epoch-0004" / WEIGHTS_NAME)
    rewrite_same_bytes(inputs["images"] / "class-1" / "03.png")
    config = run / "scheduler" / "scheduler_config.json"
    saved = json.loads(config.read_text())
    config.write_text(
        json.dumps({**saved, "_diffusers_version": "9.9.9"}, indent=4)
    )  # saved by another version
    move_behind_link(inputs["images"], base / "moved" / "images")
    move_behind_link(run / "checkpoints", base / "moved" / "checkpoints")
    move_behind_link(run / "scheduler", base / "moved" / "scheduler")
    move_behind_link(run / RECORD_NAME, base / "moved" / RECORD_NAME)
    for store in ("replay.zarr", "folder.zarr"):
        assert GradientStore.open(base / store).num_checkpoints == 3


def test_a_changed_dataset_is_named_with_what_changed(inputs: dict[str, Path]) -> None:
    images, store = inputs["images"], inputs["base"] / "folder.zarr"
    assert GradientStore.open(store).sample_ids[:2] == ("class-0/00.png", "class-0/02.png")
    changed = np.asarray(Image.open(images / "class-1" / "03.png")).copy()
    changed[0, 0] ^= 0xFF
    Image.fromarray(changed).save(images / "class-1" / "03.png")
    assert f"stale: the dataset ({images}): the pixels or groups of its samples changed" in stale_message(
        store
    )
    (images / "class-1" / "03.png").unlink()
    Image.fromarray(changed).save(images / "class-1" / "99.png")
    assert "the dataset" in (message := stale_message(store))
    assert "1 sample(s) gone (class-1/03.png), 1 new (class-1/99.png) since the store was built" in message


def test_a_store_of_the_old_sample_id_rule_is_refused_with_why(inputs: dict[str, Path]) -> None:
    store = inputs["base"] / "folder.zarr"
    opened = GradientStore.open(store, check=False)
    old = old_sample_ids(opened.sample_ids)
    opened._group["sample_ids"][:] = np.asarray(old, dtype=object)
    opened._group.attrs["sample_ids_digest"] = ids_digest(old)  # as such a store recorded them
    opened._group.attrs["fingerprints"] = {**opened.attrs["fingerprints"], "dataset": "0" * 64}
    message = stale_message(store)
    assert "the rule of earlier versions ('class-0_00.png')" in message
    assert "('class-0/00.png')" in message


def test_a_changed_checkpoint_is_named_with_its_file_or_config_entry(inputs: dict[str, Path]) -> None:
    run, store = inputs["run"], inputs["base"] / "replay.zarr"
    weights_file = run / "checkpoints/epoch-0006" / WEIGHTS_NAME
    original = weights_file.read_bytes()
    weights = load_file(weights_file)
    name = next(iter(weights))
    save_file({**weights, name: weights[name] + 1e-3}, weights_file)
    message = stale_message(store)
    assert (
        f"stale: checkpoint 2 ({weights_file}): content changed since the store was built (sha256 " in message
    )
    weights_file.write_bytes(original)
    for folder in ("epoch-0002", "epoch-0004", "epoch-0006"):
        config = run / "checkpoints" / folder / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "norm_eps": 1e-6}))
    message = stale_message(store)
    assert (
        f"the checkpoints' config.json ({run / 'checkpoints/epoch-0002'}): norm_eps changed (1e-05 then, "
        "1e-06 now)"
        in message
    )


def test_a_changed_scheduler_is_named_with_the_entry(inputs: dict[str, Path]) -> None:
    config = inputs["run"] / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "beta_schedule": "squaredcos_cap_v2"}))
    message = stale_message(inputs["base"] / "replay.zarr")
    assert (
        f"stale: the scheduler ({config}): beta_schedule changed ('linear' then, 'squaredcos_cap_v2' now)"
        in message
    )


def test_the_replay_record_is_stale_only_where_its_replayed_steps_changed(inputs: dict[str, Path]) -> None:
    record_file, store = inputs["run"] / RECORD_NAME, inputs["base"] / "replay.zarr"
    record = load_file(record_file)
    save_file({**record, "losses": record["losses"] * 2}, record_file)  # not what the store replays
    assert GradientStore.open(store).num_rows == 48
    timesteps = record["timesteps"].clone()
    timesteps[3, 5] = (timesteps[3, 5] + 1) % 1000  # epoch 4, replayed by checkpoint 1
    save_file({**record, "timesteps": timesteps}, record_file)
    message = stale_message(store)
    assert f"stale: the replay record ({record_file}): the recorded steps of epoch 4 changed" in message


def test_stores_with_the_earlier_fingerprints_are_still_checked(inputs: dict[str, Path]) -> None:
    """Format-2 stores written before per-input fingerprints: checkpoints and scheduler hashed whole."""
    run, store = inputs["run"], inputs["base"] / "replay.zarr"
    opened = GradientStore.open(store, check=False)
    then = opened.attrs["fingerprints"]
    opened._group.attrs["fingerprints"] = {
        "dataset": then["dataset"],
        "checkpoints": [fingerprint_checkpoint(run / "checkpoints" / f"epoch-{e:04d}") for e in (2, 4, 6)],
        "record": then["record"],
        "scheduler": sha256_file(run / "scheduler" / "scheduler_config.json"),
    }
    assert GradientStore.open(store).num_rows == 48
    config = run / "checkpoints/epoch-0002/config.json"
    config.write_text(config.read_text() + "\n")
    assert f"checkpoint 0 ({run / 'checkpoints/epoch-0002'}): its config or weights changed" in stale_message(
        store
    )


def test_a_run_of_the_old_sample_id_rule_is_refused_with_why(inputs: dict[str, Path]) -> None:
    data = DatasetSpec(source=str(inputs["images"]), resolution=8)
    spec = TrainSpec(dataset=data, preset="micro", epochs=1, batch_size=12, save_every=1, seed=0)
    run = train(spec, load_dataset(data), inputs["base"] / "folder-run").folder
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(
        json.dumps({**manifest, "sample_ids": list(old_sample_ids(manifest["sample_ids"]))})
    )
    with pytest.raises(
        SpecError, match=r"by the rule of earlier versions \('class-0_00.png'\); .* \('class-0/00.png'\)"
    ):
        IndexPlan.resolve(IndexSpec(dataset=data, run=str(run)))


def test_a_run_that_trains_on_leaves_its_stores_fresh(tmp_path: Path, tiny_run: TrainingRun) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run.folder, run)
    manifest_file = run / "manifest.json"
    full = json.loads(manifest_file.read_text())
    manifest_file.write_text(
        json.dumps({**full, "checkpoints": full["checkpoints"][:2]})
    )  # before epoch 6 was saved
    store = GradientStore.create(tmp_path / "s.zarr", tiny_index_spec(run))
    assert [c.epoch for c in store.spec.checkpoints] == [2, 4]

    manifest_file.write_text(json.dumps(full))  # training went on and saved another checkpoint
    reopened = GradientStore.open(tmp_path / "s.zarr")
    assert reopened.num_checkpoints == 2
    assert [c.weight for c in reopened.plan.checkpoints] == [
        c.weight for c in store.plan.checkpoints
    ]
    # The same request now means the three checkpoints, which is another index.
    with pytest.raises(StoreError, match="different index"):
        GradientStore.create(tmp_path / "s.zarr", tiny_index_spec(run))
