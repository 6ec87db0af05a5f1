"""Class-conditional UNet2DModels: exact scores against a brute force written from method.md with
plain diffusers (each sample under its class label), replay under the recorded labels, and every
refusal of a dataset or query that does not fit the model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from sklearn.datasets import load_digits

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, ProjectorSpec, QuerySpec, SlotSpec, TrainSpec
from retrac.attribution import Attributor
from retrac.conditions import ClassLabels, query_conditions
from retrac.datasets import load_dataset
from retrac.exceptions import CheckpointError, SpecError
from retrac.models import class_conditioning
from retrac.plan import IndexPlan
from retrac.replay import TrainingRun
from retrac.training import train
from storage import GradientStore, StaleStoreError
from tests.retrac.reference import mean_gradient, per_sample_losses, query_draws, seeded_noise
from tests.retrac.test_replay import REPLAY_TOLERANCE
from tests.retrac.test_scores_exact import engine_scores

N, K, M, SEED = 16, 4, 2, 13
LABELLED = DatasetSpec(source="builtin:digits", resolution=8, limit=N)
SCORE_TOLERANCE = 1e-4
"""Relative, as the unconditional brute-force test: float32 gradients of ~45k parameters summed in other
orders (retrac's layer rules vs autograd) differ by ~1e-6 relative; the dot products and means add less."""


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory: pytest.TempPathFactory) -> TrainingRun:
    """A class-conditional micro DDPM, 16 digits with their digit as label, one batch per epoch (so each
    epoch's steps start from the previous checkpoint), checkpoints after epochs 1, 2 and 3."""
    spec = TrainSpec(dataset=LABELLED, preset="micro", loss="mse", epochs=3, batch_size=N, lr=2e-3,
                     save_every=1, seed=2, class_conditional=True)
    return train(spec, load_dataset(LABELLED), tmp_path_factory.mktemp("labelled"))


def targets() -> torch.Tensor:
    """The digits' own labels, from scikit-learn (not from retrac's loader)."""
    return torch.as_tensor(load_digits().target[:N], dtype=torch.int64)


def brute_force_scores(
    run: TrainingRun, images: torch.Tensor, queries: torch.Tensor, label: int
) -> dict[str, torch.Tensor]:
    """(N, Q) scores of method.md sections 1-4 with every loss under its sample's class label, one
    autograd call per gradient, plain diffusers and torch."""
    scheduler = DDPMScheduler.from_pretrained(run.folder / "scheduler")
    grid = [
        math.floor(v)
        for v in torch.linspace(1, scheduler.config.num_train_timesteps - 1, K, dtype=torch.float64).tolist()
    ]
    draws = query_draws(SEED, K, M, tuple(images.shape[1:]))
    labels = targets()
    scores = {"tracin": torch.zeros(N, len(queries)), "retrac": torch.zeros(N, len(queries))}
    previous = 0
    for entry in run.checkpoint_entries:
        weight = entry["lr"] * run.spec.batch_size * (entry["epoch"] - previous) / N
        previous = entry["epoch"]
        unet = UNet2DModel.from_pretrained(run.folder / entry["path"]).eval()
        assert unet.config.num_class_embeds == 10  # saved as diffusers saves a class-conditional UNet
        train_side = torch.stack(
            [
                mean_gradient(
                    unet,
                    scheduler,
                    images[i],
                    int(run.timesteps[entry["epoch"] - 1, i]),
                    seeded_noise(int(run.seeds[entry["epoch"] - 1, i]), images.shape[1:])[None],
                    "mse",
                    int(labels[i]),
                )
                for i in range(N)
            ]
        )
        for q, query in enumerate(queries):
            hs = torch.stack(
                [mean_gradient(unet, scheduler, query, t, draws[k], "mse", label) for k, t in enumerate(grid)]
            )
            scores["tracin"][:, q] += weight * (train_side @ hs.mean(0))
            retrac_query = (hs / hs.norm(dim=1, keepdim=True)).mean(0)
            scores["retrac"][:, q] += weight * (
                (train_side / train_side.norm(dim=1, keepdim=True)) @ retrac_query
            )
    return scores


def exact_spec(run: TrainingRun) -> IndexSpec:
    return IndexSpec(dataset=LABELLED, run=str(run.folder), slots=SlotSpec(replay=True),
                     projector=ProjectorSpec(kind="identity"))


