"""Resolving an `IndexSpec` into what indexing needs, and computing any block of an index's rows.

`IndexPlan.resolve` loads the dataset and the run, checks that checkpoints, loss and replay record
fit together (each mismatch a named error), and fixes every slot's (timestep, noise seed). For a
latent model (a VAE beside its UNet, `retrac.latents`) the plan's `inputs` are the images' latents,
encoded once; gradient code sees only `inputs`, whichever they are. A class-conditional UNet's
index takes each sample's class label from the dataset (`classes`: the label mapping, recorded in
the store); a dataset without labels, or with labels the model has no embedding for, is refused here.
A text-conditional `UNet2DConditionModel`'s index takes each sample's caption from the dataset and
encodes it once with the pipeline's frozen text encoder (`text`, `retrac.text`); a pipeline without
one, a text width the UNet does not take, or a dataset without captions is refused here.
With a `base`, each checkpoint is a LoRA adapter on it (`retrac.adapters`), and `parameters` patterns
narrow the parameters gradients are over (`retrac.parameters`); both are checked here on models built
on the meta device, and `parameter_count` says how many parameters are left.
`IndexPlan.compute_rows` then computes the rows of one checkpoint for any row range: the one
idempotent function that the in-memory path, the store's tasks and the Celery workers all call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from api_schemas import (
    CheckpointSpec,
    DatasetSpec,
    IndexSpec,
    LossKind,
    LossWeighting,
    PredictionType,
    QuerySpec,
)
from retrac.adapters import adapted_meta_model, apply_adapter, checkpoint_weights, read_adapter
from retrac.conditions import ClassLabels, Conditions, query_conditions
from retrac.datasets import ImageDataset, load_dataset, old_sample_ids
from retrac.exceptions import CheckpointError, SpecError
from retrac.gradients import GradientComputer, NonFiniteGradient, num_parameters, whole_groups
from retrac.kernels import check_kernel_width
from retrac.latents import LatentSpace, check_pixel_shape, find_vae
from retrac.losses import check_weighting
from retrac.models import (
    DiffusionModel,
    check_architecture,
    check_compatible,
    class_conditioning,
    find_scheduler,
    load_scheduler,
    load_unet,
    pipeline_folder,
    read_architecture,
    require_weights,
    sample_shape,
    text_conditioning,
)
from retrac.noise import draw_seeds, noise_from_seeds, query_noise
from retrac.parameters import select_parameters
from retrac.paths import confine_folder, resolve_inside
from retrac.projections import derive_seed, make_projector
from retrac.query_side import query_timesteps
from retrac.replay import TrainingRun, default_weights
from retrac.scoring import RowChunk
from retrac.text import TEXT_ENCODER_FOLDER, TOKENIZER_FOLDER, TextEncoder


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint of an index: its folder, the epoch it was saved after (if known) and its weight."""

    path: Path
    epoch: int | None
    weight: float


@dataclass(frozen=True)
class Rows(RowChunk):
    """Computed rows of one checkpoint: `projected` `(n, S, k)` float32, `norms` `(n, S)` float32,
    and the slots they were computed at, `timesteps` and `seeds` `(n, S)` int64."""

    timesteps: torch.Tensor
    seeds: torch.Tensor


