"""Generated queries over HTTP: images sampled from an index's model under a label (with classifier-free
guidance), each with the condition it was generated with, so that it is attributed under that label."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from api_schemas.attribution import MAX_JSON_INT
from api_schemas.common import Public
from api_schemas.specs import check_label

MAX_GENERATED = 8
"""Most images one request generates: each costs `steps` forwards of the model, under the compute lock."""

MAX_STEPS = 1000
"""Most denoising steps of one request (a full DDPM schedule of the usual T = 1000)."""

MAX_GUIDANCE_SCALE = 100.0
"""Largest guidance scale accepted; useful ones are a few units."""


class GenerateRequest(Public):
    """What to generate from the index's last checkpoint."""

    count: int = Field(1, ge=1, le=MAX_GENERATED, description="images to generate")
    label: int | str | None = Field(
        None,
        description="the class to generate, for a class-conditional index (its class name, or the class's "
        "integer): required there, refused by an unconditional index",
    )
    guidance_scale: float | None = Field(
        None,
        ge=0,
        le=MAX_GUIDANCE_SCALE,
        description="classifier-free guidance s: eps_uncond + s (eps_cond - eps_uncond); needs a model with "
        "a null class (a DiT), refused for a UNet2DModel; default: no guidance",
    )
    sampler: Literal["ddpm", "ddim"] = Field("ddim", description="diffusers sampler")
    steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="denoising steps; default: 50 (ddim), the schedule's T (ddpm)"
    )
    seed: int = Field(
        0, ge=0, le=MAX_JSON_INT, description="seed of the sampling noise (< 2^53: exact in JSON)"
    )

    @field_validator("label")
    @classmethod
    def _short_label(cls, value: int | str | None) -> int | str | None:
        return check_label(value)


class GeneratedImagePublic(Public):
    """One generated image (a PNG of the index's resolution) and what it was generated with."""

    png_base64: str = Field(description="the image as a PNG file, in standard base64: attribute it as sent")
    image: int = Field(ge=0, description="its position among the request's images (one noise draw each)")
    label: int | str | None = Field(
        description="the label it was generated with, as given: attribute it under it"
    )
    guidance_scale: float | None
    sampler: Literal["ddpm", "ddim"]
    steps: int = Field(description="denoising steps (the sampler's default where none was given)")
    seed: int
    checkpoint: int = Field(ge=0, description="position of the checkpoint that generated it (the last one)")


class GenerationPublic(Public):
    """The generated images of one request, in order."""

    index: str
    data: list[GeneratedImagePublic]
    count: int
