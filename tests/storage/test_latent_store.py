"""A latent model's store: its latents written once at create and read back by every worker, its VAE
fingerprinted (a changed VAE makes it stale, named), and the whole path through the CLI against the
brute force of plain diffusers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from cli import main
from retrac.datasets import load_dataset
from retrac.exceptions import CheckpointError
from retrac.models import WEIGHTS_NAME
from storage import GradientStore
from storage.errors import DamagedStoreError
from tests.retrac.latent_pipeline import (
    DATA,
    brute_force_scores,
    latent_index_spec,
    relative_error,
    save_latent_pipeline,
    score_table,
)
from tests.storage.test_freshness import rewrite_same_bytes, stale_message

torch.set_num_threads(1)

K, M, SEED = 3, 2, 5
RELATIVE_ERROR = 1e-4
"""As the engine's brute-force test: float32 sums in another order, a few 1e-6 of the largest score."""
ENCODING_ERROR = 1e-5
"""Batched against one-image VAE encodings: float32 convolutions over at most a few hundred terms."""


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    return save_latent_pipeline(tmp_path / "pipeline")


def test_the_store_keeps_the_latents_it_was_built_on(pipeline: Path, tmp_path: Path) -> None:
    created = GradientStore.create(tmp_path / "store.zarr", latent_index_spec(pipeline))
    stored = torch.from_numpy(zarr.open_group(tmp_path / "store.zarr", mode="r")["latents"][:])
    vae = AutoencoderKL.from_pretrained(pipeline / "vae").eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(image[None]).latent_dist.mean for image in created.plan.dataset.images])
    torch.testing.assert_close(stored, (means - 0.1) * 0.7, rtol=0, atol=ENCODING_ERROR)
    reopened = GradientStore.open(tmp_path / "store.zarr").plan
    assert reopened.latents is not None  # read back, not encoded again
    assert torch.equal(reopened.inputs, stored)

    chunk = tmp_path / "store.zarr" / "latents" / "c" / "0" / "0" / "0" / "0"
    damaged = bytearray(chunk.read_bytes())
    damaged[100] ^= 0xFF
    chunk.write_bytes(bytes(damaged))
    with pytest.raises(DamagedStoreError, match="stored latents do not match their digest"):
        GradientStore.open(tmp_path / "store.zarr")


def test_a_changed_vae_makes_the_store_stale(pipeline: Path, tmp_path: Path) -> None:
    GradientStore.create(tmp_path / "store.zarr", latent_index_spec(pipeline))
    weights, config = pipeline / "vae" / WEIGHTS_NAME, pipeline / "vae" / "config.json"
    saved_weights, saved_config = weights.read_bytes(), config.read_text()

    rewrite_same_bytes(weights)  # the same input under another inode and mtime
    config.write_text(json.dumps({**json.loads(saved_config), "_diffusers_version": "9.9.9"}))
    assert GradientStore.open(tmp_path / "store.zarr").num_rows == 6

    tensors = load_file(weights)
    name = next(n for n in tensors if n.startswith("encoder."))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    message = stale_message(tmp_path / "store.zarr")
    assert f"the VAE ({weights}): content changed since the store was built" in message

    weights.write_bytes(saved_weights)
    config.write_text(json.dumps({**json.loads(saved_config), "scaling_factor": 0.5}))
    assert "the VAE's config.json" in (message := stale_message(tmp_path / "store.zarr"))
    assert "scaling_factor changed (0.7 then, 0.5 now)" in message

    config.write_text(saved_config)
    assert GradientStore.open(tmp_path / "store.zarr").num_rows == 6
    shutil.rmtree(pipeline / "vae")
    assert "a latent model? put its vae/ beside unet/" in stale_message(tmp_path / "store.zarr")


def query_files(folder: Path) -> tuple[list[Path], torch.Tensor]:
    """Two query images as .npy files in [0, 1], and the same images in [-1, 1] (x = 2z - 1)."""
    images = load_dataset(DATA).images
    pixels = [((images[1] + 1) / 2).numpy(), ((torch.flip(images[4], dims=[-1]) + 1) / 2).numpy()]
    files = []
    for i, unit in enumerate(pixels):
        files.append(folder / f"query-{i}.npy")
        np.save(files[-1], unit.astype(np.float32))
    return files, torch.stack([torch.from_numpy(np.load(f)) * 2 - 1 for f in files])


def expected_scores(pipeline: Path, store: GradientStore, queries: torch.Tensor) -> dict[str, torch.Tensor]:
    """The brute force at the slots the store holds (read back as data), with its weight."""
    timesteps, seeds = store.timesteps(0), store.seeds(0)
    slots = [list(zip(timesteps[n].tolist(), seeds[n].tolist(), strict=True)) for n in range(store.num_rows)]
    images = load_dataset(DATA).images
    weight = store.weights[0]
    return brute_force_scores(pipeline, weight, slots, images, queries, timesteps=K, draws=M, seed=SEED)


def test_index_and_query_a_latent_pipeline_through_the_cli(
    pipeline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(tmp_path / "store.zarr")
    assert main([
        "index", "create", store, "--checkpoint", f"{pipeline}:weight=0.5", "--data", "builtin:patches",
        "--limit", "6", "--loss", "mse", "--no-replay", "--grid", "2", "--slot-noise", "independent",
        "--random", "1", "--slot-seed", "3",
        "--projector", "identity", "--dtype", "float32", "--shard-size", "4",
    ]) == 0
    assert main(["index", "run", store]) == 0
    files, queries = query_files(tmp_path)
    capsys.readouterr()
    knobs = ["--timesteps", str(K), "--draws", str(M), "--seed", str(SEED)]
    assert main(["attribute", store, *map(str, files), "--all", "--json", *knobs]) == 0
    printed = json.loads(capsys.readouterr().out)
    opened = GradientStore.open(store)
    expected = expected_scores(pipeline, opened, queries)
    for method in ("tracin", "retrac"):
        got = score_table(printed["data"], opened.sample_ids, method)
        assert relative_error(got, expected[method]) < RELATIVE_ERROR


def test_a_vae_given_apart_from_the_unet(pipeline: Path, tmp_path: Path) -> None:
    """`vae` in the spec (`--vae DIR`) for a UNet folder whose pipeline has none; a long-lived process
    sees the VAE replaced (`signature`) and reopens the store, stale."""
    alone, vae = tmp_path / "alone", tmp_path / "vaes" / "kl"
    shutil.copytree(pipeline / "unet", alone / "unet")
    shutil.copytree(pipeline / "scheduler", alone / "scheduler")
    shutil.copytree(pipeline / "vae", vae)
    with pytest.raises(CheckpointError, match="a latent model"):
        GradientStore.create(tmp_path / "store.zarr", latent_index_spec(alone / "unet"))
    store = GradientStore.create(tmp_path / "store.zarr", latent_index_spec(alone / "unet", vae=str(vae)))
    assert store.attrs["vae"]["folder"] == str(vae)
    before = store.signature()
    tensors = load_file(vae / WEIGHTS_NAME)
    save_file({name: value * 1.01 for name, value in tensors.items()}, vae / WEIGHTS_NAME)
    assert store.signature() != before
    assert f"the VAE ({vae / WEIGHTS_NAME}): content changed" in stale_message(tmp_path / "store.zarr")
