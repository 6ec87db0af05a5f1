"""`retrac eval run` and `retrac eval norms` through the real command line entry point."""

from __future__ import annotations

import json

from cli import main
from retrac.evaluation.experiment import ExperimentConfig, QueryCounts


def test_eval_run_from_a_config_file_prints_the_table(tmp_path, capsys) -> None:
    config = ExperimentConfig.smoke().model_copy(
        update={
            "n_majority": 24,
            "epochs": 2,
            "queries": QueryCounts(
                heldout_majority=2, heldout_outliers=1, train_majority=1, train_outliers=1, generated=0
            ),
        }
    )
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    assert main(["eval", "run", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| metric | TracIn | ReTrac |" in printed
    assert "U@3 over 5 queries" in printed
    assert str(tmp_path / "out" / "gallery.png") in printed
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["config"]["n_majority"] == 24
    assert saved["setup"]["train_samples"] == 28


def test_eval_run_with_a_bad_config_exits_2_with_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"top_k": 0}))
    assert main(["eval", "run", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert (
        error.startswith("retrac: error:")
    )
    assert (
        "not a valid experiment config" in error
    )
    assert (
        error.count("\n") == 1
    )


def test_eval_norms_on_a_training_run(tiny_run, tmp_path, capsys) -> None:
    out = tmp_path / "norms"
    assert (
        main(
            [
                "eval",
                "norms",
                str(tiny_run.folder),
                "--epoch",
                "2",
                "--curve-timesteps",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "epoch 2, 48 samples" in capsys.readouterr().out
    assert json.loads((out / "norms.json").read_text())["checkpoint_epoch"] == 2
    assert (out / "norm_timestep.png").stat().st_size > 0
    assert (out / "norm_curve.png").stat().st_size > 0


def test_eval_norms_on_a_missing_run_exits_2(tmp_path, capsys) -> None:
    assert main(["eval", "norms", str(tmp_path / "nothing")]) == 2
    assert "not a training run" in capsys.readouterr().err