@dataclass(frozen=True)
class IndexPlan:
    spec: IndexSpec
    dataset: ImageDataset
    checkpoints: tuple[ResolvedCheckpoint, ...]
    loss: LossKind
    run: TrainingRun | None
    architecture: dict[str, Any]
    scheduler_folder: Path
    num_timesteps: int
    prediction_type: PredictionType
    loss_weighting: LossWeighting
    latent_space: LatentSpace | None = None
    latents: torch.Tensor | None = None
    """The dataset's latents `(N, c, h, w)` when known (a store keeps them); else encoded on first use."""
    classes: ClassLabels | None = None
    """The label mapping of a class-conditional model's index; None for an unconditional model."""
    text: TextEncoder | None = None
    """The frozen text encoder of a text-conditional model's index; None for any other model."""
    base: Path | None = None
    """The base model the checkpoints' LoRA adapters apply to; None when the checkpoints are full models."""
    adapters: tuple[dict[str, Any], ...] | None = None
    """Each checkpoint's adapter settings (`retrac.adapters.settings`); None without a base."""
    parameter_count: int = 0
    """How many parameters gradients are taken over (the adapter's, or those `spec.parameters` selects)."""

    @classmethod
    def resolve(
        cls, spec: IndexSpec, root: Path | None = None, *, data_root: Path | None = None
    ) -> IndexPlan:
        """Check and resolve `spec`; paths in it stay inside `root` when one is given, and the
        dataset's files inside `data_root` (default `root`).

        Everything that can be checked without the images (loss, checkpoints, shape, scheduler) is
        checked before the dataset is loaded, so a refused spec never costs the dataset's memory."""
        run = TrainingRun.load(resolve_inside(root, spec.run)) if spec.run else None
        loss = _resolve_loss(spec, run)
        given = _given_checkpoints(spec, run)
        paths = [resolve_inside(root, c.path) for c in given]
        base = resolve_inside(root, spec.base) if spec.base else None
        model = base if base is not None else paths[0]  # the denoiser's folder, its pipeline's parts beside
        for path in dict.fromkeys([*paths, model]):  # the denoiser's own folder; the pipeline's when found
            confine_folder(root, checkpoint_weights(path).parent, "checkpoint")
        architecture = read_architecture(model)
        for path in [model] if base is not None else paths:
            require_weights(path)
            check_architecture(path, read_architecture(path), architecture)
        count, adapters = _parameter_layout(spec, model, paths if base is not None else [])
        vae = resolve_inside(root, spec.vae) if spec.vae else find_vae(model)
        latent_space = LatentSpace.load(confine_folder(root, vae, "VAE")) if vae is not None else None
        _check_shape(spec.dataset, model_image_shape(architecture, latent_space))
        num_classes = class_conditioning(architecture)
        text = _text_encoder(model, architecture, root)
        if text is not None and spec.slots.replay:
            raise SpecError(
                "replay of a text-conditional model is not handled (a replay record holds no captions); "
                "index it without replay (--no-replay, with grid or random slots)"
            )
        if spec.scheduler:
            folder = resolve_inside(root, spec.scheduler)
        else:
            folder = run.scheduler_folder if run else find_scheduler(model)
        scheduler = load_scheduler(confine_folder(root, folder, "scheduler"))
        check_compatible(architecture, scheduler)
        weighting = _resolve_weighting(spec, run, scheduler.config.prediction_type)
        check_weighting(scheduler, weighting)
        dataset = load_dataset(spec.dataset, data_root if data_root is not None else root)
        classes = _check_labels(dataset, num_classes) if num_classes is not None else None
        if text is not None:
            _check_captions(dataset)
        checkpoints = _resolve_checkpoints(spec, run, given, paths, len(dataset))
        if spec.slots.replay:
            _check_replay(run, dataset, checkpoints, classes)
        plan = cls(
            spec, dataset, tuple(checkpoints), loss, run, architecture, folder,
            int(scheduler.config.num_train_timesteps), scheduler.config.prediction_type, weighting,
            latent_space=latent_space, classes=classes, text=text, base=base, adapters=adapters,
            parameter_count=count,
        )
        if spec.kernel is not None:
            check_kernel_width(plan.row_width())
        return plan

    def row_width(self) -> int:
        """k, the width of the projected rows: the projector's dim, or the parameter count (identity)."""
        if self.spec.projector.kind != "identity":
            return self.spec.projector.dim
        return self.parameter_count

    @property
    def num_rows(self) -> int:
        return len(self.dataset)

    @functools.cached_property
    def inputs(self) -> torch.Tensor:
        """What the denoiser was trained on, `(N, C, H, W)`: the dataset's images, or their latents."""
        if self.latent_space is None:
            return self.dataset.images
        return self.latents if self.latents is not None else self.latent_space.encode(self.dataset.images)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Query images `(Q, C, H, W)` in [-1, 1] as the denoiser takes them: as they are, or their latents
        (encoded exactly as the training images were)."""
        return images if self.latent_space is None else self.latent_space.encode(images)

    def with_latents(self, latents: torch.Tensor) -> IndexPlan:
        """This plan with its latents known (read back from a store), so that they are not encoded again."""
        channels, size = sample_shape(self.architecture)
        expected = (self.num_rows, channels, size, size)
        if self.latent_space is None or tuple(latents.shape) != expected:
            raise SpecError(
                f"latents of shape {tuple(latents.shape)} do not fit this plan (expected {expected})"
            )
        return replace(self, latents=latents)

    @property
    def weights(self) -> list[float]:
        return [c.weight for c in self.checkpoints]

    def load_model(self, checkpoint: int, device: torch.device | str = "cpu") -> DiffusionModel:
        """The model of checkpoint `checkpoint` (an index into `checkpoints`), architecture checked: a full
        model, or the base with the checkpoint's adapter; trainable only where gradients are taken."""
        path = self.checkpoints[checkpoint].path
        unet = load_unet(self.base or path, expect=self.architecture)
        if self.base is not None:
            apply_adapter(unet, read_adapter(path))
        select_parameters(unet, self.spec.parameters)
        return DiffusionModel.from_parts(unet, load_scheduler(self.scheduler_folder)).to(device)

    def gradient_computer(
        self, checkpoint: int, model: DiffusionModel, budget: int | None = None
    ) -> GradientComputer:
        """The computer that projects with this index's operator for checkpoint `checkpoint`, in batches
        of at most the spec's `batch_size` within `budget` bytes (`retrac.budget`; None: no budget)."""
        projector = make_projector(self.spec.projector, num_parameters(model), checkpoint)
        return GradientComputer(
            model, self.loss, projector, chunk=self.spec.batch_size, weighting=self.loss_weighting,
            output=self.spec.output_function, budget=budget,
        )

    @functools.cached_property
    def text_states(self) -> torch.Tensor:
        """Every sample's caption encoded, `(N, L, D)`: once per plan (a text-conditional model's only)."""
        if self.text is None or self.dataset.captions is None:
            raise SpecError("this index's model is not text-conditional: it has no caption states")
        return self.text.encode(self.dataset.captions)

    def conditions(self, rows: slice) -> Conditions:
        """What the model takes beside each image of rows `rows`: its class label, its caption's text
        encoder states, or nothing (unconditional)."""
        if self.text is not None:
            return Conditions.of_text(self.text_states[rows])
        if self.classes is None or self.dataset.labels is None:
            return Conditions()
        return Conditions.of_labels(self.dataset.labels[rows])

    def query_conditions(self, query: QuerySpec, count: int) -> Conditions:
        """The conditions of `count` query images asked with `query`'s label or prompt
        (`retrac.conditions.query_conditions`: each refused by a model that does not take it)."""
        text = self.text.encode if self.text is not None else None
        return query_conditions(self.classes, query.label, count, text=text, prompt=query.prompt)

    def slots(self, checkpoint: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, seeds) `(n, S)` int64 of the rows `rows` at checkpoint `checkpoint`.

        Slot order: the replayed step (if any), then grid slots, then random slots. Grid and random
        slots derive from (slot seed, sample id) alone, so they do not depend on sharding. A
        shared-noise grid slot records the slot seed itself: its noise is that seed's query noise
        at the slot's grid position (`slot_noise`).
        """
        ids = self.dataset.ids[rows]
        slots = self.spec.slots
        columns_t, columns_s = [], []
        if self.run is not None and slots.replay:
            t, s = self.run.replayed(ids, int(self.checkpoints[checkpoint].epoch or 0))
            columns_t.append(t[:, None])
            columns_s.append(s[:, None])
        if slots.grid or slots.random:
            grid = (
                query_timesteps(slots.grid, self.num_timesteps)
                if slots.grid
                else torch.empty(0, dtype=torch.int64)
            )
            per_sample = [_sample_slots(slots.seed, i, grid, slots.random, self.num_timesteps) for i in ids]
            columns_t.append(torch.stack([t for t, _ in per_sample]))
            columns_s.append(torch.stack([s for _, s in per_sample]))
            if slots.noise == "shared":
                columns_s[-1][:, : slots.grid] = slots.seed
        return torch.cat(columns_t, dim=1), torch.cat(columns_s, dim=1)

    def slot_noise(self, seeds: torch.Tensor) -> list[tuple[slice, torch.Tensor]]:
        """The noise of slots with seeds `seeds` `(n, S)`, by groups of adjacent slots:
        (slots, noise `(n, s, G, C, H, W)`), G = 1 for a slot with a seed of its own and G = M
        (`slots.draws`) for shared-noise grid slots, whose noise is the query's (`query_noise`)."""
        shape, slots = self.inputs.shape[1:], self.spec.slots
        count = seeds.shape[1]
        if slots.noise == "independent":
            return [(slice(0, count), noise_from_seeds(seeds, shape).unsqueeze(2))]
        grid = slice(int(slots.replay), int(slots.replay) + slots.grid)
        shared = query_noise(slots.seed, slots.grid, slots.draws, shape).expand(
            seeds.shape[0], -1, -1, *shape
        )
        groups = [(slice(0, grid.start), None), (grid, shared), (slice(grid.stop, count), None)]
        return [
            (part, noise if noise is not None else noise_from_seeds(seeds[:, part], shape).unsqueeze(2))
            for part, noise in groups if part.stop > part.start
        ]

    def compute_rows(
        self,
        checkpoint: int,
        rows: slice,
        computer: GradientComputer,
        on_rows: Callable[[int], object] | None = None,
    ) -> Rows:
        """Projected gradients and exact norms of rows `rows` at checkpoint `checkpoint`.

        `on_rows(n)` is called after each gradient batch with the n rows it completed (all slots done:
        slots of different noise kinds are computed group after group, so rows complete in the last).
        """
        timesteps, seeds = self.slots(checkpoint, rows)
        images, conditions = self.inputs[rows], self.conditions(rows)
        n = timesteps.shape[0]
        projected, norms = [], []
        groups = self.slot_noise(seeds)
        for number, (part, noise) in enumerate(groups, start=1):
            steps = timesteps[:, part]
            width = steps.shape[1]
            last = number == len(groups) and on_rows is not None
            on_chunk = whole_groups(on_rows, width) if last else None  # type: ignore[arg-type]
            try:
                batch = computer.compute(
                    images.repeat_interleave(width, dim=0), steps.reshape(-1), noise.flatten(0, 1), on_chunk,
                    conditions.repeat_interleave(width),
                )
            except NonFiniteGradient as error:
                row, slot = divmod(error.sample, width)
                index = range(self.num_rows)[rows][row]
                timestep = int(steps[row, slot])
                where = f"sample {self.dataset.ids[index]!r} (row {index}) at timestep {timestep}"
                raise error.at(error.sample, where) from None
            projected.append(batch.projected.reshape(n, width, -1).cpu())
            norms.append(batch.norms.reshape(n, width).cpu())
        return Rows(
            projected=torch.cat(projected, dim=1),
            norms=torch.cat(norms, dim=1),
            timesteps=timesteps,
            seeds=seeds,
        )


