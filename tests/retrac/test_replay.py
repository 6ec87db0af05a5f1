"""The replay record: complete, deterministic, and reproducing the training steps it recorded."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from api_schemas import DatasetSpec, TrainSpec
from retrac.datasets import load_dataset
from retrac.losses import distance, noised
from retrac.models import DiffusionModel, load_scheduler, load_unet
from retrac.noise import noise_from_seeds
from retrac.training import train


def test_a_stored_step_reproduces_its_training_loss(tmp_path) -> None:
    # With one batch per epoch, every step of epoch e+1 starts from exactly the checkpoint of epoch e.
    data = DatasetSpec(source="builtin:digits", resolution=8, limit=12)
    dataset = load_dataset(data)
    spec = TrainSpec(dataset=data, preset="micro", loss="mse", epochs=3, batch_size=12, save_every=1, seed=2)
    run = train(spec, dataset, tmp_path / "run")
    scheduler = load_scheduler(run.scheduler_folder)
    for checkpoint in run.checkpoints()[:-1]:
        model = DiffusionModel.from_parts(load_unet(checkpoint.path), scheduler)
        epoch = checkpoint.epoch + 1
        timesteps, seeds = run.replayed(dataset.ids, epoch)
        noise = noise_from_seeds(seeds, dataset.images.shape[1:])
        with torch.no_grad():
            prediction = model.unet(noised(dataset.images, timesteps, noise, model.scheduler), timesteps).sample
        replayed = distance(prediction, noise, "mse")
        torch.testing.assert_close(replayed, run.losses[epoch - 1], rtol=1e-6, atol=1e-7)
        # and a different seed would not have reproduced it
        other = noise_from_seeds(seeds + 1, dataset.images.shape[1:])
        with torch.no_grad():
            shifted = distance(model.unet(noised(dataset.images, timesteps, other, model.scheduler), timesteps).sample, other, "mse")
        assert not torch.allclose(shifted, run.losses[epoch - 1], rtol=1e-3)


def test_every_sample_is_trained_every_epoch(replay_run, digits) -> None:
    # 30 samples in batches of 8: the last batch of each epoch has 6 samples and must not be dropped.
    epochs, n = replay_run.losses.shape
    assert (epochs, n) == (4, len(digits))
    assert torch.isfinite(replay_run.losses).all() and (replay_run.losses > 0).all()
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
