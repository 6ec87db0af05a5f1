"""Latent diffusion: a pipeline's VAE turns images into the latents its denoiser was trained on.

A latent pipeline folder, as diffusers saves one, holds `vae/` (an `AutoencoderKL`, safetensors)
beside `unet/` and `scheduler/`. Every training image is encoded once, deterministically, as the mean
of the VAE's latent distribution, shifted and scaled by the VAE config as diffusers' pipelines do:

    z = (mean(E(x)) - shift_factor) * scaling_factor        (shift_factor 0 when the config has none)

Queries are encoded the same way. Training scripts draw `latent_dist.sample()` at every step instead;
that draw is not recorded anywhere, so no run could be replayed with it, while the mean is the one
value every index and query agree on (the VAE's posterior spread is small next to the latents').
The VAE is frozen: gradients are over the denoiser's parameters only.

The denoiser's `in_channels` and `sample_size` are the latent's shape; the images are the VAE's
`in_channels` at the UNet's size times the VAE's downsampling factor `2 ** (len(block_out_channels) - 1)`,
the default image size of diffusers' latent pipelines (the VAE config's own `sample_size` is a tiling
hint there, and is not used).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from retrac.exceptions import CheckpointError
from retrac.models import WEIGHTS_NAME, config_settings, pipeline_folder, sample_shape

VAE_FOLDER = "vae"
"""The VAE's folder in a pipeline folder, as diffusers names it."""

ENCODE_CHUNK = 16
"""Images encoded per VAE forward: bounds the encoder's activations (a 512 px image's are ~1 GB)."""

_IMAGE_CHANNELS = (1, 3)


@dataclass(frozen=True, eq=False)
class LatentSpace:
    """A frozen `AutoencoderKL` in `folder` and what its config says about the latents.

    `settings` are its config's entries (`retrac.models.config_settings`); the module itself is
    loaded on first use (`encode`), so checking a spec never costs the VAE's weights.
    """

    folder: Path
    settings: dict[str, Any]

    @classmethod
    def load(cls, folder: str | Path) -> LatentSpace:
        """The VAE in `folder`, its config checked; a CheckpointError saying what to do otherwise."""
        folder = Path(folder)
        config = folder / "config.json"
        if not config.is_file():
            raise CheckpointError(
                f"{folder}: no config.json; give --vae DIR, a VAE folder as diffusers saves it"
            )
        settings = config_settings(config)
        name = settings.get("_class_name")
        if name != "AutoencoderKL":
            raise CheckpointError(
                f"{folder}: VAE class {name!r} is not handled; retrac encodes with an AutoencoderKL"
            )
        if settings.get("latents_mean") is not None or settings.get("latents_std") is not None:
            raise CheckpointError(
                f"{folder}: the VAE config sets latents_mean/latents_std, whose use differs between training "
                "scripts; retrac handles latents scaled by scaling_factor (and shift_factor) only"
            )
        if not (folder / WEIGHTS_NAME).is_file():
            raise CheckpointError(
                f"{folder}: no {WEIGHTS_NAME}; retrac loads safetensors only (convert pickled .bin "
                "weights first)"
            )
        return cls(folder, settings)

    @property
    def weights_file(self) -> Path:
        return self.folder / WEIGHTS_NAME

    @property
    def scaling_factor(self) -> float:
        return float(self.settings.get("scaling_factor", 0.18215))  # AutoencoderKL's default

    @property
    def shift_factor(self) -> float:
        shift = self.settings.get("shift_factor")
        return 0.0 if shift is None else float(shift)

    @property
    def downsampling(self) -> int:
        """How many image pixels one latent pixel spans, per side."""
        return 2 ** (len(self.settings.get("block_out_channels", (64,))) - 1)

    def image_shape(self, unet_architecture: dict[str, Any]) -> tuple[int, int]:
        """(channels, resolution) of the images whose latents a UNet of `unet_architecture` takes;
        a CheckpointError if the UNet does not take this VAE's latents."""
        channels, size = sample_shape(unet_architecture)
        latent_channels = int(self.settings.get("latent_channels", 4))
        if channels != latent_channels:
            raise CheckpointError(
                f"the UNet takes {channels} channels but the VAE ({self.folder}) makes latents of "
                f"{latent_channels}; give --vae DIR with the VAE the model was trained with"
            )
        image_channels = int(self.settings.get("in_channels", 3))
        if image_channels not in _IMAGE_CHANNELS:
            raise CheckpointError(
                f"{self.folder}: a VAE of {image_channels}-channel images; retrac handles grey or RGB"
            )
        return image_channels, size * self.downsampling

    @functools.cached_property
    def vae(self) -> AutoencoderKL:
        """The VAE, in eval mode, float32, every parameter frozen."""
        try:
            vae = AutoencoderKL.from_pretrained(
                self.folder, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False
            )
        except Exception as error:  # diffusers raises many kinds; the user needs the path and the cause
            raise CheckpointError(f"{self.folder}: cannot load the VAE: {error}") from error
        return vae.eval().float().requires_grad_(False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents `(N, c, h, w)` float32 of images `(N, C, H, W)` in [-1, 1] (module docstring)."""
        with torch.no_grad():
            means = [
                self.vae.encode(images[start : start + ENCODE_CHUNK].float()).latent_dist.mean
                for start in range(0, images.shape[0], ENCODE_CHUNK)
            ]
        return ((torch.cat(means) - self.shift_factor) * self.scaling_factor).contiguous()


def find_vae(checkpoint: str | Path) -> Path | None:
    """The `vae/` folder of the pipeline a checkpoint belongs to, or None for a pixel-space model.

    The pipeline is the nearest of the checkpoint folder, its parent and grandparent (a pipeline
    folder, its `unet/`, a training script's `checkpoint-N/unet`) that holds `model_index.json` or
    `scheduler/`, where diffusers saves `vae/` beside `unet/`; no other folder is searched. A pipeline
    whose autoencoder is a VQ model (`vqvae/`, diffusers' `LDMPipeline`) is refused: its UNet may take
    3-channel latents, which images of the right size would pass for.
    """
    candidate = pipeline_folder(checkpoint)
    if candidate is None:
        return None
    if (candidate / "vqvae").is_dir():
        raise CheckpointError(
            f"{candidate}: a VQ-VAE (vqvae/) latent pipeline is not handled; retrac encodes with an "
            "AutoencoderKL in vae/"
        )
    return candidate / VAE_FOLDER if (candidate / VAE_FOLDER).is_dir() else None


def latent_space_of(checkpoint: str | Path, vae: str | Path | None = None) -> LatentSpace | None:
    """The VAE of a checkpoint: the one given, else its pipeline's (`find_vae`); None for pixel models."""
    folder = vae if vae is not None else find_vae(checkpoint)
    return LatentSpace.load(folder) if folder is not None else None


def check_pixel_shape(unet_architecture: dict[str, Any]) -> None:
    """A CheckpointError if a UNet without a VAE takes inputs that are no image (a latent model whose
    VAE was not found)."""
    channels, _ = sample_shape(unet_architecture)
    if channels not in _IMAGE_CHANNELS:
        raise CheckpointError(
            f"the UNet takes {channels} channels, which no grey or RGB image has: a latent model? put its "
            "vae/ beside unet/ (as diffusers saves a pipeline) or give --vae DIR"
        )