def _parameter_layout(
    spec: IndexSpec, model: Path, adapters: list[Path]
) -> tuple[int, tuple[dict[str, Any], ...] | None]:
    """(how many parameters gradients are over, each adapter's settings or None), from models built on
    the meta device: each adapter checked against the base, all of one layout (names and shapes), and
    `spec.parameters` checked to match (`select_parameters`)."""
    if not adapters:
        unet, _ = adapted_meta_model(model, None)
        return select_parameters(unet, spec.parameters), None
    layout, recorded, count = None, [], 0
    for path in adapters:
        unet, settings = adapted_meta_model(model, read_adapter(path))
        count = select_parameters(unet, spec.parameters)
        shapes = {name: tuple(p.shape) for name, p in unet.named_parameters() if p.requires_grad}
        if layout is not None and shapes != layout:
            raise CheckpointError(
                f"{path}: an adapter of another layout (rank or target modules) than {adapters[0]}; all "
                "adapters of an index must share one, or their gradients could not be compared"
            )
        layout = shapes
        recorded.append(settings or {})
    return count, tuple(recorded)


def model_image_shape(architecture: dict[str, Any], latent_space: LatentSpace | None) -> tuple[int, int]:
    """(channels, resolution) of the images a model takes: the UNet's own shape, or for a latent model
    the images its VAE encodes to the UNet's shape (`LatentSpace.image_shape`)."""
    if latent_space is not None:
        return latent_space.image_shape(architecture)
    check_pixel_shape(architecture)
    return sample_shape(architecture)


