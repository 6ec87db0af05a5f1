"""A LoRA fine-tune recorded for replay (examples/train_lora_replay.py) end to end: train, `index create
--run --base`, `index run`, `attribute`; each replayed step's loss is the recorded one, so the store's
gradients are those of the steps that trained each sample."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli import main
from retrac.gradients import group_losses, trainable_parameters
from retrac.noise import noise_from_seeds
from retrac.replay import TrainingRun
from storage import GradientStore

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_lora_replay.py"
REPLAY_TOLERANCE = 1e-6
"""The replayed forward is the training forward's arithmetic on the same inputs: equal up to float32
rounding (as for the full-model example, tests/retrac/test_recorder.py)."""


def test_a_lora_run_indexes_replays_and_attributes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    subprocess.run(
        [sys.executable, str(EXAMPLE), str(run), "--limit", "12", "--train-batch-size", "12", "--epochs", "3",
         "--rank", "2"],
        check=True, capture_output=True, timeout=600,
        env={"PYTHONPATH": str(EXAMPLE.parents[1]), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    store = tmp_path / "lora.zarr"
    assert main(["index", "create", str(store), "--run", str(run), "--base", str(run / "base"), "--grid", "2",
                 "--projector", "identity", "--dtype", "float32"]) == 0
    assert "LoRA adapters (peft's format, rank 2, alpha 2 from config)" in capsys.readouterr().out
    assert main(["index", "run", str(store)]) == 0
    plan = GradientStore.open(store).plan
    assert [c.epoch for c in plan.checkpoints] == [1, 2, 3]
    record = TrainingRun.load(run)
    worst = 0.0
    for c, checkpoint in enumerate(plan.checkpoints[:-1]):  # one batch per epoch: epoch e+1 starts from c
        model = plan.load_model(c)
        names = list(trainable_parameters(model))
        assert names
        assert all(".lora_" in name for name in names)  # the base frozen
        timesteps, seeds = record.replayed(plan.dataset.ids, int(checkpoint.epoch or 0) + 1)
        noise = noise_from_seeds(seeds, plan.dataset.images.shape[1:]).unsqueeze(1)
        with torch.no_grad():
            replayed = group_losses(model, plan.loss, trainable_parameters(model), plan.dataset.images,
                                    timesteps, noise)
        recorded = record.losses[int(checkpoint.epoch or 0)]
        worst = max(worst, float(((replayed - recorded).abs() / recorded.abs()).max()))
    with capsys.disabled():
        print(f"\nLoRA example: replay max relative error {worst:.2e}")
    assert worst < REPLAY_TOLERANCE
    query = tmp_path / "query.png"
    Image.fromarray(((plan.dataset.images[3, 0].numpy() + 1) * 127.5).astype(np.uint8)).save(query)
    assert main(["attribute", str(store), str(query), "--top-k", "3", "--timesteps", "2",
                 "--draws", "1"]) == 0
    assert "proponents" in capsys.readouterr().out
