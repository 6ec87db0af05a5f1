"""Datasets, checkpoints and schedulers at `s3://` URLs (moto's server on loopback): read through a
bounded local mirror with the checks local inputs get, giving the rows the same local inputs give,
and fingerprinted so that a rewritten object makes the store stale with a message naming its URL."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, ProjectorSpec, SlotSpec
from cli import main
from retrac.computers import GradientComputerCache
from retrac.exceptions import CheckpointError, SpecError
from retrac.replay import TrainingRun
from storage import GradientStore, StaleStoreError, StoreError, UnreachableStoreError, run_pending
from storage.inputs import InputCache, current_inputs, use_inputs
from tests.retrac.latent_pipeline import latent_index_spec, save_latent_pipeline
from tests.retrac.text_pipeline import CHANNELS, SIDE, save_text_pipeline, write_captioned_folder
from tests.storage.helpers import EPOCHS, inputs_spec, put_inputs
from tests.storage.object_store import S3Server, upload

CPU = GradientComputerCache("cpu", threads=1)
INPUTS = 5
"""Mirrors one index of the tiny run needs: its dataset, three checkpoints and the scheduler."""


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[InputCache]:
    """A mirror folder of this test alone, made this process's (restored afterwards)."""
    before = current_inputs()
    use_inputs(InputCache(tmp_path / "cache"))
    yield current_inputs()
    use_inputs(before)


@pytest.fixture
def inputs(bucket: str, tiny_run: TrainingRun, tmp_path: Path) -> tuple[str, Path]:
    """The tiny run and its dataset in the bucket (`put_inputs`), and a local folder holding both the
    same way (`run/`, `data/digits.npz`); the bucket's URL."""
    local = tmp_path / "local"
    put_inputs(bucket, tiny_run, local)
    os.symlink(tiny_run.folder, local / "run")
    return f"s3://{bucket}", local


def spec_under(base: str) -> IndexSpec:
    if base.startswith("s3://"):
        return inputs_spec(f"{base}/models/run", f"{base}/data/digits.npz")
    return inputs_spec(f"{base}/run", f"{base}/data/digits.npz")


def mirrors(cache: InputCache) -> list[Path]:
    return sorted(p for p in cache.folder.iterdir() if not p.name.startswith("."))


def test_inputs_at_urls_give_the_rows_and_fingerprints_of_the_same_local_inputs(
    inputs: tuple[str, Path], cache: InputCache, tmp_path: Path
) -> None:
    url, local = inputs
    remote = GradientStore.create(tmp_path / "remote.zarr", spec_under(url))
    here = GradientStore.create(tmp_path / "local.zarr", spec_under(str(local)))
    run_pending(remote, CPU)
    run_pending(here, CPU)
    assert remote.attrs["fingerprints"] == here.attrs["fingerprints"]
    assert remote.sample_ids == here.sample_ids
    for c in range(3):
        assert np.array_equal(remote.norms(c), here.norms(c))
        assert np.array_equal(
            remote.rows_at(c, np.arange(48)).projected, here.rows_at(c, np.arange(48)).projected
        )
    recorded = GradientStore.open(tmp_path / "remote.zarr")
    assert recorded.spec == spec_under(url)  # the store names its inputs by URL, never by mirror
    assert [c["path"] for c in recorded.checkpoint_info] == [c.path for c in spec_under(url).checkpoints]
    assert recorded.attrs["scheduler"] == f"{url}/models/run/scheduler"
    assert len(mirrors(cache)) == INPUTS  # reopened from the mirrors: nothing fetched again


def test_a_rewritten_object_makes_the_store_stale_naming_its_url(
    inputs: tuple[str, Path],
    cache: InputCache,
    tmp_path: Path,
    s3_server: S3Server,
    bucket: str,
    tiny_run: TrainingRun,
) -> None:
    url, _ = inputs
    GradientStore.create(tmp_path / "index.zarr", spec_under(url))
    weights = "models/run/checkpoints/epoch-0004/diffusion_pytorch_model.safetensors"
    other = tiny_run.folder / "checkpoints/epoch-0006/diffusion_pytorch_model.safetensors"
    s3_server.client().put_object(Bucket=bucket, Key=weights, Body=other.read_bytes())
    with pytest.raises(StaleStoreError) as stale:
        GradientStore.open(tmp_path / "index.zarr")
    message = str(stale.value)
    assert f"checkpoint 1 ({url}/{weights}): content changed since the store was built" in message, message
    assert str(cache.folder) not in message
    assert len(mirrors(cache)) == INPUTS + 1  # the rewritten checkpoint, mirrored anew