def test_exact_scores_equal_brute_force(labelled_run: TrainingRun) -> None:
    plan = IndexPlan.resolve(exact_spec(labelled_run))
    assert plan.classes == ClassLabels({str(d): d for d in range(10)})
    images = plan.dataset.images
    queries = torch.stack([images[3], torch.flip(images[7], dims=[-1])])
    attributor = Attributor(plan)
    results = attributor.attribute(queries, QuerySpec(timesteps=K, draws=M, seed=SEED, label="3"), top_k=N)
    expected = brute_force_scores(labelled_run, images, queries, label=3)
    for method in ("tracin", "retrac"):
        got = engine_scores(results, plan.dataset.ids, method)
        scale = float(expected[method].abs().max())
        torch.testing.assert_close(got, expected[method], rtol=SCORE_TOLERANCE, atol=SCORE_TOLERANCE * scale)
    # the label is used: under label 7 (given as its integer) the scores move by far more than the tolerance
    other = attributor.attribute(queries, QuerySpec(timesteps=K, draws=M, seed=SEED, label=7), top_k=N)
    moved = engine_scores(other, plan.dataset.ids, "tracin") - engine_scores(
        results, plan.dataset.ids, "tracin"
    )
    assert float(moved.abs().max()) > 100 * SCORE_TOLERANCE * float(expected["tracin"].abs().max())


def test_a_replayed_step_reproduces_its_training_loss_under_its_label(labelled_run: TrainingRun) -> None:
    assert labelled_run.labels == tuple(targets().tolist())
    images = load_dataset(LABELLED).images
    scheduler = DDPMScheduler.from_pretrained(labelled_run.scheduler_folder)
    for checkpoint in labelled_run.checkpoints()[:-1]:
        unet = UNet2DModel.from_pretrained(checkpoint.path).eval()
        epoch = checkpoint.epoch + 1
        timesteps = labelled_run.timesteps[epoch - 1]
        noise = torch.stack(
            [seeded_noise(s, images.shape[1:]) for s in labelled_run.seeds[epoch - 1].tolist()]
        )
        with torch.no_grad():
            replayed = per_sample_losses(unet, scheduler, images, timesteps, noise, "mse", targets())
            relabelled = per_sample_losses(
                unet, scheduler, images, timesteps, noise, "mse", (targets() + 1) % 10
            )
        torch.testing.assert_close(replayed, labelled_run.losses[epoch - 1], rtol=REPLAY_TOLERANCE, atol=1e-7)
        assert not torch.allclose(relabelled, labelled_run.losses[epoch - 1], rtol=1e-3)


def write_npz(path: Path, labels: np.ndarray | None, *, ids: bool = False) -> DatasetSpec:
    """The N digits as an .npz (the same pixels `builtin:digits` gives), with `labels` and the digits' ids."""
    digits = load_digits()
    arrays: dict[str, np.ndarray] = {"images": (digits.images[:N] / 16.0).astype(np.float32)}
    if labels is not None:
        arrays["labels"] = labels
    if ids:
        arrays["ids"] = np.array([f"digit-{i:04d}-{digits.target[i]}" for i in range(N)])
    np.savez(path, **arrays)
    return DatasetSpec(source=str(path), resolution=8)


def no_replay_spec(run: TrainingRun, dataset: DatasetSpec) -> IndexSpec:
    return IndexSpec(
        dataset=dataset,
        checkpoints=(CheckpointSpec(path=run.checkpoints()[-1].path),),
        loss="mse",
        scheduler=str(run.scheduler_folder),
        slots=SlotSpec(replay=False, grid=1),
        projector=ProjectorSpec(dim=64),
    )


def test_a_dataset_that_does_not_fit_the_model_is_refused(labelled_run: TrainingRun, tmp_path: Path) -> None:
    unlabelled = write_npz(tmp_path / "plain.npz", None)
    with pytest.raises(SpecError, match="class-conditional but the dataset 'plain.npz' has no class labels"):
        IndexPlan.resolve(no_replay_spec(labelled_run, unlabelled))
    too_many = write_npz(tmp_path / "many.npz", np.arange(N))
    with pytest.raises(SpecError, match="labels go up to 15 but the model has num_class_embeds 10"):
        IndexPlan.resolve(no_replay_spec(labelled_run, too_many))
    # replay under other labels than the run recorded: the same pixels and ids, one label changed
    changed = targets().numpy().copy()
    changed[5] = (changed[5] + 1) % 10
    relabelled = write_npz(tmp_path / "relabelled.npz", changed, ids=True)
    spec = exact_spec(labelled_run).model_copy(update={"dataset": relabelled})
    with pytest.raises(SpecError, match="class labels differ from those the run was trained with"):
        IndexPlan.resolve(spec)


