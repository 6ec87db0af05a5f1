"""Latent diffusion pipelines (a VAE beside the UNet): exact scores against a brute force written
with plain diffusers, and every pipeline retrac cannot handle exactly refused when the index is made."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from api_schemas import QuerySpec
from cli import main
from retrac.attribution import Attributor
from retrac.exceptions import CheckpointError, SpecError
from retrac.plan import IndexPlan
from tests.retrac.latent_pipeline import (
    DATA,
    IMAGE_SIDE,
    LATENT_CHANNELS,
    LATENT_SIDE,
    UNET_CONFIG,
    brute_force_scores,
    latent_index_spec,
    relative_error,
    save_latent_pipeline,
    score_table,
    tiny_vae,
)

torch.set_num_threads(1)

K, M, SEED = 4, 2, 7
RELATIVE_ERROR = 1e-4
"""Bound on max |engine - reference| / max |reference|: float32 sums over ~45k UNet parameters and a
batched VAE encoding, taken in another order than the one-image-at-a-time reference (a few 1e-6)."""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_latent_pipeline(tmp_path_factory.mktemp("latent") / "pipeline")


def test_exact_scores_equal_brute_force(pipeline: Path) -> None:
    plan = IndexPlan.resolve(latent_index_spec(pipeline))
    assert plan.latent_space is not None
    assert plan.latent_space.folder == pipeline / "vae"
    assert tuple(plan.inputs.shape) == (6, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE)
    assert tuple(plan.dataset.images.shape) == (6, 3, IMAGE_SIDE, IMAGE_SIDE)
    queries = torch.stack([plan.dataset.images[1], torch.flip(plan.dataset.images[4], dims=[-1])])
    query = QuerySpec(timesteps=K, draws=M, seed=SEED)
    results = Attributor(plan).attribute(queries, query, top_k=len(plan.dataset))
    timesteps, seeds = plan.slots(0, slice(0, plan.num_rows))
    slots = [list(zip(timesteps[n].tolist(), seeds[n].tolist(), strict=True)) for n in range(plan.num_rows)]
    expected = brute_force_scores(
        pipeline, 0.5, slots, plan.dataset.images, queries, timesteps=K, draws=M, seed=SEED
    )
    answers = [r.model_dump(mode="json") for r in results]
    for method in ("tracin", "retrac"):
        got = score_table(answers, plan.dataset.ids, method)
        assert relative_error(got, expected[method]) < RELATIVE_ERROR


def refusal(spec_changes: dict, folder: Path) -> str:
    with pytest.raises((SpecError, CheckpointError)) as caught:
        IndexPlan.resolve(latent_index_spec(folder, **spec_changes))
    return str(caught.value)


def test_a_dataset_of_another_size_than_the_vae_makes_is_refused(pipeline: Path) -> None:
    message = refusal({"dataset": DATA.model_copy(update={"resolution": 8})}, pipeline)
    assert "3x8x8" in message
    assert "takes 3x16x16" in message
    assert "resolution 16" in message
    message = refusal({"dataset": DATA.model_copy(update={"channels": 1})}, pipeline)
    assert "1x16x16" in message
    assert "channels 3" in message


def test_pipelines_retrac_cannot_encode_exactly_are_refused(pipeline: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-vae"
    tiny_vae(latent_channels=3).save_pretrained(other)
    assert "UNet takes 4 channels but the VAE" in refusal({"vae": str(other)}, pipeline)

    tiny_vae(latents_mean=[0.0] * 4, latents_std=[1.0] * 4).save_pretrained(other)
    assert "latents_mean/latents_std" in refusal({"vae": str(other)}, pipeline)

    pickled = tmp_path / "pickled"
    tiny_vae().save_pretrained(pickled, safe_serialization=False)
    assert "safetensors only" in refusal({"vae": str(pickled)}, pipeline)

    vq = tmp_path / "vq"  # diffusers' LDMPipeline layout: a VQ model in vqvae/
    shutil.copytree(pipeline, vq)
    (vq / "vae").rename(vq / "vqvae")
    assert "VQ-VAE (vqvae/)" in refusal({"checkpoints": ()} | _checkpoint(vq), vq)

    lost = tmp_path / "lost"  # the latent UNet without its VAE
    shutil.copytree(pipeline, lost)
    shutil.rmtree(lost / "vae")
    assert "a latent model? put its vae/ beside unet/" in refusal(_checkpoint(lost), lost)


def _checkpoint(folder: Path) -> dict:
    return {"checkpoints": latent_index_spec(folder).checkpoints}


def test_index_create_refuses_in_one_line_and_defaults_the_shape_to_the_vaes(
    pipeline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--loss", "mse", "--no-replay", "--grid", "1", "--slot-noise", "independent",
             "--projector", "identity", "--limit", "2"]
    assert main(["index", "create", str(tmp_path / "wrong.zarr"), "--checkpoint", str(pipeline), "--data",
                 "builtin:patches", "--resolution", "8", "--channels", "3", *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("retrac: error: the dataset is 3x8x8")
    assert "\n" not in error
    assert main(["index", "create", str(tmp_path / "right.zarr"), "--checkpoint", str(pipeline), "--data",
                 "builtin:patches", *flags]) == 0  # 3 channels at 16 px: the VAE's images
    capsys.readouterr()
    assert main(["index", "inspect", str(tmp_path / "right.zarr"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    dataset = report["spec"]["dataset"]
    assert (dataset["resolution"], dataset["channels"]) == (IMAGE_SIDE, 3)
    assert report["vae"]["folder"] == str(pipeline / "vae")
    assert (report["vae"]["scaling_factor"], report["vae"]["shift_factor"]) == (0.7, 0.1)
    assert report["vae"]["latent_shape"] == [LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE]
    assert report["fingerprints"]["vae"]["config"]["scaling_factor"] == 0.7
    assert report["freshness"].startswith("fresh")


def test_a_pixel_model_has_no_vae(tmp_path: Path) -> None:
    """A pipeline folder without vae/ keeps indexing the images themselves."""
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(**{**UNET_CONFIG, "in_channels": 3, "out_channels": 3, "sample_size": IMAGE_SIDE})
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pixel")
    plan = IndexPlan.resolve(latent_index_spec(tmp_path / "pixel"))
    assert plan.latent_space is None
    assert plan.inputs is plan.dataset.images
