"""A checkpoint whose weights are not the model its config describes is refused at `index create`.

Missing tensors would be randomly initialised by diffusers, unexpected ones dropped, and mis-shaped
ones fail mid-run: each is refused before anything runs, naming a few keys; a peft-wrapped UNet saved
with `save_pretrained` (`to_q.base_layer.weight`, `to_q.lora_A.default.weight`) is named as such.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from retrac.exceptions import CheckpointError
from retrac.models import WEIGHTS_NAME, build_unet, load_unet, require_weights


def pipeline_folder(folder: Path) -> Path:
    """A DDPM pipeline folder of an 8x8 grey micro UNet, as diffusers saves it."""
    DDPMPipeline(unet=build_unet("micro", resolution=8, channels=1), scheduler=DDPMScheduler()).save_pretrained(folder)
    return folder


def edit_weights(folder: Path, edit) -> None:
    file = folder / "unet" / WEIGHTS_NAME
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    return pipeline_folder(tmp_path / "pipeline")


def test_matching_weights_load_exactly(pipeline) -> None:
    assert require_weights(pipeline) == pipeline / "unet"
    loaded = load_unet(pipeline).state_dict()
    saved = load_file(pipeline / "unet" / WEIGHTS_NAME)
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_a_missing_tensor_is_refused_naming_it(pipeline) -> None:
    key = "conv_in.weight"
    edit_weights(pipeline, lambda tensors: tensors.pop(key))
    with pytest.raises(CheckpointError, match=rf"1 missing \(e\.g\. {key}\)"):
        require_weights(pipeline)


def test_an_unexpected_and_a_misshaped_tensor_are_refused_naming_them(pipeline) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors["extra.weight"] = torch.zeros(2)
        tensors["conv_in.bias"] = torch.zeros(3)

    edit_weights(pipeline, edit)
    with pytest.raises(CheckpointError) as caught:
        load_unet(pipeline)
    message = str(caught.value)
    assert "1 unexpected (e.g. extra.weight)" in message
    assert "1 mis-shaped (e.g. conv_in.bias [3] for [8])" in message
    assert "\n" not in message


def test_a_peft_wrapped_unet_is_refused_at_create_as_one(tmp_path, capsys) -> None:
    from cli import main

    unet = build_unet("micro", resolution=8, channels=1)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "to_v"]), unet)
    folder = tmp_path / "wrapped"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    assert any(".base_layer." in key for key in load_file(folder / "unet" / WEIGHTS_NAME))
    code = main(["index", "create", str(tmp_path / "store"), "--checkpoint", f"{folder}:weight=1",
                 "--data", "builtin:digits", "--limit", "4", "--loss", "mse", "--no-replay", "--grid", "1"])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert "a peft-wrapped model (keys like" in error and "merge_and_unload" in error
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "store").exists()
