"""`retrac.replay.Recorder` in a plain diffusers training loop (examples/train_unconditional_replay.py):
an index built from its run replays the recorded training losses, also across `--resume`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from api_schemas import DatasetSpec, IndexSpec, ProjectorSpec, SlotSpec
from retrac.exceptions import ReplayError
from retrac.gradients import group_losses, trainable_parameters
from retrac.noise import noise_from_seeds
from retrac.plan import IndexPlan
from retrac.replay import Recorder, TrainingRun

torch.set_num_threads(1)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_unconditional_replay.py"
REPLAY_TOLERANCE = 1e-6
"""The replayed forward is the training forward's arithmetic on the same inputs: equal up to float32
rounding."""
DATA = ["--data", "builtin:digits", "--resolution", "8", "--limit", "12", "--train-batch-size", "12"]


def example(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        check=True,
        capture_output=True,
        timeout=600,
        env={"PYTHONPATH": str(EXAMPLE.parents[1]), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    return time.perf_counter() - start


@pytest.mark.parametrize(
    "prediction", ["epsilon", "v_prediction", "sample"]
)  # sample: snr-weighted, as diffusers'
def test_an_index_of_the_examples_run_replays_its_losses_across_resume(tmp_path, prediction) -> None:
    # One batch per epoch: every step of epoch e+1 starts from exactly the checkpoint of epoch e.
    run_dir = tmp_path / "run"
    seconds = example(str(run_dir), *DATA, "--epochs", "2", "--prediction-type", prediction)
    seconds += example(str(run_dir), *DATA, "--epochs", "3", "--prediction-type", prediction, "--resume")
    unbroken = tmp_path / "unbroken"
    example(str(unbroken), *DATA, "--epochs", "3", "--prediction-type", prediction)
    run, reference = TrainingRun.load(run_dir), TrainingRun.load(unbroken)
    assert torch.equal(run.seeds, reference.seeds)
    assert torch.equal(run.timesteps, reference.timesteps)
    torch.testing.assert_close(
        run.losses, reference.losses, rtol=0, atol=0
    )  # --resume continued the same run

    data = DatasetSpec(source="builtin:digits", resolution=8, limit=12)
    plan = IndexPlan.resolve(IndexSpec(dataset=data, run=str(run_dir), slots=SlotSpec(replay=True),
                                       projector=ProjectorSpec(kind="identity")))
    assert plan.loss_weighting == ("snr" if prediction == "sample" else "none")
    assert plan.prediction_type == prediction
    assert [c.epoch for c in plan.checkpoints] == [1, 2, 3]
    worst = 0.0
    for c, checkpoint in enumerate(plan.checkpoints[:-1]):
        model = plan.load_model(c)
        timesteps, seeds = run.replayed(plan.dataset.ids, checkpoint.epoch + 1)
        noise = noise_from_seeds(seeds, plan.dataset.images.shape[1:]).unsqueeze(1)
        with torch.no_grad():
            replayed = group_losses(model, plan.loss, trainable_parameters(model), plan.dataset.images,
                                    timesteps, noise, plan.loss_weighting)
        recorded = run.losses[checkpoint.epoch]
        worst = max(worst, float(((replayed - recorded).abs() / recorded.abs()).max()))
    print(
        f"\nexample {prediction}: 2 + 1 (--resume) epochs in {seconds:.1f} s, replay max relative error "
        f"{worst:.2e}"
    )
    assert worst < REPLAY_TOLERANCE


def test_the_recorder_refuses_a_sample_twice_or_missed(tmp_path) -> None:
    from api_schemas import TrainSpec

    spec = TrainSpec(dataset=DatasetSpec(source="builtin:digits"), epochs=1)
    recorder = Recorder(tmp_path, ["a", "b"], "fingerprint", spec)
    recorder.noise(["a"], torch.tensor([3]), (1, 2, 2))
    with pytest.raises(ReplayError, match="trained twice"):
        recorder.noise(["a"], torch.tensor([4]), (1, 2, 2))
    with pytest.raises(ReplayError, match="1 samples were not trained"):
        recorder.end_epoch()
    with pytest.raises(ReplayError, match="not in the recorded dataset"):
        recorder.noise(["z"], torch.tensor([4]), (1, 2, 2))


def test_the_recorder_records_class_labels_and_keeps_them_on_resume(tmp_path) -> None:
    from api_schemas import TrainSpec
    from retrac.conditions import ClassLabels

    spec = TrainSpec(dataset=DatasetSpec(source="builtin:digits"), epochs=1)
    classes = ClassLabels({"cat": 0, "dog": 1})
    with pytest.raises(ReplayError, match="one class label per sample together with the label mapping"):
        Recorder(tmp_path, ["a", "b"], "fingerprint", spec, labels=[0])
    recorder = Recorder(tmp_path, ["a", "b"], "fingerprint", spec, labels=[1, 0], classes=classes)
    recorder.noise(["a", "b"], torch.tensor([3, 4]), (1, 2, 2))
    recorder.end_epoch()
    (tmp_path / "checkpoint-1").mkdir()
    recorder.checkpoint(tmp_path / "checkpoint-1")
    run = TrainingRun.load(tmp_path)
    assert run.labels == (1, 0)
    assert run.classes == classes
    resumed = Recorder.resume(tmp_path)
    assert tuple(resumed.labels or ()) == (1, 0)
    assert resumed.classes == classes
