"""Runs and stores record paths that resolve from any working directory."""

from __future__ import annotations

import json

import numpy as np
import torch

from api_schemas import DatasetSpec
from cli import main
from retrac.datasets import load_dataset

torch.set_num_threads(1)


def test_a_store_made_with_relative_paths_works_from_another_directory(tmp_path, monkeypatch, capsys) -> None:
    made, elsewhere = tmp_path / "made", tmp_path / "elsewhere"
    made.mkdir(), elsewhere.mkdir()
    images = (
        (load_dataset(DatasetSpec(source="builtin:digits", resolution=8, limit=8)).images + 1) / 2
    ).numpy()
    np.save(made / "data.npy", images[:, 0])
    np.save(elsewhere / "query.npy", images[3, 0])

    monkeypatch.chdir(made)  # every path typed relative to `made`
    assert main(["train", "run", "--data", "data.npy", "--resolution", "8", "--preset", "micro", "--epochs",
                 "2", "--batch-size", "4", "--save-every", "1", "--prediction-type", "v_prediction"]) == 0
    assert main(["index", "create", "store.zarr", "--run", "run", "--grid", "1", "--shard-size", "4",
                 "--slot-noise", "independent", "--projector", "identity", "--dtype", "float32"]) == 0

    monkeypatch.chdir(elsewhere)
    store = str(made / "store.zarr")
    assert main(["index", "run", store]) == 0
    capsys.readouterr()
    assert main(["index", "inspect", store, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["freshness"].startswith("fresh")
    assert report["scheduler"]["prediction_type"] == "v_prediction"
    assert report["spec"]["run"] == str(made / "run")
    assert report["spec"]["dataset"]["source"] == str(made / "data.npy")
    assert (
        main(["attribute", store, "query.npy", "--top-k", "2", "--timesteps", "2", "--draws", "1", "--json"])
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["data"][0]["methods"]["retrac"]["proponents"]) == 2
