"""LoRA adapters on a frozen base denoiser: reading them in peft's or diffusers' format, and applying them.

An adapter folder is peft's (`adapter_config.json` + `adapter_model.safetensors`, as
`PeftModel.save_pretrained` writes it) or diffusers' (`pytorch_lora_weights.safetensors`, as
`save_lora_weights` writes it under a LoRA training script's output folder and its `checkpoint-N/`).
Loading goes through the libraries' own loaders (peft's `inject_adapter_in_model` and
`set_peft_model_state_dict`, diffusers' `load_lora_adapter`), so the adapted model computes exactly
what training computed; then only the adapter's tensors take gradients. Anything the loaders would
apply partly or silently differently is refused in one line: keys that match no layer, DoRA, trained
biases or full modules beside the adapter, a text encoder's LoRA layers. Checks run first on a base
built on the meta device (`adapted_meta_model`), so `index create` refuses an adapter without loading
any weights. A diffusers file without adapter metadata records no alpha: diffusers' loader then takes
alpha = rank, and `settings` says so (`alpha_from`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

from retrac.exceptions import CheckpointError
from retrac.models import (
    DENOISER_FOLDERS,
    DIFFUSERS_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    Denoiser,
    denoiser_class,
    require_weights,
    weights_file,
)

ADAPTER_NAME = "default"
METADATA_KEY = "lora_adapter_metadata"
"""The safetensors header entry where diffusers' `save_lora_weights` keeps the LoRA config, when given."""
TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.")
RECORDED = ("r", "lora_alpha", "target_modules", "lora_dropout", "rank_pattern", "alpha_pattern",
            "use_rslora", "use_dora", "lora_bias", "fan_in_fan_out")
"""The LoraConfig entries a store records and fingerprints: they fix what the adapted model computes."""

AdapterFormat = Literal["peft", "diffusers"]


@dataclass(frozen=True)
class Adapter:
    """An adapter folder: its format and the safetensors file holding its tensors."""

    folder: Path
    format: AdapterFormat

    @property
    def weights_file(self) -> Path:
        return self.folder / (PEFT_WEIGHTS if self.format == "peft" else DIFFUSERS_WEIGHTS)


def find_adapter(path: str | Path) -> Adapter | None:
    """The adapter in folder `path`, or None if it holds neither format."""
    folder = Path(path)
    if (folder / PEFT_CONFIG).is_file():
        return Adapter(folder, "peft")
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return Adapter(folder, "diffusers")
    return None


def read_adapter(path: str | Path) -> Adapter:
    """The adapter in `path`; a CheckpointError naming the files an adapter folder holds otherwise."""
    adapter = find_adapter(path)
    if adapter is None:
        raise CheckpointError(
            f"{path}: not a LoRA adapter folder: give peft's ({PEFT_CONFIG} + {PEFT_WEIGHTS}) or "
            f"diffusers' ({DIFFUSERS_WEIGHTS}); a full model is indexed without --base"
        )
    if not adapter.weights_file.is_file():
        raise CheckpointError(
            f"{path}: no {PEFT_WEIGHTS}; retrac loads safetensors only (save the adapter with "
            "safe_serialization=True)"
        )
    return adapter


def apply_adapter(unet: Denoiser, adapter: Adapter) -> dict[str, Any]:
    """Load `adapter` into `unet` in place, leave only its tensors trainable, and return its `settings`.
    The new layers take the model's mode (eval: a LoRA dropout is off, as every other dropout)."""
    training = unet.training
    with warnings.catch_warnings():  # peft warns about copying into meta tensors, which the check does
        warnings.simplefilter("ignore")
        config, expected = _load_peft(unet, adapter) if adapter.format == "peft" else _load_diffusers(
            unet, adapter
        )
    unet.train(training)
    trainable = _mark_adapter_trainable(unet)
    if trainable != expected:
        raise CheckpointError(
            f"{adapter.weights_file}: the adapter holds {expected} tensors but {trainable} LoRA tensors "
            "were loaded into the base model; give the base the adapter was trained on"
        )
    return settings(adapter, config)


def adapted_meta_model(base: str | Path, adapter: Adapter | None) -> tuple[Denoiser, dict[str, Any] | None]:
    """The denoiser of `base` built on the meta device (no weights read), with `adapter` applied after
    every check of `apply_adapter` if one is given, and the adapter's `settings` (None without one)."""
    folder = require_weights(base)
    config = json.loads((folder / "config.json").read_text())
    with init_empty_weights():
        model = denoiser_class(folder).from_config(config)
    return model, apply_adapter(model, adapter) if adapter is not None else None


def checkpoint_weights(path: str | Path) -> Path:
    """The safetensors file of a checkpoint: an adapter's tensors, or a full model's weights."""
    adapter = find_adapter(path)
    return adapter.weights_file if adapter is not None else weights_file(path)


