"""Tiny base models and LoRA adapters saved as peft and diffusers save them, and the reference adapted
model a brute force differentiates.

A base is a pipeline folder (`unet/` + `scheduler/`) of a micro `UNet2DModel` with attention, random
weights. Adapters get random factors (peft initialises `lora_B` to zero, which would make every
`lora_A` gradient zero and a test blind to it). The reference is built the way a peft user builds one,
`get_peft_model` on the base and `set_peft_model_state_dict` of the tensors the test drew, without
reading the adapter files retrac reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

SIDE, CHANNELS = 8, 1
PEFT_PREFIX = "base_model.model."
"""Where a `PeftModel`'s state dict keys put the wrapped model's names."""
UNET_CONFIG = dict(
    sample_size=SIDE, in_channels=CHANNELS, out_channels=CHANNELS, block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
)
UNET_LORA = dict(r=2, lora_alpha=6, target_modules=["to_q", "to_v", "conv1"])
"""Attention projections (Linear) and the resnets' first convolutions (Conv2d), alpha != r."""
TEXT_LORA = dict(r=3, lora_alpha=5, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
"""As diffusers' train_text_to_image_lora.py targets the UNet's attention, alpha != r."""


def save_base(folder: Path, seed: int = 0) -> Path:
    """A pipeline folder with a random micro UNet2DModel and a DDPM scheduler."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet2DModel(**UNET_CONFIG).save_pretrained(folder / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return folder


def randomise_adapter(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Draw every LoRA factor of `model` from `seed` (scale 0.3); its peft state dict."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def save_peft_adapter(folder: Path, base: Path, seed: int = 1, **config: object) -> dict[str, torch.Tensor]:
    """An adapter of the UNet in `base`, saved by `PeftModel.save_pretrained`; its tensors."""
    unet = UNet2DModel.from_pretrained(str(base / "unet"))  # a str: peft's model card writes the name
    model = get_peft_model(unet, LoraConfig(**{**UNET_LORA, **config}))
    tensors = randomise_adapter(model, seed)
    model.save_pretrained(folder)
    return tensors


def save_diffusers_adapter(
    folder: Path, unet: nn.Module, seed: int = 1, *, metadata: bool = True, **config: object
) -> dict[str, torch.Tensor]:
    """An adapter of `unet` (a UNet2DConditionModel, changed in place) saved as diffusers' LoRA training
    script saves it (`save_lora_weights`), with its LoraConfig as metadata or without; its tensors."""
    lora = LoraConfig(**{**TEXT_LORA, **config})
    unet.add_adapter(lora)
    tensors = randomise_adapter(unet, seed)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=lora.to_dict() if metadata else None, safe_serialization=True,
    )
    return tensors


def plain_attention(unet: nn.Module) -> nn.Module:
    """`unet` in eval mode with the plain attention processor (as training and retrac use), in place."""
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    return unet.eval()


def adapted(unet: nn.Module, tensors: dict[str, torch.Tensor], **config: object) -> PeftModel:
    """`unet` (`plain_attention`) wrapped by peft with the adapter `tensors`."""
    plain_attention(unet)
    model = get_peft_model(unet.eval(), LoraConfig(**config))
    prefixed = {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in tensors.items()}
    loaded = set_peft_model_state_dict(model, prefixed)
    assert not loaded.unexpected_keys, loaded.unexpected_keys[:3]  # every factor drawn is in the reference
    return model.eval()


def lora_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The adapter's factors, in `named_parameters` order: what a LoRA step trains."""
    return [p for name, p in model.named_parameters() if ".lora_" in name]
