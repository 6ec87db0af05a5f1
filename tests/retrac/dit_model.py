"""A tiny class-conditional DiT saved as diffusers saves a `DiTPipeline`'s parts: `transformer/` (a
`DiTTransformer2DModel`, safetensors) beside `scheduler/` (a `DDPMScheduler`).

Random weights from a config (nothing can be downloaded): two transformer blocks of two 8-wide heads
over 2x2 patches of 8 px grey images, ten classes (the digits), out_channels = in_channels (the
prediction alone, no learned sigma). ~20k parameters, so exact (identity) gradients stay small.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, ProjectorSpec, SlotSpec

SIDE, CLASSES = 8, 10
DATA = DatasetSpec(source="builtin:digits", resolution=SIDE, limit=8)
DIT_CONFIG = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=2,
    sample_size=SIDE, patch_size=2, num_embeds_ada_norm=CLASSES, norm_num_groups=1,
)
TIMESTEPS = 100


def tiny_dit(seed: int = 0, **config: object) -> DiTTransformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiTTransformer2DModel(**{**DIT_CONFIG, **config})


def save_dit_pipeline(folder: Path, seed: int = 0, **config: object) -> Path:
    """`folder` with `transformer/` (weights from `seed`, `config` over `DIT_CONFIG`) and `scheduler/`."""
    tiny_dit(seed, **config).save_pretrained(folder / "transformer", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=TIMESTEPS).save_pretrained(folder / "scheduler")
    return folder


def dit_index_spec(folder: Path | str, **changes: object) -> IndexSpec:
    """Grid and random slots (a pipeline has no replay record), the exact (identity) projector."""
    fields = dict(
        dataset=DATA, checkpoints=(CheckpointSpec(path=str(folder), weight=0.5),), loss="mse",
        slots=SlotSpec(replay=False, grid=1, random=1, seed=3), projector=ProjectorSpec(kind="identity"),
        dtype="float32", shard_size=4,
    )
    return IndexSpec(**{**fields, **changes})