def settings(adapter: Adapter, config: LoraConfig) -> dict[str, Any]:
    """What a store records of an adapter: its format, `RECORDED` config entries, where alpha came from."""
    recorded = {key: getattr(config, key, None) for key in RECORDED}
    recorded["target_modules"] = sorted(recorded["target_modules"] or [])
    alpha_from = "config"
    if adapter.format == "diffusers":
        with safe_open(str(adapter.weights_file), framework="pt") as handle:
            if METADATA_KEY not in (handle.metadata() or {}):
                alpha_from = "rank (the file records no alpha; diffusers' loader takes alpha = rank)"
    described = {"format": adapter.format, **recorded, "alpha_from": alpha_from}
    return json.loads(json.dumps(described, default=list))  # sets as lists: as the store's JSON holds it


def _load_peft(unet: Denoiser, adapter: Adapter) -> tuple[LoraConfig, int]:
    """peft's own loading of a `save_pretrained` folder into a plain module: config, inject, state dict."""
    raw = json.loads((adapter.folder / PEFT_CONFIG).read_text())
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{adapter.folder}: a peft {raw.get('peft_type')} adapter; retrac handles LoRA adapters"
        )
    config = LoraConfig.from_pretrained(str(adapter.folder))
    _check_config(adapter, config)
    tensors = load_file(adapter.weights_file)
    inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)
    try:
        result = set_peft_model_state_dict(unet, tensors, adapter_name=ADAPTER_NAME)
    except RuntimeError as error:  # torch's size mismatch: another base
        raise CheckpointError(f"{adapter.weights_file}: does not fit the base model: {error}") from error
    unexpected: list[str] = list(getattr(result, "unexpected_keys", []))  # torch's incompatible keys
    if unexpected:
        raise CheckpointError(
            f"{adapter.weights_file}: {len(unexpected)} tensors match no layer of the base "
            f"(e.g. {unexpected[0]}); give the base the adapter was trained on"
        )
    return config, len(tensors)


def _load_diffusers(unet: Denoiser, adapter: Adapter) -> tuple[LoraConfig, int]:
    """diffusers' `load_lora_adapter` of a `save_lora_weights` file, its denoiser's part (`unet.` or
    `transformer.` keys) only; a text encoder's LoRA layers in it are refused."""
    with safe_open(str(adapter.weights_file), framework="pt") as handle:
        keys = list(handle.keys())  # noqa: SIM118
    text = [k for k in keys if k.startswith(TEXT_PREFIXES)]
    if text:
        raise CheckpointError(
            f"{adapter.weights_file}: holds LoRA layers of the text encoder (e.g. {text[0]}); retrac takes "
            "gradients over the denoiser's adapter only and encodes captions with the pipeline's text "
            "encoder: train with the text encoder frozen (no --train_text_encoder)"
        )
    if not hasattr(unet, "load_lora_adapter"):
        raise CheckpointError(
            f"{adapter.folder}: diffusers has no LoRA loader for a {type(unet).__name__}; save its adapter "
            f"in peft's format (PeftModel.save_pretrained: {PEFT_CONFIG} + {PEFT_WEIGHTS})"
        )
    prefix = next((p for p in DENOISER_FOLDERS if all(k.startswith(f"{p}.") for k in keys)), None)
    try:
        unet.load_lora_adapter(
            str(adapter.folder), prefix=prefix, weight_name=DIFFUSERS_WEIGHTS, adapter_name=ADAPTER_NAME,
            local_files_only=True, use_safetensors=True,
        )
    except (ValueError, RuntimeError) as error:  # no matching layer, or a size mismatch: another base
        raise CheckpointError(f"{adapter.weights_file}: does not fit the base model: {error}") from error
    config = unet.peft_config[ADAPTER_NAME]
    _check_config(adapter, config)
    return config, len(keys)


def _check_config(adapter: Adapter, config: LoraConfig) -> None:
    """A CheckpointError for what the adapter trained besides LoRA factors that retrac would not
    reproduce exactly: DoRA's magnitudes, biases, full modules."""
    if config.use_dora:
        raise CheckpointError(
            f"{adapter.folder}: a DoRA adapter (use_dora) is not handled; merge it into its base "
            "(merge_and_unload), save_pretrained the merged model and index that with --parameters"
        )
    if config.bias != "none" or config.modules_to_save:
        trained = "biases" if config.bias != "none" else "whole modules"
        raise CheckpointError(
            f"{adapter.folder}: the adapter also trains {trained} (bias or modules_to_save); retrac handles "
            "LoRA factors alone (bias 'none', no modules_to_save)"
        )


def _mark_adapter_trainable(unet: torch.nn.Module) -> int:
    """Freeze everything but the adapter's tensors (each peft layer's `adapter_layer_names`); their count."""
    unet.requires_grad_(False)
    count = 0
    for module in unet.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for name in module.adapter_layer_names:
            layers = getattr(module, name)
            if ADAPTER_NAME in layers:
                part = layers[ADAPTER_NAME]
                tensors = list(part.parameters()) if isinstance(part, torch.nn.Module) else [part]
                for tensor in tensors:
                    tensor.requires_grad_(True)
                count += len(tensors)
    return count
