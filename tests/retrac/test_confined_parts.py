"""The model parts found beside a checkpoint (`vae/`, `scheduler/`, `text_encoder/`, `tokenizer/`) and
the files of every model folder stay inside the models root, links followed: refused at create by the
engine and by `retrac index create --models-root`, used when the link stays inside, and refused again
when a store made with a root is reopened after a link was turned outward (the root is recorded)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from api_schemas import DatasetSpec
from cli import main
from retrac.exceptions import SpecError
from retrac.plan import IndexPlan
from storage import GradientStore, StaleStoreError
from tests.retrac.latent_pipeline import latent_index_spec, save_latent_pipeline
from tests.retrac.text_pipeline import save_text_pipeline


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A latent pipeline outside every root: what the links that lead out point to."""
    return save_latent_pipeline(tmp_path_factory.mktemp("outside") / "pipeline")


@pytest.fixture
def root(tmp_path: Path, outside: Path) -> Path:
    """A models root of this test alone, holding a copy of the pipeline as `pipeline/`."""
    shutil.copytree(outside, tmp_path / "models" / "pipeline")
    return tmp_path / "models"


def replace_with_link(path: Path, target: Path) -> None:
    """`path` (a folder or file) becomes a symlink to `target`, which holds the same bytes."""
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.symlink_to(target, target_is_directory=target.is_dir())


@pytest.mark.parametrize(
    ("part", "message"),
    [
        ("vae", "the VAE 'vae' leads outside the configured root"),
        ("scheduler", "the scheduler 'scheduler' leads outside the configured root"),
        (
            "vae/diffusion_pytorch_model.safetensors",
            "the VAE 'vae/diffusion_pytorch_model.safetensors' leads",
        ),
        (
            "unet/diffusion_pytorch_model.safetensors",
            "the checkpoint 'unet/diffusion_pytorch_model.safetensors'",
        ),
    ],
)
def test_a_part_linked_out_of_the_root_is_refused(root: Path, outside: Path, part: str, message: str) -> None:
    replace_with_link(root / "pipeline" / part, outside / part)
    spec = latent_index_spec(root / "pipeline")
    with pytest.raises(SpecError, match=message) as refused:
        IndexPlan.resolve(spec, root)
    assert str(outside) not in str(refused.value)
    assert "\n" not in str(refused.value)
    assert IndexPlan.resolve(spec).latent_space is not None  # with no root (the trusted CLI) it is used


def test_a_part_linked_inside_the_root_is_used(root: Path, outside: Path) -> None:
    shared = root / "shared" / "vae"
    shutil.copytree(outside / "vae", shared)
    replace_with_link(root / "pipeline" / "vae", shared)
    plan = IndexPlan.resolve(latent_index_spec(root / "pipeline"), root)
    assert plan.latent_space is not None
    assert plan.latent_space.folder == root / "pipeline" / "vae"


@pytest.mark.parametrize("part", ["text_encoder", "tokenizer"])
def test_a_text_part_linked_out_of_the_root_is_refused(tmp_path: Path, part: str) -> None:
    elsewhere = save_text_pipeline(tmp_path / "elsewhere")
    pipeline = shutil.copytree(elsewhere, tmp_path / "models" / "pipeline")
    replace_with_link(pipeline / part, elsewhere / part)
    spec = latent_index_spec(pipeline, dataset=DatasetSpec(source="builtin:digits", resolution=8, limit=6))
    with pytest.raises(SpecError, match=f"the {part.replace('_', ' ')} '{part}' leads outside"):
        IndexPlan.resolve(spec, tmp_path / "models")


def test_a_store_made_with_a_root_refuses_a_link_turned_outward_when_reopened(
    root: Path, outside: Path, tmp_path: Path
) -> None:
    GradientStore.create(tmp_path / "index.zarr", latent_index_spec(root / "pipeline"), root=root)
    replace_with_link(root / "pipeline" / "scheduler", outside / "scheduler")  # same bytes, out of the root
    with pytest.raises(StaleStoreError, match="the scheduler 'scheduler' leads outside the configured root"):
        GradientStore.open(tmp_path / "index.zarr")  # no root given: the recorded one applies


def test_the_cli_refuses_a_part_linked_out_of_its_models_root_in_one_line(
    root: Path, outside: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(latent_index_spec(root / "pipeline").model_dump_json())
    create = ["index", "create", "--spec", str(spec), "--models-root", str(root)]
    assert main([*create[:2], str(tmp_path / "inside.zarr"), *create[2:]]) == 0, capsys.readouterr().err
    replace_with_link(root / "pipeline" / "vae", outside / "vae")
    capsys.readouterr()
    assert main([*create[:2], str(tmp_path / "outside.zarr"), *create[2:]]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert "the VAE 'vae' leads outside the configured root" in error, error
    assert not (tmp_path / "outside.zarr").exists()
