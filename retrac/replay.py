"""A training run as attribution sees it: checkpoints, their TracIn weights, and the replay record.

`Recorder` writes the same run folder from the user's own training loop (a plain diffusers or
accelerate script): it hands out each step's noise by the noise rule and records (timestep, seed).

TracIn sums over the training steps that used a sample. At checkpoint c (saved after epoch e_c) the
replayed step of sample z is the one of epoch e_c: `g(theta_c; z, t_{e_c}(z), eps_{e_c}(z))`, and the
checkpoint's weight covers the epochs since the previous checkpoint,
`w_c = lr_c * B * (e_c - e_{c-1}) / N` (method.md section 1).

A class-conditional run also records each sample's class label and the label mapping (manifest
`labels` and `classes`), so that replay computes each step under the label it was trained with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from api_schemas import CheckpointSpec, LossKind, TrainSpec
from retrac.conditions import ClassLabels
from retrac.exceptions import ReplayError
from retrac.noise import draw_seeds, noise_from_seeds

RUN_FORMAT = "retrac-run/1"
MANIFEST_NAME = "manifest.json"
RECORD_NAME = "replay.safetensors"
RECORDER_STATE_NAME = "recorder.safetensors"


def default_weights(
    epochs: Sequence[int], lrs: Sequence[float], batch_size: int, num_samples: int
) -> list[float]:
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
    labels: tuple[int, ...] | None = None  # (N,) each sample's class label, for a class-conditional run
    classes: ClassLabels | None = None

    @classmethod
    def load(cls, folder: str | Path) -> TrainingRun:
        folder = Path(folder)
        manifest_file = folder / MANIFEST_NAME
        if not manifest_file.is_file():
            raise ReplayError(f"{folder}: not a training run (no {MANIFEST_NAME})")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format") != RUN_FORMAT:
            raise ReplayError(
                f"{folder}: unknown run format {manifest.get('format')!r}, expected {RUN_FORMAT}"
            )
        record = load_file(folder / RECORD_NAME)
        labels, classes = manifest.get("labels"), manifest.get("classes")
        return cls(
            folder=folder,
            spec=TrainSpec.model_validate(manifest["spec"]),
            sample_ids=tuple(manifest["sample_ids"]),
            dataset_fingerprint=manifest["dataset_fingerprint"],
            checkpoint_entries=tuple(manifest["checkpoints"]),
            timesteps=record["timesteps"],
            seeds=record["seeds"],
            losses=record["losses"],
            labels=tuple(labels) if labels is not None else None,
            classes=ClassLabels(classes) if classes is not None else None,
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
            [e["epoch"] for e in entries],
            [e["lr"] for e in entries],
            self.spec.batch_size,
            len(self.sample_ids),
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


def write_run(
    folder: Path,
    spec: TrainSpec,
    sample_ids: Sequence[str],
    dataset_fingerprint: str,
    checkpoints: Sequence[dict[str, Any]],
    record: dict[str, torch.Tensor],
    *,
    labels: Sequence[int] | None = None,
    classes: ClassLabels | None = None,
) -> None:
    """Write a run's replay record (`timesteps`, `seeds`, `losses`, each `(E, N)`) and its manifest,
    with each sample's class label and the mapping when the run is class-conditional."""
    save_file({k: v.contiguous() for k, v in record.items()}, folder / RECORD_NAME)
    manifest = {
        "format": RUN_FORMAT,
        "spec": spec.model_dump(mode="json"),
        "num_samples": len(sample_ids),
        "sample_ids": list(sample_ids),
        "dataset_fingerprint": dataset_fingerprint,
        "checkpoints": list(checkpoints),
    }
    if labels is not None and classes is not None:
        manifest |= {"labels": [int(v) for v in labels], "classes": classes.to_json()}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