def test_pickled_weights_are_never_fetched_and_the_checkpoint_is_refused(
    inputs: tuple[str, Path], cache: InputCache, tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    url, _ = inputs
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="models/pickled/config.json", Body=b'{"_class_name": "UNet2DModel"}')
    client.put_object(Bucket=bucket, Key="models/pickled/diffusion_pytorch_model.bin", Body=b"pickle")
    spec = spec_under(url).model_copy(update={"checkpoints": (CheckpointSpec(path=f"{url}/models/pickled"),)})
    with pytest.raises(CheckpointError, match="retrac loads safetensors only") as refused:
        GradientStore.create(tmp_path / "index.zarr", spec)
    assert f"{url}/models/pickled" in str(refused.value)
    assert str(cache.folder) not in str(refused.value)
    fetched = {f.name for m in mirrors(cache) for f in m.rglob("*")}
    assert "config.json" in fetched
    assert "diffusion_pytorch_model.bin" not in fetched


def test_an_input_larger_than_the_cache_is_refused_and_old_mirrors_make_room(
    inputs: tuple[str, Path], tmp_path: Path, tiny_run: TrainingRun
) -> None:
    url, _ = inputs
    checkpoint = tiny_run.folder / "checkpoints/epoch-0002"
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    small = InputCache(tmp_path / "small", max_bytes=size - 1)
    with pytest.raises(SpecError, match=f"{size} bytes, more than the input cache holds") as refused:
        small.mirror(f"{url}/models/run/checkpoints/epoch-0002")
    assert "\n" not in str(refused.value)
    two = InputCache(tmp_path / "two", max_bytes=2 * size + size // 2)  # room for two checkpoints
    first, second, third = (two.mirror(f"{url}/models/run/checkpoints/epoch-{e:04d}") for e in EPOCHS)
    assert not first.exists()  # the least recently used went
    assert second.is_dir()
    assert third.is_dir()
    assert (third / "diffusion_pytorch_model.safetensors").read_bytes() == (
        tiny_run.folder / "checkpoints/epoch-0006/diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_the_cli_indexes_checkpoints_and_a_dataset_given_by_url(
    inputs: tuple[str, Path],
    cache: InputCache,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, _ = inputs
    monkeypatch.setenv("RETRAC_INPUT_CACHE", str(tmp_path / "cli-cache"))
    monkeypatch.setattr("worker.settings._current", None)  # read the environment afresh
    run = f"{url}/models/run"
    command = ["index", "create", str(tmp_path / "cli.zarr"), "--data", f"{url}/data/digits.npz"]
    command += ["--checkpoint", f"{run}/checkpoints/epoch-0002:epoch=2,lr=0.002", "--scheduler",
                f"{run}/scheduler"]
    command += ["--resolution", "8", "--loss", "mse", "--no-replay", "--grid", "1", "--train-batch-size",
                "16", "--slot-noise", "independent"]
    assert main(command) == 0, capsys.readouterr().err
    store = GradientStore.open(tmp_path / "cli.zarr")
    assert store.spec.dataset.source == f"{url}/data/digits.npz"  # recorded as given, not made a path
    assert store.checkpoint_info[0]["path"] == f"{run}/checkpoints/epoch-0002"
    assert (
        len(mirrors(InputCache(tmp_path / "cli-cache"))) == 3
    )  # the CLI's settings chose the mirrors' folder
    assert (
        main(["index", "create", str(tmp_path / "bad.zarr"), "--data", f"{url}/data/none.npz"] + command[5:])
        == 2
    )
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert f"{url}/data/none.npz: no such object in the bucket" in error, error


def test_a_key_that_would_leave_its_mirror_is_refused(
    s3_server: S3Server, bucket: str, cache: InputCache
) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="models/evil/../../outside.json", Body=b"{}")
    with pytest.raises(StoreError, match="holds an object whose key is not a plain path") as refused:
        cache.mirror(f"s3://{bucket}/models/evil")
    assert not isinstance(refused.value, UnreachableStoreError)
    assert "\n" not in str(refused.value)
    assert not cache.folder.exists() or mirrors(cache) == []


def test_a_latent_model_whose_vae_is_in_the_bucket_gives_the_rows_of_the_local_one(
    bucket: str, cache: InputCache, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = save_latent_pipeline(tmp_path / "local" / "pipeline")
    upload(pipeline, bucket, "models/pipeline")
    url = f"s3://{bucket}/models/pipeline"

    def spec(base: str) -> IndexSpec:  # the UNet alone: its VAE and scheduler given, not found beside it
        return latent_index_spec(f"{base}/unet", vae=f"{base}/vae", scheduler=f"{base}/scheduler")

    remote = GradientStore.create(tmp_path / "remote.zarr", spec(url))
    here = GradientStore.create(tmp_path / "local.zarr", spec(str(pipeline)))
    run_pending(remote, CPU)
    run_pending(here, CPU)
    assert remote.attrs["fingerprints"] == here.attrs["fingerprints"]
    assert np.array_equal(remote.rows_at(0, np.arange(6)).projected, here.rows_at(0, np.arange(6)).projected)
    recorded = GradientStore.open(tmp_path / "remote.zarr")
    assert recorded.spec.vae == recorded.attrs["vae"]["folder"] == f"{url}/vae"  # named by URL, not mirror

    command = ["index", "create", str(tmp_path / "cli.zarr"), "--checkpoint", f"{pipeline}/unet:weight=0.5"]
    command += ["--vae", f"{url}/vae", "--data", "builtin:patches", "--limit", "6", "--loss", "mse"]
    command += ["--no-replay", "--grid", "1", "--slot-noise", "independent"]
    assert main(command) == 2  # the model's shape is not read ahead through a VAE at a URL...
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert "give resolution 16 and channels 3" in error, error
    assert main([*command, "--resolution", "16", "--channels", "3"]) == 0, capsys.readouterr().err


def test_a_text_pipeline_and_a_captioned_folder_in_the_bucket_give_the_local_fingerprints(
    bucket: str, cache: InputCache, tmp_path: Path
) -> None:
    pipeline = save_text_pipeline(tmp_path / "local" / "pipeline")
    captioned = write_captioned_folder(tmp_path / "local" / "captioned")
    upload(pipeline, bucket, "models/pipeline")
    upload(captioned, bucket, "data/captioned")

    def spec(models: str, data: str) -> IndexSpec:
        return IndexSpec(
            dataset=DatasetSpec(source=data, resolution=SIDE, channels=CHANNELS),
            checkpoints=(CheckpointSpec(path=models, weight=0.5),),
            loss="mse",
            slots=SlotSpec(replay=False, grid=1, seed=3),
            projector=ProjectorSpec(kind="sketch", dim=64, seed=1),
            shard_size=6,
        )

    url = f"s3://{bucket}"
    remote_spec = spec(f"{url}/models/pipeline", f"{url}/data/captioned")
    remote = GradientStore.create(tmp_path / "remote.zarr", remote_spec)
    here = GradientStore.create(tmp_path / "local.zarr", spec(str(pipeline), str(captioned)))
    assert remote.attrs["fingerprints"] == here.attrs["fingerprints"]  # tokenizer files and captions included
    assert remote.attrs["text"]["tokenizer"] == f"{url}/models/pipeline/tokenizer"
    assert GradientStore.open(tmp_path / "remote.zarr").text_conditional


def test_a_mirror_in_use_is_never_evicted_and_goes_once_released(
    inputs: tuple[str, Path], tmp_path: Path, tiny_run: TrainingRun
) -> None:
    url, _ = inputs
    checkpoint = tiny_run.folder / "checkpoints/epoch-0002"
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    two = InputCache(tmp_path / "two", max_bytes=2 * size + size // 2)  # room for two checkpoints
    first_url, second_url, third_url = (f"{url}/models/run/checkpoints/epoch-{e:04d}" for e in EPOCHS)
    first, lease = two.leased(first_url)
    second = two.mirror(second_url)
    third = two.mirror(third_url)  # room made: not from the least recently used, which is in use
    assert first.is_dir()
    assert not second.exists()
    assert third.is_dir()
    _, held = two.leased(third_url)
    with pytest.raises(SpecError, match="bytes do not fit in the input cache .* beside the inputs in use"):
        two.mirror(second_url)  # both mirrors in use: refused, neither removed
    assert first.is_dir()
    assert third.is_dir()
    lease.release()
    assert two.mirror(second_url).is_dir()
    assert not first.exists()  # released: evicted in its turn
    held.release()


EVICT = """
import sys
from pathlib import Path
from retrac.exceptions import SpecError
from storage.inputs import InputCache
try:
    InputCache(Path(sys.argv[1]), int(sys.argv[2])).mirror(sys.argv[3])
    print("mirrored")
except SpecError as error:
    print(error)
"""


def test_an_opened_store_keeps_its_mirrors_from_another_process_until_dropped(
    inputs: tuple[str, Path], cache: InputCache, tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    url, _ = inputs
    store = GradientStore.create(tmp_path / "index.zarr", spec_under(url))
    used = sum(f.stat().st_size for m in mirrors(cache) for f in m.rglob("*") if f.is_file())
    bound, extra = used + 1000, f"{url}/models/extra"
    s3_server.client().put_object(Bucket=bucket, Key="models/extra/config.json", Body=b" " * 2000)
    other = subprocess.run(
        [sys.executable, "-c", EVICT, str(cache.folder), str(bound), extra],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "do not fit in the input cache" in other.stdout, other.stdout + other.stderr
    assert len(mirrors(cache)) == INPUTS  # the store's mirrors, all still there
    del store
    gc.collect()  # the store dropped: its leases with it
    assert InputCache(cache.folder, bound).mirror(extra).is_dir()
    assert len(mirrors(cache)) <= INPUTS  # the extra one among them: room made from the released mirrors