def _check_shape(dataset: DatasetSpec, shape: tuple[int, int]) -> None:
    """A SpecError naming both shapes if the dataset's images (every image is brought to the spec's
    channels and resolution) are not the `shape` (channels, resolution) the model takes."""
    channels, resolution = shape
    if (dataset.channels, dataset.resolution) != (channels, resolution):
        given = f"{dataset.channels}x{dataset.resolution}x{dataset.resolution}"
        raise SpecError(
            f"the dataset is {given} (channels x height x width) but the model takes "
            f"{channels}x{resolution}x{resolution}; give resolution {resolution} and channels {channels}"
        )


def _text_encoder(checkpoint: Path, architecture: dict[str, Any], root: Path | None) -> TextEncoder | None:
    """The text encoder of a text-conditional UNet's pipeline, checked against the width its cross-attention
    takes (its folders inside `root`, when one is given); None for a UNet2DModel."""
    width = text_conditioning(checkpoint, architecture)
    if width is None:
        return None
    pipeline = pipeline_folder(checkpoint)
    if pipeline is None:
        raise CheckpointError(
            f"{checkpoint}: a text-conditional UNet outside a pipeline folder; give the pipeline folder, "
            "with its text_encoder/, tokenizer/ and scheduler/ beside unet/"
        )
    for part in (TEXT_ENCODER_FOLDER, TOKENIZER_FOLDER):
        confine_folder(root, pipeline / part, part.replace("_", " "))
    text = TextEncoder.load(pipeline)
    if text.hidden_size != width:
        raise CheckpointError(
            f"{pipeline}: the text encoder's hidden size {text.hidden_size} is not the UNet's "
            f"cross_attention_dim {width}; give the pipeline with the text encoder the UNet was trained with"
        )
    return text