class Recorder:
    """Records the replay of a training loop that is not `retrac train`.

    Per step the loop calls `noise(ids, timesteps, shape)` (the noise it must train on, drawn by the
    noise rule from seeds the recorder draws and records) and `losses(ids, values)`; per epoch
    `end_epoch()`; after saving a checkpoint, `checkpoint(path)`. Every sample is trained exactly
    once per epoch (refused otherwise: the record could not say which step to replay). Each
    checkpoint rewrites the run folder, so a run is always loadable, and `Recorder.resume` continues
    from the last checkpoint with the same seeds an unbroken run would have drawn.

    A class-conditional loop gives each sample's class `labels` (in `sample_ids` order) and the
    mapping `classes` (the dataset's); they are recorded for replay.
    """

    def __init__(
        self,
        folder: str | Path,
        sample_ids: Sequence[str],
        dataset_fingerprint: str,
        spec: TrainSpec,
        *,
        labels: Sequence[int] | None = None,
        classes: ClassLabels | None = None,
    ) -> None:
        if (labels is None) != (classes is None) or (labels is not None and len(labels) != len(sample_ids)):
            raise ReplayError(
                "give one class label per sample together with the label mapping (classes), or neither"
            )
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.labels, self.classes = labels, classes
        self.sample_ids = tuple(sample_ids)
        self.dataset_fingerprint = dataset_fingerprint
        self._position = {s: i for i, s in enumerate(self.sample_ids)}
        self._generator = torch.Generator("cpu").manual_seed(spec.seed)
        self._record = {
            "timesteps": torch.full((0, len(sample_ids)), -1, dtype=torch.int64),
            "seeds": torch.full((0, len(sample_ids)), -1, dtype=torch.int64),
            "losses": torch.full((0, len(sample_ids)), float("nan"), dtype=torch.float32),
        }
        self._checkpoints: list[dict[str, Any]] = []
        self._open_epoch()

    @property
    def epoch(self) -> int:
        """Epochs completed so far."""
        return self._record["timesteps"].shape[0] - 1

    def noise(self, sample_ids: Sequence[str], timesteps: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """The noise `(B, *shape)` to train samples `sample_ids` on at `timesteps` `(B,)` this step."""
        rows = self._rows(sample_ids)
        if (self._record["seeds"][-1, rows] >= 0).any():
            raise ReplayError(
                "a sample was trained twice in one epoch; call end_epoch() after each pass over the data"
            )
        seeds = draw_seeds(self._generator, len(rows))
        self._record["timesteps"][-1, rows] = timesteps.detach().cpu().to(torch.int64)
        self._record["seeds"][-1, rows] = seeds
        return noise_from_seeds(seeds, shape)

    def losses(self, sample_ids: Sequence[str], values: torch.Tensor) -> None:
        """The per-sample losses `(B,)` the step trained on (what a replay check compares with)."""
        self._record["losses"][-1, self._rows(sample_ids)] = values.detach().cpu().float()

    def end_epoch(self) -> None:
        """Close the epoch; every sample must have been trained in it."""
        missed = int((self._record["seeds"][-1] < 0).sum())
        if missed:
            raise ReplayError(
                f"{missed} samples were not trained this epoch; every sample must be trained every epoch"
            )
        self._open_epoch()

    def checkpoint(self, path: str | Path) -> None:
        """Record a checkpoint just saved at `path` (inside the run folder) after the last closed epoch."""
        relative = Path(path).resolve().relative_to(self.folder.resolve())
        self._checkpoints.append({"epoch": self.epoch, "path": str(relative), "lr": self.spec.lr})
        done = {k: v[: self.epoch] for k, v in self._record.items()}
        write_run(
            self.folder, self.spec, self.sample_ids, self.dataset_fingerprint, self._checkpoints, done,
            labels=self.labels, classes=self.classes,
        )
        save_file({"generator": self._generator.get_state()}, self.folder / RECORDER_STATE_NAME)

    @classmethod
    def resume(cls, folder: str | Path) -> Recorder:
        """The recorder of the run in `folder`, just after its last checkpoint."""
        run = TrainingRun.load(folder)
        recorder = cls(
            folder, run.sample_ids, run.dataset_fingerprint, run.spec, labels=run.labels, classes=run.classes
        )
        last = run.checkpoint_entries[-1]["epoch"] if run.checkpoint_entries else 0
        recorder._record = {
            "timesteps": run.timesteps[:last].clone(),
            "seeds": run.seeds[:last].clone(),
            "losses": run.losses[:last].clone(),
        }
        recorder._checkpoints = list(run.checkpoint_entries)
        recorder._generator.set_state(load_file(Path(folder) / RECORDER_STATE_NAME)["generator"])
        recorder._open_epoch()
        return recorder

    def _open_epoch(self) -> None:
        n = len(self.sample_ids)
        fresh = {
            "timesteps": torch.full((1, n), -1),
            "seeds": torch.full((1, n), -1),
            "losses": torch.full((1, n), float("nan")),
        }
        self._record = {k: torch.cat([v, fresh[k].to(v.dtype)]) for k, v in self._record.items()}

    def _rows(self, sample_ids: Sequence[str]) -> torch.Tensor:
        unknown = [s for s in sample_ids if s not in self._position]
        if unknown:
            raise ReplayError(f"sample(s) {', '.join(map(str, unknown[:5]))} are not in the recorded dataset")
        return torch.tensor([self._position[s] for s in sample_ids], dtype=torch.int64)
