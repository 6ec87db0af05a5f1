"""A training run as attribution sees it: checkpoints, their TracIn weights, and the replay record.

TracIn sums over the training steps that used a sample. At checkpoint c (saved after epoch e_c) the
replayed step of sample z is the one of epoch e_c: `g(theta_c; z, t_{e_c}(z), eps_{e_c}(z))`, and the
checkpoint's weight covers the epochs since the previous checkpoint,
`w_c = lr_c * B * (e_c - e_{c-1}) / N` (method.md section 1).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from api_schemas import CheckpointSpec, LossKind, TrainSpec
from retrac.exceptions import ReplayError

RUN_FORMAT = "retrac-run/1"
MANIFEST_NAME = "manifest.json"
RECORD_NAME = "replay.safetensors"


def default_weights(epochs: Sequence[int], lrs: Sequence[float], batch_size: int, num_samples: int) -> list[float]:
    """`w_c = lr_c * B * (e_c - e_{c-1}) / N` with `e_0 = 0`, as the paper's code weighs checkpoints."""
    previous = [0, *epochs[:-1]]
    return [lr * batch_size * (e - p) / num_samples for e, p, lr in zip(epochs, previous, lrs, strict=True)]


@dataclass(frozen=True)
class TrainingRun:
    """A loaded run folder of `retrac train` (see `retrac.training`)."""

    folder: Path
    spec: TrainSpec
    sample_ids: tuple[str, ...]
    dataset_fingerprint: str
    checkpoint_entries: tuple[dict[str, Any], ...]
    timesteps: torch.Tensor  # (E, N) int64
    seeds: torch.Tensor  # (E, N) int64
    losses: torch.Tensor  # (E, N) float32

    @classmethod
    def load(cls, folder: str | Path) -> TrainingRun:
        folder = Path(folder)
        manifest_file = folder / MANIFEST_NAME
        if not manifest_file.is_file():
            raise ReplayError(f"{folder}: not a training run (no {MANIFEST_NAME})")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format") != RUN_FORMAT:
            raise ReplayError(f"{folder}: unknown run format {manifest.get('format')!r}, expected {RUN_FORMAT}")
        record = load_file(folder / RECORD_NAME)
        return cls(
            folder=folder,
            spec=TrainSpec.model_validate(manifest["spec"]),
            sample_ids=tuple(manifest["sample_ids"]),
            dataset_fingerprint=manifest["dataset_fingerprint"],
            checkpoint_entries=tuple(manifest["checkpoints"]),
            timesteps=record["timesteps"],
            seeds=record["seeds"],
            losses=record["losses"],
        )

    @property
    def loss(self) -> LossKind:
        return self.spec.loss

    @property
    def scheduler_folder(self) -> Path:
        return self.folder / "scheduler"

    def checkpoints(self) -> list[CheckpointSpec]:
        """Every saved checkpoint with its path, epoch and default weight."""
        entries = self.checkpoint_entries
        weights = default_weights(
            [e["epoch"] for e in entries], [e["lr"] for e in entries], self.spec.batch_size, len(self.sample_ids)
        )
        return [
            CheckpointSpec(path=str(self.folder / e["path"]), epoch=e["epoch"], weight=w)
            for e, w in zip(entries, weights, strict=True)
        ]

    def replayed(self, sample_ids: Sequence[str], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, seeds) `(n,)` of the step of epoch `epoch` (1-based) that trained each sample.

        A sample the record does not cover is an error: never fall back to another sample's step.
        """
        if not 1 <= epoch <= self.timesteps.shape[0]:
            raise ReplayError(f"the record covers epochs 1..{self.timesteps.shape[0]}, not epoch {epoch}")
        position = {sample_id: i for i, sample_id in enumerate(self.sample_ids)}
        missing = [s for s in sample_ids if s not in position]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ReplayError(f"the replay record has no training step for sample(s) {shown}")
        rows = torch.tensor([position[s] for s in sample_ids], dtype=torch.int64)
        return self.timesteps[epoch - 1, rows], self.seeds[epoch - 1, rows]
