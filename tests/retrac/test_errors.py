"""Mismatches between data, record, checkpoints and loss are named errors, never silent fallbacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, SlotSpec
from retrac.exceptions import CheckpointError, ReplayError
from retrac.models import build_unet
from retrac.plan import IndexPlan
from tests.retrac.conftest import DIGITS, index_spec


def test_a_sample_absent_from_the_record_is_an_error(replay_run) -> None:
    with pytest.raises(ReplayError, match="digit-0030"):
        IndexPlan.resolve(
            index_spec(replay_run).model_copy(update={"dataset": DIGITS.model_copy(update={"limit": 31})})
        )
    with pytest.raises(ReplayError, match="no training step for sample"):
        replay_run.replayed(["digit-0000-0", "not-a-sample"], 1)
    with pytest.raises(ReplayError, match="covers epochs 1..4"):
        replay_run.replayed(["digit-0000-0"], 5)


def test_a_checkpoint_of_another_architecture_is_an_error(replay_run, tmp_path) -> None:
    other = tmp_path / "other"
    build_unet("tiny", resolution=8, channels=1).save_pretrained(other)
    first = replay_run.checkpoints()[0]
    spec = index_spec(replay_run).model_copy(
        update={"checkpoints": (first, CheckpointSpec(path=str(other), epoch=4))}
    )
    with pytest.raises(CheckpointError, match="another architecture.*block_out_channels"):
        IndexPlan.resolve(spec)


def test_a_loss_that_does_not_match_the_record_is_an_error(replay_run) -> None:
    assert replay_run.loss == "l1"
    with pytest.raises(CheckpointError, match="'mse' does not match the record.*'l1'"):
        IndexPlan.resolve(index_spec(replay_run).model_copy(update={"loss": "mse"}))


def test_pickled_weights_are_refused(tmp_path) -> None:
    folder = tmp_path / "pickled"
    build_unet("micro", resolution=8, channels=1).save_pretrained(folder, safe_serialization=False)
    spec = IndexSpec(
        dataset=DatasetSpec(source="builtin:digits", resolution=8, limit=4),
        checkpoints=(CheckpointSpec(path=str(folder)),),
        loss="mse",
        slots=SlotSpec(replay=False, grid=2),
    )
    with pytest.raises(CheckpointError, match="safetensors only"):
        IndexPlan.resolve(spec)  # at create time, before anything is computed


def test_the_cli_reports_errors_in_one_line(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli", "train", str(tmp_path / "x"), "--data", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("retrac: error:")
    assert "Traceback" not in result.stderr
