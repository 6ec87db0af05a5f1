"""A tiny latent diffusion pipeline saved as diffusers saves one: `vae/` (an `AutoencoderKL`),
`unet/` (a `UNet2DModel` over the VAE's latents) and `scheduler/`, with `model_index.json`.

Random weights from configs (nothing can be downloaded): 16 px RGB images, a VAE that halves the
side (two encoder blocks) into 4-channel latents, with a scaling and a shift factor other than the
defaults so that both are checked, and a micro-sized UNet at the latents' 8 px.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DModel

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, ProjectorSpec, SlotSpec

IMAGE_SIDE, LATENT_SIDE, LATENT_CHANNELS = 16, 8, 4
DATA = DatasetSpec(source="builtin:patches", resolution=IMAGE_SIDE, channels=3, limit=6)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
    latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=IMAGE_SIDE, scaling_factor=0.7,
    shift_factor=0.1,
)
UNET_CONFIG = dict(
    sample_size=LATENT_SIDE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
    block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
)


class LatentPipeline(DiffusionPipeline):
    """Only to save the three parts as a pipeline folder (diffusers has no unconditional KL pipeline)."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)


def tiny_vae(seed: int = 0, **config: object) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**{**VAE_CONFIG, **config})


def save_latent_pipeline(folder: Path, seed: int = 0) -> Path:
    """The pipeline folder `folder`, its parts drawn from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        unet = UNet2DModel(**UNET_CONFIG)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    LatentPipeline(vae=tiny_vae(seed), unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def latent_index_spec(folder: Path | str, **changes: object) -> IndexSpec:
    """Grid and random slots (a pipeline has no replay record), the exact (identity) projector."""
    fields = dict(
        dataset=DATA, checkpoints=(CheckpointSpec(path=str(folder), weight=0.5),), loss="mse",
        slots=SlotSpec(replay=False, grid=2, random=1, seed=3), projector=ProjectorSpec(kind="identity"),
        dtype="float32", shard_size=4,
    )
    return IndexSpec(**{**fields, **changes})


def brute_force_scores(
    folder: Path,
    weight: float,
    slots: list[list[tuple[int, int]]],
    images: torch.Tensor,
    queries: torch.Tensor,
    *,
    timesteps: int, draws: int, seed: int,
) -> dict[str, torch.Tensor]:
    """(N, Q) TracIn and ReTrac scores of one checkpoint (method.md sections 1-4) with plain diffusers:
    each image encoded alone as `(mean - shift_factor) * scaling_factor`, noise by the store's rule,
    one autograd call per gradient over the UNet's parameters; `slots[n]` is sample n's (timestep, seed)."""
    from tests.retrac.reference import (
        autograd_gradient,
        mean_gradient,
        query_draws,
        seeded_noise,
        slot_scores,
    )

    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")

    def encode(image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            mean = vae.encode(image[None]).latent_dist.mean[0]
        return (mean - vae.config.shift_factor) * vae.config.scaling_factor

    latents = [encode(image) for image in images]
    shape = tuple(latents[0].shape)
    count = scheduler.config.num_train_timesteps
    grid = torch.linspace(1, count - 1, timesteps, dtype=torch.float64).floor().long()
    train_side = [
        torch.stack([
            autograd_gradient(unet, scheduler, z, t, seeded_noise(s, shape), "mse") for t, s in slots[n]
        ])
        for n, z in enumerate(latents)
    ]
    query_side = []
    for query in queries:
        z, noise = encode(query), query_draws(seed, timesteps, draws, shape)
        query_side.append(torch.stack([
            mean_gradient(unet, scheduler, z, int(t), noise[k], "mse") for k, t in enumerate(grid)
        ]))
    return slot_scores(train_side, query_side, weight)


def score_table(results: list[dict], sample_ids: list[str] | tuple[str, ...], method: str) -> torch.Tensor:
    """(N, Q) scores from answers that rank every sample, as JSON (`AttributionPublic` dumped)."""
    position = {s: i for i, s in enumerate(sample_ids)}
    table = torch.zeros(len(sample_ids), len(results))
    for q, result in enumerate(results):
        for influence in result["methods"][method]["proponents"]:
            table[position[influence["sample_id"]], q] = influence["score"]
    return table


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|."""
    return float((got - expected).abs().max() / expected.abs().max())
