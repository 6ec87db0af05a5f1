"""The replay record: complete, deterministic, and reproducing the training steps it recorded."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, SlotSpec, TrainSpec
from retrac.datasets import load_dataset
from retrac.exceptions import SpecError
from retrac.plan import IndexPlan
from retrac.training import train
from tests.retrac.conftest import index_spec
from tests.retrac.reference import per_sample_losses, seeded_noise

REPLAY_TOLERANCE = 1e-6
"""Relative: the recorded loss and this recomputation run the same float32 forward pass on the same
inputs; only the batch layout and the order of a few float32 products may differ."""


def test_a_stored_step_reproduces_its_training_loss(tmp_path) -> None:
    # With one batch per epoch, every step of epoch e+1 starts from exactly the checkpoint of epoch e.
    data = DatasetSpec(source="builtin:digits", resolution=8, limit=12)
    dataset = load_dataset(data)
    spec = TrainSpec(dataset=data, preset="micro", loss="mse", epochs=3, batch_size=12, save_every=1, seed=2)
    run = train(spec, dataset, tmp_path / "run")
    scheduler = DDPMScheduler.from_pretrained(run.scheduler_folder)
    assert run.sample_ids == dataset.ids  # so the record's columns are the dataset's rows
    for checkpoint in run.checkpoints()[:-1]:
        unet = UNet2DModel.from_pretrained(checkpoint.path).eval()
        epoch = checkpoint.epoch + 1
        timesteps, seeds = run.timesteps[epoch - 1], run.seeds[epoch - 1]  # the record, in dataset order
        noise = torch.stack([seeded_noise(s, dataset.images.shape[1:]) for s in seeds.tolist()])
        with torch.no_grad():
            replayed = per_sample_losses(unet, scheduler, dataset.images, timesteps, noise, "mse")
        torch.testing.assert_close(replayed, run.losses[epoch - 1], rtol=REPLAY_TOLERANCE, atol=1e-7)
        # and a different seed would not have reproduced it
        other = torch.stack([seeded_noise(s + 1, dataset.images.shape[1:]) for s in seeds.tolist()])
        with torch.no_grad():
            shifted = per_sample_losses(unet, scheduler, dataset.images, timesteps, other, "mse")
        assert not torch.allclose(shifted, run.losses[epoch - 1], rtol=1e-3)


def test_every_sample_is_trained_every_epoch(replay_run, digits) -> None:
    # 30 samples in batches of 8: the last batch of each epoch has 6 samples and must not be dropped.
    epochs, n = replay_run.losses.shape
    assert (epochs, n) == (4, len(digits))
    assert torch.isfinite(replay_run.losses).all()
    assert (replay_run.losses > 0).all()
    assert ((replay_run.timesteps >= 0) & (replay_run.timesteps < 1000)).all()
    assert len(set(replay_run.seeds[0].tolist())) == n  # every step its own noise


def test_training_is_deterministic(tmp_path, replay_run, digits) -> None:
    again = train(replay_run.spec, digits, tmp_path / "again")
    for name in ("timesteps", "seeds", "losses"):
        assert torch.equal(getattr(again, name), getattr(replay_run, name))
    for first, second in zip(replay_run.checkpoints(), again.checkpoints(), strict=True):
        a = load_file(f"{first.path}/diffusion_pytorch_model.safetensors")
        b = load_file(f"{second.path}/diffusion_pytorch_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_weights_follow_the_default_rule(replay_run, digits) -> None:
    lr, batch, n = replay_run.spec.lr, replay_run.spec.batch_size, len(digits)
    weights = [c.weight for c in replay_run.checkpoints()]
    assert [c.epoch for c in replay_run.checkpoints()] == [2, 4]
    assert weights == [lr * batch * 2 / n, lr * batch * 2 / n]


def test_an_index_of_a_subset_weighs_checkpoints_as_the_run_trained(replay_run, digits) -> None:
    """`--limit` indexes the first samples of the run's dataset; each step still saw the run's N."""
    lr, batch, n = replay_run.spec.lr, replay_run.spec.batch_size, len(digits)
    subset = index_spec(replay_run, kind="sketch", dim=64)
    subset = subset.model_copy(update={"dataset": subset.dataset.model_copy(update={"limit": 6})})
    plan = IndexPlan.resolve(subset)
    assert plan.num_rows == 6
    assert plan.weights == [lr * batch * 2 / n, lr * batch * 2 / n]


def test_weights_from_epoch_and_lr_without_a_run_refuse_a_limit(replay_run) -> None:
    checkpoints = tuple(
        CheckpointSpec(path=str(c.path), epoch=c.epoch, lr=replay_run.spec.lr)
        for c in replay_run.checkpoints()
    )
    spec = IndexSpec(
        dataset=DatasetSpec(source="builtin:digits", resolution=8, limit=6), checkpoints=checkpoints,
        loss="l1", train_batch_size=8, slots=SlotSpec(replay=False, grid=2),
        scheduler=str(replay_run.folder / "scheduler"),
    )
    with pytest.raises(SpecError, match="give each checkpoint its weight"):
        IndexPlan.resolve(spec)