def _check_captions(dataset: ImageDataset) -> None:
    """A SpecError unless every sample of a text-conditional model's dataset has its caption."""
    if dataset.captions is None:
        raise SpecError(
            f"the model is text-conditional but the dataset {dataset.name!r} has no captions: put a "
            "metadata.jsonl beside the images ({\"file_name\": ..., \"text\": ...} per line) or give "
            "'captions' in the .npz"
        )


def _check_labels(dataset: ImageDataset, num_classes: int) -> ClassLabels:
    """The dataset's label mapping, after checking that a class-conditional UNet taking `num_classes`
    labels (0: any integer) has an embedding for every one; a SpecError saying what to do otherwise."""
    if dataset.labels is None or dataset.classes is None:
        raise SpecError(
            f"the model is class-conditional but the dataset {dataset.name!r} has no class labels: put each "
            "class's images in a subfolder (train/<class>/...), or give 'labels' in the .npz"
        )
    largest = max(dataset.classes.classes.values())
    if num_classes and largest >= num_classes:
        raise SpecError(
            f"the dataset's class labels go up to {largest} but the model has num_class_embeds {num_classes} "
            f"(labels 0..{num_classes - 1}); give the dataset the model was trained on, or relabel it"
        )
    return dataset.classes


def _sample_slots(
    seed: int, sample_id: str, grid: torch.Tensor, random: int, num_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator("cpu").manual_seed(derive_seed(seed, "slots", sample_id))
    random_t = torch.randint(0, num_timesteps, (random,), generator=generator)
    seeds = draw_seeds(generator, len(grid) + random)
    return torch.cat([grid, random_t]), seeds


def _resolve_loss(spec: IndexSpec, run: TrainingRun | None) -> LossKind:
    if run is not None and spec.loss is not None and spec.loss != run.loss:
        raise CheckpointError(
            f"loss {spec.loss!r} does not match the record: the run was trained with {run.loss!r}; "
            "attribution must use the training loss"
        )
    loss = spec.loss or (run.loss if run else None)
    if loss is None:
        raise SpecError("give the loss the model was trained with (mse or l1)")
    return loss


def _resolve_weighting(spec: IndexSpec, run: TrainingRun | None, prediction: PredictionType) -> LossWeighting:
    """The run's loss weighting (a different one given is an error), else the one given. A
    sample-prediction model without a run must declare it: diffusers' `train_unconditional.py` trains
    such models with the snr weighting, other scripts without, and a guess would be silently wrong."""
    given = spec.loss_weighting
    if run is not None:
        if given is not None and given != run.spec.loss_weighting:
            raise CheckpointError(
                f"loss weighting {given!r} does not match the record: the run was trained with "
                f"{run.spec.loss_weighting!r}; attribution must use the training loss"
            )
        return run.spec.loss_weighting
    if given is None and prediction == "sample":
        raise SpecError(
            "the model predicts the clean image (prediction_type sample), which diffusers' "
            "train_unconditional.py trains with an SNR-weighted MSE; declare the weighting it was trained "
            "with: --loss-weighting snr or none (loss_weighting in a spec)"
        )
    return given or "none"


def pin_checkpoints(spec: IndexSpec, root: Path | None = None) -> IndexSpec:
    """`spec` with the checkpoints its run has saved so far written in, when it names none.

    A store records the spec it was built from; pinned, that spec keeps meaning the same checkpoints
    when the run trains on and saves more, so a store stays fresh (and answers for the checkpoints it
    holds) instead of turning stale with every new checkpoint."""
    if spec.checkpoints or not spec.run:
        return spec
    run = TrainingRun.load(resolve_inside(root, spec.run))
    return spec.model_copy(update={"checkpoints": tuple(_given_checkpoints(spec, run))})


def _given_checkpoints(spec: IndexSpec, run: TrainingRun | None) -> list[CheckpointSpec]:
    """The spec's checkpoints, or else those its run saved."""
    given = list(spec.checkpoints) or (run.checkpoints() if run else [])
    if not given:
        raise SpecError("the index names no checkpoints and its run saved none")
    return given


def _resolve_checkpoints(
    spec: IndexSpec,
    run: TrainingRun | None,
    given: list[CheckpointSpec],
    paths: list[Path],
    num_samples: int,
) -> list[ResolvedCheckpoint]:
    """Each checkpoint's folder, epoch and weight: given, or `default_weights` with N the run's training
    set size (an index of a `--limit` subset weighs its checkpoints as the run trained them), or
    `num_samples` (the indexed samples) for a model trained elsewhere."""
    has_lr = run is not None or all(c.lr is not None for c in given)
    if all(c.weight is not None for c in given):
        weights = [float(c.weight) for c in given]  # type: ignore[arg-type]
    elif has_lr and all(c.epoch is not None for c in given):
        epochs = [int(c.epoch) for c in given]  # type: ignore[arg-type]
        if epochs != sorted(set(epochs)):
            raise SpecError(f"checkpoint epochs must increase, got {epochs}")
        batch_size = run.spec.batch_size if run is not None else spec.train_batch_size
        if batch_size is None:
            raise SpecError(
                "weights from epoch and lr need the training batch size; give --train-batch-size B"
            )
        lrs = [c.lr if c.lr is not None else run.spec.lr for c in given]  # type: ignore[union-attr]
        trained = len(run.sample_ids) if run is not None else num_samples  # the run's N, not the indexed
        defaults = default_weights(epochs, lrs, batch_size, trained)
        weights = [c.weight if c.weight is not None else w for c, w in zip(given, defaults, strict=True)]
    elif any(c.epoch is not None or c.lr is not None for c in given) and any(c.weight is None for c in given):
        raise SpecError("give every checkpoint a weight, or every checkpoint an epoch and a learning rate")
    else:
        weights = [1.0 if c.weight is None else float(c.weight) for c in given]  # no lr/B to weigh by
    return [ResolvedCheckpoint(p, c.epoch, w) for p, c, w in zip(paths, given, weights, strict=True)]


def _check_replay(
    run: TrainingRun | None,
    dataset: ImageDataset,
    checkpoints: list[ResolvedCheckpoint],
    classes: ClassLabels | None,
) -> None:
    if run is None:
        raise SpecError("replay slots need a training run with a replay record")
    for checkpoint in checkpoints:
        if checkpoint.epoch is None:
            raise SpecError(f"{checkpoint.path}: replay needs the epoch the checkpoint was saved after")
    missing = set(dataset.ids) - set(run.sample_ids)
    if missing and set(old_sample_ids(dataset.ids)) <= set(run.sample_ids):
        raise SpecError(
            "the run names its samples by the rule of earlier versions "
            f"({old_sample_ids(sorted(missing))[0]!r}); sample ids are now the files' relative paths "
            f"({sorted(missing)[0]!r}): train the run again to replay it, or index it without replay (grid "
            "or random slots)"
        )
    if missing:
        run.replayed(sorted(missing), 1)  # raises ReplayError naming them
    if dataset.ids == run.sample_ids and dataset.fingerprint != run.dataset_fingerprint:
        raise SpecError(
            "the dataset's images differ from those the run was trained on; replay would be wrong"
        )
    if classes is not None:
        _check_replayed_labels(run, dataset, classes)


def _check_replayed_labels(run: TrainingRun, dataset: ImageDataset, classes: ClassLabels) -> None:
    """A SpecError unless the run recorded each sample's class label, and the dataset gives the same."""
    if run.labels is None or run.classes is None:
        raise SpecError(
            f"{run.folder}: the run records no class labels, so its steps cannot be replayed under them; "
            "record them (Recorder(labels=..., classes=...)) or index it without replay (grid or random "
            "slots)"
        )
    trained = dict(zip(run.sample_ids, run.labels, strict=True))
    now = dict(zip(dataset.ids, dataset.labels or (), strict=True))
    differing = [i for i in dataset.ids if trained[i] != now[i]]
    if differing:
        first = differing[0]
        raise SpecError(
            f"the dataset's class labels differ from those the run was trained with ({len(differing)} "
            f"samples, e.g. {first}: {trained[first]} then, {now[first]} now); replay would be wrong"
        )
    if dict(run.classes.classes) != dict(classes.classes):
        raise SpecError(
            f"the dataset's label mapping {dict(classes.classes)} differs from the run's "
            f"{dict(run.classes.classes)}; replay would be wrong"
        )
