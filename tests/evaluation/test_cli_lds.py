"""`retrac eval lds`, `retrac self-influence` and `retrac train --recipe` through the command line."""

from __future__ import annotations

import json

import numpy as np
import torch

from cli import main
from retrac.evaluation.lds import LdsConfig
from retrac.evaluation.outliers import OUTLIER_SCORES, relative_norms
from retrac.models import load_scheduler
from retrac.replay import TrainingRun
from retrac.training import clipped_cosine_betas
from storage import GradientStore


def test_eval_lds_prints_the_table_and_writes_the_report(tmp_path, capsys) -> None:
    config = LdsConfig.smoke().model_copy(update={"models": 3, "seed_models": 0, "removal_queries": 0,
                                                  "workers": 1})
    path = tmp_path / "lds.json"
    path.write_text(config.model_dump_json())
    assert main(["eval", "lds", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "LDS over 3 models; queries: 3 validation, 3 generated." in printed
    assert "| tracin |" in printed
    assert "| method | estimator | LDS validation | 95% interval | LDS generated |" in printed
    saved = json.loads((tmp_path / "out" / "lds.json").read_text())
    assert len(saved["actual_losses"]["validation"]) == 3
    assert saved["removal"] is None


def test_eval_lds_with_a_bad_config_exits_2_with_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "lds.json"
    path.write_text(json.dumps({"models": 2}))
    assert main(["eval", "lds", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("retrac: error:")
    assert "not a valid LDS config" in error
    assert error.count("\n") == 1


def test_self_influence_adds_the_norm_and_direction_rankings(reference_store, capsys) -> None:
    store = GradientStore.open(reference_store)
    assert main(["self-influence", str(reference_store), "--top-k", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    norms = [torch.from_numpy(store.norms(c)) for c in range(store.num_checkpoints)]
    grid = [s for s, kind in enumerate(store.slot_kinds) if kind == "grid"]
    expected = relative_norms(norms, store.weights, grid)
    top = np.argsort(-expected, kind="stable")[:4]
    assert [e["sample_id"] for e in printed["relative_norm"]] == [store.sample_ids[i] for i in top]
    assert list(printed) == list(OUTLIER_SCORES)  # the atypical direction too
    assert "group_auc" not in printed  # digits carry no groups


def test_train_with_the_paper_recipe(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = ["train", str(out), "--recipe", "paper", "--resolution", "8", "--limit", "16", "--preset", "micro",
            "--epochs", "1", "--batch-size", "8", "--save-every", "1"]
    assert main(args) == 0
    run = TrainingRun.load(out)
    assert run.loss == "l1"
    assert run.spec.num_timesteps == 1000
    betas = load_scheduler(run.scheduler_folder).betas
    assert torch.equal(betas, torch.tensor(clipped_cosine_betas(1000), dtype=torch.float32))
    assert "--timesteps 100 --draws 16" in capsys.readouterr().out
