"""The pure functions from command-line flags to specs: the spec a set of flags makes, and every
refusal naming the flag to change, without pydantic's prefixes. Nothing is loaded or run."""

from __future__ import annotations

import pytest

from api_schemas import (
    CheckpointSpec,
    DatasetSpec,
    IndexSpec,
    KernelSpec,
    ProjectorSpec,
    QuerySpec,
    SlotSpec,
    TrainSpec,
)
from cli.specs import index_spec, query_spec, train_spec
from retrac.exceptions import SpecError

RUN_DATASET = {"dataset": {"source": "builtin:digits", "resolution": 8, "limit": 48}}
"""What `index create --run` lays the flags over: the run's dataset."""


def test_index_flags_make_the_spec_a_hand_built_one_is() -> None:
    flags = {"run_folder": "/runs/digits", "grid": 3, "slot_noise": "shared", "slot_draws": 2, "dim": 256,
             "projector": "sketch", "dtype": "float32", "shard_size": 16, "replay": False}
    want = IndexSpec(
        dataset=DatasetSpec(source="builtin:digits", resolution=8, limit=48), run="/runs/digits",
        slots=SlotSpec(replay=False, grid=3, noise="shared", draws=2),
        projector=ProjectorSpec(kind="sketch", dim=256), dtype="float32", shard_size=16, kernel=KernelSpec(),
    )
    assert index_spec(flags, RUN_DATASET) == want


def test_data_replaces_the_runs_dataset_and_its_limit() -> None:
    spec = index_spec({"run_folder": "/r", "data": "builtin:digits", "resolution": 16}, RUN_DATASET)
    assert spec.dataset == DatasetSpec(source="builtin:digits", resolution=16)


def test_checkpoints_with_their_options() -> None:
    spec = index_spec({"checkpoint": ["/m/a:epoch=2,lr=0.001", "/m/b:weight=0.5"], "data": "builtin:digits",
                       "loss": "mse", "replay": False, "grid": 2}, {"dataset": {"resolution": 8}})
    assert spec.checkpoints == (
        CheckpointSpec(path="/m/a", epoch=2, lr=0.001),
        CheckpointSpec(path="/m/b", weight=0.5),
    )


def test_typed_flags_are_laid_over_a_spec_file() -> None:
    base = IndexSpec(dataset=DatasetSpec(source="builtin:digits"), run="/r").model_dump(mode="json")
    assert index_spec({"grid": 4}, base).slots == SlotSpec(grid=4)


@pytest.mark.parametrize(
    ("flags", "base", "message"),
    [
        ({"run_folder": "/r", "grid": 0}, RUN_DATASET,
         "--slot-noise, --grid: shared slot noise applies to grid slots; give grid > 0"),
        ({"checkpoint": ["/m/a"], "data": "builtin:digits", "replay": False, "grid": 2}, {},
         "--loss: without a training run, give the loss the model was trained with"),
        ({"run_folder": "/r", "grid": -1}, RUN_DATASET, "--grid: Input should be greater than or equal to 0"),
        ({"run_folder": "/r", "resolution": 0}, RUN_DATASET, "--resolution: "),
        ({"checkpoint": ["/m/a:epochs=2"]}, {"dataset": {"source": "builtin:digits"}},
         "--checkpoint: unknown"),
        ({"run_folder": "/r"}, {}, "--data: give the dataset (or --run, whose dataset is used)"),
        ({}, {"dataset": {"source": "builtin:digits"}, "run": "/r", "colour": 1}, "colour: Extra inputs"),
        ({}, {"dataset": {"source": "builtin:digits"}, "run": "/r", "slots": {"grid": "many"}}, "--grid: "),
    ],
)
def test_a_bad_index_flag_is_named(flags: dict, base: dict, message: str) -> None:
    with pytest.raises(SpecError) as refused:
        index_spec(flags, base)
    assert str(refused.value).startswith(message)
    assert "Value error" not in str(refused.value)


def test_query_flags() -> None:
    assert query_spec({"timesteps": 6, "estimator": "matched"}) == QuerySpec(timesteps=6, estimator="matched")
    with pytest.raises(SpecError, match="^--draws: Input should be greater than or equal to 1$"):
        query_spec({"draws": 0})
    with pytest.raises(SpecError, match="^--label: a label's integer is at least 0$"):
        query_spec({"label": -1})


def test_train_flags_over_a_config_and_builtin_digits_by_default() -> None:
    spec = train_spec({"timesteps": 100, "epochs": 3}, {"lr": 0.01})
    digits = DatasetSpec(source="builtin:digits")
    assert spec == TrainSpec(dataset=digits, num_timesteps=100, epochs=3, lr=0.01)
    with pytest.raises(SpecError, match="^--timesteps: Input should be greater than or equal to 2$"):
        train_spec({"timesteps": 1})


def test_slot_presets() -> None:
    from api_schemas.specs import DEFAULT_SLOTS, PAPER_SLOTS

    assert index_spec({"run_folder": "/r"}, RUN_DATASET).slots == DEFAULT_SLOTS
    assert index_spec({"run_folder": "/r", "preset": "paper"}, RUN_DATASET).slots == PAPER_SLOTS
    with pytest.raises(SpecError, match="^--preset paper fixes the slots .*; drop --grid$"):
        index_spec({"run_folder": "/r", "preset": "paper", "grid": 2}, RUN_DATASET)


def test_the_kernel_is_built_by_default_where_rows_can_have_one() -> None:
    """The default index serves trak (the measured best); the paper's preset and --no-kernel build none,
    and rows too wide for a kernel get none rather than a refusal."""
    run = {"run_folder": "/r"}
    assert index_spec(run, RUN_DATASET).kernel == KernelSpec()
    assert index_spec({**run, "kernel_ridge": 0.3}, RUN_DATASET).kernel == KernelSpec(ridge=0.3)
    assert index_spec({**run, "kernel": False}, RUN_DATASET).kernel is None
    assert index_spec({**run, "preset": "paper"}, RUN_DATASET).kernel is None
    assert index_spec({**run, "preset": "paper", "kernel": True}, RUN_DATASET).kernel == KernelSpec()
    assert index_spec({**run, "projector": "identity"}, RUN_DATASET).kernel is None
    assert index_spec({**run, "dim": 32768}, RUN_DATASET).kernel is None
    assert index_spec(run, {**RUN_DATASET, "kernel": None}).kernel is None  # a spec file's own choice
    with pytest.raises(SpecError, match="^--kernel-ridge: the kernel's ridge needs --kernel$"):
        index_spec({**run, "kernel": False, "kernel_ridge": 0.3}, RUN_DATASET)
