"""Indexes as the HTTP API shows them: create one (which starts its indexing job), list, describe."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from api_schemas.common import IndexName, Public
from api_schemas.specs import Estimator, IndexSpec, Method


class IndexCreate(Public):
    """Create an index: its name and the spec of what to index. Paths in the spec are relative to
    the service's models root (run, checkpoints, scheduler, VAE) and data root (dataset source)."""

    name: IndexName
    spec: IndexSpec


class CheckpointProgressPublic(Public):
    """How many rows of one checkpoint are stored."""

    checkpoint: int = Field(description="position of the checkpoint in the index")
    epoch: int | None = Field(description="epoch after which the checkpoint was saved, if known")
    weight: float = Field(description="the checkpoint's TracIn weight w_c")
    done: int = Field(description="rows stored")
    total: int = Field(description="rows of the checkpoint")
    complete: bool


class ParametersPublic(Public):
    """The parameters an index's gradients are over: a full model's, those its patterns match, or its
    LoRA adapters' (the base frozen)."""

    count: int = Field(description="how many parameters the gradients are over")
    patterns: list[str] = Field(description="the spec's fnmatch patterns; empty: every trainable parameter")
    adapters: list[dict[str, Any]] | None = Field(
        None,
        description="each checkpoint's LoRA adapter config as recorded (format, r, lora_alpha and "
        "alpha_from, target_modules, lora_dropout, ...); null when the checkpoints are full models",
    )


class IndexPublic(Public):
    """An index: its spec, size and how far its indexing has come."""

    name: IndexName
    spec: IndexSpec
    num_samples: int
    num_checkpoints: int
    num_slots: int = Field(description="S, gradient slots stored per sample and checkpoint")
    dim: int = Field(description="k, the projected dimension of a stored gradient")
    resolution: int = Field(description="side of the square images the index's model takes")
    channels: int
    classes: dict[str, int] | None = Field(
        None,
        description="a class-conditional index's label mapping (class name -> the integer its model takes): "
        "every query must give one of these labels; null for an unconditional index, which takes none",
    )
    text_conditional: bool = Field(
        False,
        description="the index's model is text-conditional: every query must give a prompt (\"\" for the "
        "empty one); any other index refuses a prompt",
    )
    parameters: ParametersPublic | None = Field(
        None, description="the parameters its gradients are over; null for stores from before it was recorded"
    )
    methods: list[Method] = Field(
        description="the methods the index serves, the measured best first: a query naming none gets the "
        "first under the matched estimator, tracin and retrac under the paper's"
    )
    estimator: Estimator = Field(
        description="the estimator a query naming none (and no K, M or seed) runs: matched where the index "
        "has shared-noise grid slots, else paper"
    )
    size_bytes: int = Field(description="bytes the store takes on disk")
    complete: bool = Field(description="every row of every checkpoint is stored: the index answers queries")
    progress: list[CheckpointProgressPublic]
    job_id: str | None = Field(None, description="the indexing job started with the index, if any")
    notices: list[str] = Field(
        default_factory=list,
        description="in the creation answer: what loading the training images converted (resized, cropped, "
        "channels, alpha, pixel type), one sentence per kind",
    )


class BrokenIndexPublic(Public):
    """An index that cannot be opened (damaged, stale, half deleted), and why."""

    name: IndexName
    reason: str = Field(description="what is wrong and what to do about it")


class IndexesPublic(Public):
    data: list[IndexPublic]
    count: int
    broken: list[BrokenIndexPublic] = Field(
        default_factory=list, description="indexes that do not open, with the reason; not in `data`"
    )