def test_class_embeddings_that_take_vectors_are_refused() -> None:
    assert class_conditioning({"num_class_embeds": 10}) == 10
    assert class_conditioning({"class_embed_type": "timestep"}) == 0
    assert class_conditioning({}) is None
    with pytest.raises(CheckpointError, match="class_embed_type 'identity' takes embedding vectors"):
        class_conditioning({"class_embed_type": "identity"})


def test_a_changed_label_makes_the_store_stale(labelled_run: TrainingRun, tmp_path: Path) -> None:
    dataset = write_npz(tmp_path / "data.npz", targets().numpy())
    store = GradientStore.create(tmp_path / "index.zarr", no_replay_spec(labelled_run, dataset))
    assert store.classes == ClassLabels({str(d): d for d in range(10)})
    GradientStore.open(tmp_path / "index.zarr")  # fresh
    changed = targets().numpy().copy()
    changed[0] = 9 - changed[0]
    write_npz(tmp_path / "data.npz", changed)
    with pytest.raises(StaleStoreError, match="class labels .* changed since the store was built"):
        GradientStore.open(tmp_path / "index.zarr")


def test_a_query_label_is_a_class_name_or_its_integer() -> None:
    animals = ClassLabels({"ant": 0, "cat": 1, "dog": 2})
    assert query_conditions(animals, "dog", 2).tensors["class_labels"].tolist() == [2, 2]
    assert animals.resolve(1) == 1
    assert animals.resolve("1") == 1
    numerals = ClassLabels({"0": 0, "10": 1, "2": 2})  # folders 0, 10 and 2, sorted as names
    assert numerals.resolve("10") == 1
    assert numerals.resolve("2") == 2  # a name wins over an integer
    with pytest.raises(
        SpecError, match="label 'bird' is not a class of this index; give one of: ant \\(0\\)"
    ):
        animals.resolve("bird")
    with pytest.raises(SpecError, match="class-conditional: give the query's label"):
        query_conditions(animals, None, 1)
    with pytest.raises(SpecError, match="unconditional: it takes no label"):
        query_conditions(None, "cat", 1)
    assert not query_conditions(None, None, 1)


def test_a_class_conditional_run_needs_labels(tmp_path: Path) -> None:
    spec = TrainSpec(dataset=DatasetSpec(source="builtin:faces", resolution=8, limit=4), preset="micro",
                     epochs=1, class_conditional=True)
    with pytest.raises(SpecError, match="a class-conditional run needs class labels"):
        train(spec, load_dataset(spec.dataset), tmp_path / "run")


def test_norm_curves_of_a_class_conditional_run_take_each_sample_under_its_label(
    labelled_run: TrainingRun, tmp_path: Path
) -> None:
    """`retrac eval norms`' curves: each sample's gradient norm at each grid step under its own label,
    equal to one autograd call per (sample, step) with the query's noise rule (M = 1)."""
    from retrac.evaluation.norms import analyse_run

    shown, grid_size, seed = 2, 3, 5
    result = analyse_run(
        labelled_run.folder, tmp_path, curve_samples=shown, curve_timesteps=grid_size, seed=seed
    )
    scheduler = DDPMScheduler.from_pretrained(labelled_run.folder / "scheduler")
    last = labelled_run.checkpoint_entries[-1]
    unet = UNet2DModel.from_pretrained(labelled_run.folder / last["path"]).eval()
    images, labels = load_dataset(LABELLED).images[:shown], targets()[:shown]
    steps = torch.linspace(
        1, scheduler.config.num_train_timesteps - 1, grid_size, dtype=torch.float64
    ).tolist()
    draws = query_draws(seed, grid_size, 1, tuple(images.shape[1:]))  # the same draws for every image
    expected = [
        torch.stack(
            [
                mean_gradient(unet, scheduler, images[i], t, draws[k], "mse", int(labels[i])).norm()
                for i in range(shown)
            ]
        ).mean()
        for k, t in enumerate(math.floor(v) for v in steps)
    ]
    assert torch.allclose(torch.tensor(result.curve_mean_norms), torch.stack(expected), rtol=SCORE_TOLERANCE)
