"""Diffusion models: building diffusers UNets from named presets, and loading checkpoints safely.

A checkpoint is a diffusers folder as diffusers saves it: a model's `save_pretrained` folder
(`config.json` + `diffusion_pytorch_model.safetensors`), a pipeline folder (its `unet/`, or the
`transformer/` of a `DiTPipeline`), or a training script's `checkpoint-N/` (its `unet/`). The denoiser
is the class its config names (`DENOISER_CLASSES`): a `UNet2DModel`, a text-conditional
`UNet2DConditionModel`, or a DiT (`DiTTransformer2DModel`,
or a `Transformer2DModel` in DiT's patched, class-conditional form). Weights are only ever read from
safetensors, never unpickled. The noise schedule is diffusers' own scheduler object, loaded from a
`scheduler_config.json` (found beside the checkpoint, or given): noising and training targets call
its `add_noise` and `get_velocity`, so every schedule its config describes is reproduced exactly.
Anything else (another scheduler class, learned variances) is refused, never approximated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch
from accelerate import init_empty_weights
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.attention_processor import Attention, AttnProcessor
from safetensors import safe_open

from api_schemas import PredictionType
from retrac.exceptions import CheckpointError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler_config.json"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
"""A LoRA adapter folder's files: peft's `save_pretrained` pair, or diffusers' `save_lora_weights` file."""

Scheduler: TypeAlias = DDPMScheduler | DDIMScheduler
SCHEDULER_CLASSES: dict[str, type[Scheduler]] = {
    "DDPMScheduler": DDPMScheduler,
    "DDIMScheduler": DDIMScheduler,
}
"""Scheduler classes whose `add_noise`/`get_velocity` define the DDPM training objective retrac replays."""

PREDICTION_TYPES: tuple[PredictionType, ...] = ("epsilon", "v_prediction", "sample")

Denoiser: TypeAlias = UNet2DModel | UNet2DConditionModel | DiTTransformer2DModel | Transformer2DModel
DENOISER_CLASSES: dict[str, type[Denoiser]] = {
    "UNet2DModel": UNet2DModel,
    "UNet2DConditionModel": UNet2DConditionModel,
    "DiTTransformer2DModel": DiTTransformer2DModel,
    "Transformer2DModel": Transformer2DModel,
}
"""The denoiser classes a checkpoint's config may name (`_class_name`; none named: a UNet2DModel).
Each takes `(sample, timestep=..., class_labels=...)` (a text-conditional `UNet2DConditionModel`
`encoder_hidden_states=...` instead, `retrac.text`) and returns its prediction as `.sample`."""
DENOISER_FOLDERS = ("unet", "transformer")
"""The denoiser's folder in a pipeline folder: `unet/` (DDPM and latent pipelines), `transformer/` (DiT)."""

PRESETS: dict[str, dict[str, Any]] = {
    # ~45k parameters: for tests that train and score in seconds.
    "micro": dict(
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
    ),
    # ~0.7M parameters at 16x16x1: the "tiny" model of the benchmarks and the demo.
    "tiny": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    ),
    # ~4.4M parameters at 32x32x3, one attention level: the "small" model of the benchmarks.
    "small": dict(
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=16,
    ),
}


def build_unet(
    preset: str, *, resolution: int, channels: int, seed: int = 0, num_class_embeds: int | None = None
) -> UNet2DModel:
    """A freshly initialised UNet of a named preset, with weights drawn from `seed`; with
    `num_class_embeds`, class-conditional (a class embedding added to the timestep embedding)."""
    if preset not in PRESETS:
        raise CheckpointError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=resolution, in_channels=channels, out_channels=channels,
            num_class_embeds=num_class_embeds, **PRESETS[preset],
        )
    return with_plain_attention(unet)


def class_conditioning(architecture: dict[str, Any]) -> int | None:
    """How many class labels a denoiser with `architecture` takes: a DiT's `num_embeds_ada_norm` (its
    label table, which also holds a null class after them); a UNet's `num_class_embeds` for a class
    embedding table, 0 for `class_embed_type="timestep"` (any integer label, sinusoidally embedded),
    None for an unconditional UNet. Class embeddings that take vectors, not labels, are refused."""
    if architecture.get("num_embeds_ada_norm") is not None:
        return int(architecture["num_embeds_ada_norm"])
    kind, count = architecture.get("class_embed_type"), architecture.get("num_class_embeds")
    if kind is None:
        return int(count) if count is not None else None
    if kind == "timestep":
        return 0
    raise CheckpointError(
        f"the UNet's class_embed_type {kind!r} takes embedding vectors, not class labels; retrac handles "
        "class-conditional UNets with num_class_embeds (a class embedding table) or class_embed_type "
        "'timestep'"
    )


_TEXT_UNSUPPORTED = (
    "addition_embed_type",
    "class_embed_type",
    "num_class_embeds",
    "encoder_hid_dim_type",
    "time_cond_proj_dim",
)
"""UNet2DConditionModel options that take inputs beside the text's hidden states (SDXL's added time and
text embeddings, class labels, image embeddings, a guidance embedding): retrac has none of them to give."""


def text_conditioning(path: str | Path, architecture: dict[str, Any]) -> int | None:
    """The hidden size a text-conditional UNet's cross-attention takes (`cross_attention_dim`), or None
    for any other denoiser; a CheckpointError for options that need inputs retrac cannot give."""
    if denoiser_class(path) is not UNet2DConditionModel:
        return None
    used = [k for k in _TEXT_UNSUPPORTED if architecture.get(k) is not None]
    if used:
        raise CheckpointError(
            f"{path}: the UNet2DConditionModel sets {', '.join(used)}, which take inputs beside the text "
            "encoder's hidden states; retrac handles UNets conditioned on the text alone"
        )
    width = architecture.get("cross_attention_dim")
    if not isinstance(width, int):
        raise CheckpointError(
            f"{path}: cross_attention_dim {width!r} differs between blocks; retrac handles one text width"
        )
    return width


def pipeline_folder(checkpoint: str | Path) -> Path | None:
    """The pipeline folder a checkpoint belongs to: the nearest of the checkpoint folder, its parent and
    grandparent (a pipeline folder, its `unet/`, a training script's `checkpoint-N/unet`) that holds
    `model_index.json` or `scheduler/`; None if none does. Its other parts (`vae/`, `text_encoder/`)
    lie there, as diffusers saves them."""
    folder = Path(checkpoint)
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / "model_index.json").is_file() or (candidate / "scheduler").is_dir():
            return candidate
    return None


def with_plain_attention(unet: Denoiser) -> Denoiser:
    """Switch attention to the plain matmul-softmax processor, in place.

    torch.func has no batching rule for the fused CPU attention kernel and falls back to a slow
    per-sample loop under vmap; the plain processor batches cleanly. Training and gradient code
    both use it, so a replayed loss is computed with the same arithmetic as the training step.
    """
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    return unet


def architecture(config: Any) -> dict[str, Any]:
    """The config entries that fix the parameter layout; two models with equal ones are compatible."""
    return {k: _jsonable(v) for k, v in sorted(dict(config).items()) if not k.startswith("_")}


def read_architecture(path: str | Path) -> dict[str, Any]:
    """`architecture()` of a checkpoint folder, read from its config.json without loading weights."""
    config = _model_folder(path) / "config.json"
    if not config.is_file():
        raise _no_config(path)
    return architecture(json.loads(config.read_text()))


def require_weights(path: str | Path) -> Path:
    """The denoiser folder of `path`, after checking that it has a config of a denoiser retrac
    handles (`denoiser_class`) and safetensors weights."""
    folder = _model_folder(path)
    if not (folder / "config.json").is_file():
        raise _no_config(path)
    denoiser_class(path)
    if not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(
            f"{path}: no {WEIGHTS_NAME}; retrac loads safetensors only (convert pickled .bin weights first)"
        )
    check_weight_keys(path, weight_shapes(folder / WEIGHTS_NAME), expected_shapes(folder))
    return folder


def _no_config(path: str | Path) -> CheckpointError:
    """The error for a folder without config.json: a LoRA adapter's says to give its base model."""
    folder = Path(path)
    if any((folder / name).is_file() for name in (PEFT_CONFIG, DIFFUSERS_WEIGHTS)):
        return CheckpointError(
            f"{path}: a LoRA adapter, not a diffusers model folder (no config.json); index it with its base "
            "model: --base BASE (a pipeline folder or its unet/; base in a spec)"
        )
    return CheckpointError(f"{path}: not a diffusers model folder (no config.json)")


def weight_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's name and shape in a safetensors file, read from its header (no weights loaded)."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # a truncated or foreign file: safetensors raises its own kinds
        raise CheckpointError(f"{file}: not a readable safetensors file: {error}") from error


def expected_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The state-dict names and shapes the denoiser that `folder`'s config describes has, from a model
    built on the meta device (no memory for weights)."""
    config = json.loads((folder / "config.json").read_text())
    with init_empty_weights():
        model = denoiser_class(folder).from_config(config)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


PEFT_MARKERS = (".base_layer.", ".lora_A.", ".lora_B.", ".lora_magnitude_vector.")
"""Name parts of a peft-wrapped layer's tensors (`to_q.base_layer.weight`, `to_q.lora_A.default.weight`)."""


def check_weight_keys(
    path: str | Path, found: dict[str, tuple[int, ...]], expect: dict[str, tuple[int, ...]]
) -> None:
    """A CheckpointError if the weights file's tensors are not exactly those the config's model has:
    missing ones would be randomly initialised, unexpected ones dropped, mis-shaped ones fail later.
    The message names a few keys and, for a peft-wrapped model, what it is and how to index it."""
    missing = sorted(set(expect) - set(found))
    unexpected = sorted(set(found) - set(expect))
    misshaped = sorted(k for k in set(found) & set(expect) if found[k] != expect[k])
    if not (missing or unexpected or misshaped):
        return
    if any(marker in key for key in unexpected for marker in PEFT_MARKERS):
        example = next(key for key in unexpected if any(marker in key for marker in PEFT_MARKERS))
        raise CheckpointError(
            f"{path}: a peft-wrapped model (keys like {example}), "
            "not the plain denoiser its config describes; "
            "merge the adapter into its base (peft's merge_and_unload) and save the merged model with "
            "save_pretrained, then index that folder"
        )
    parts = [
        f"{len(keys)} {what} (e.g. {', '.join(shown(k) for k in keys[:3])})"
        for what, keys, shown in (
            ("missing", missing, str),
            ("unexpected", unexpected, str),
            ("mis-shaped", misshaped, lambda k: f"{k} {list(found[k])} for {list(expect[k])}"),
        )
        if keys
    ]
    raise CheckpointError(
        f"{path}: the weights do not match the config's model: {'; '.join(parts)}; "
        "save the model with diffusers' save_pretrained, its config and weights together"
    )


def denoiser_class(path: str | Path) -> type[Denoiser]:
    """The diffusers class of the denoiser in `path`, from its config's `_class_name`; a CheckpointError
    for another class, or a `Transformer2DModel` that is not a DiT (patched, `ada_norm_zero`, labels)."""
    config = json.loads((_model_folder(path) / "config.json").read_text())
    name = config.get("_class_name", "UNet2DModel")
    if name not in DENOISER_CLASSES:
        raise CheckpointError(
            f"{path}: a {name} is not handled; retrac attributes {', '.join(DENOISER_CLASSES)} denoisers"
        )
    dit_form = config.get("patch_size") is not None and config.get("norm_type") == "ada_norm_zero"
    if name == "Transformer2DModel" and not (dit_form and config.get("cross_attention_dim") is None):
        raise CheckpointError(
            f"{path}: a Transformer2DModel that is not DiT's patched, class-conditional form (patch_size, "
            "norm_type ada_norm_zero, no cross attention) is not handled"
        )
    return DENOISER_CLASSES[name]


def load_unet(path: str | Path, *, expect: dict[str, Any] | None = None) -> Denoiser:
    """Load a diffusers denoiser folder (a UNet or a DiT) from safetensors, in eval mode, float32.

    `expect` is an `architecture()` the checkpoint must match (all checkpoints of one index must
    share one parameter layout, or their gradients could not be compared). Built on the meta device
    and filled from the file (accelerate's low-memory path): the weights are held once, not twice;
    `require_weights` has checked that the file fills every tensor.
    """
    folder = require_weights(path)
    try:
        model = denoiser_class(path).from_pretrained(
            folder, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=True
        )
    except Exception as error:  # diffusers raises many kinds; the user needs the path and the cause
        raise CheckpointError(f"{path}: cannot load the denoiser: {error}") from error
    if expect is not None:
        check_architecture(path, architecture(model.config), expect)
    return with_plain_attention(model.eval().float())


def load_scheduler(folder: str | Path) -> Scheduler:
    """The diffusers scheduler saved in `folder` (a folder with `scheduler_config.json`).

    A folder without a config, another scheduler class or an unknown prediction type is a
    CheckpointError: a guessed schedule would give silently wrong gradients.
    """
    config_file = Path(folder) / SCHEDULER_CONFIG
    if not config_file.is_file():
        raise CheckpointError(
            f"{folder}: no {SCHEDULER_CONFIG}; give a scheduler folder as diffusers saves it"
        )
    config = json.loads(config_file.read_text())
    name = config.get("_class_name")
    if name not in SCHEDULER_CLASSES:
        raise CheckpointError(
            f"{folder}: scheduler {name!r} is not handled; give --scheduler DIR with a DDPMScheduler or "
            "DDIMScheduler config of the schedule the model was trained with"
        )
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise CheckpointError(
            f"{folder}: prediction type {prediction!r} is not one of {list(PREDICTION_TYPES)}"
        )
    try:
        return SCHEDULER_CLASSES[name].from_pretrained(folder, local_files_only=True)
    except Exception as error:  # diffusers raises many kinds; the user needs the path and the cause
        raise CheckpointError(f"{folder}: cannot load the scheduler: {error}") from error


def find_scheduler(checkpoint: str | Path) -> Path:
    """The `scheduler/` folder diffusers saves beside a checkpoint: in a pipeline folder, beside a
    `unet/` folder, or in the output folder above `checkpoint-N/`. None found is a CheckpointError."""
    folder = Path(checkpoint)
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / "scheduler" / SCHEDULER_CONFIG).is_file():
            return candidate / "scheduler"
    raise CheckpointError(
        f"{checkpoint}: no scheduler/{SCHEDULER_CONFIG} beside the checkpoint; give --scheduler DIR "
        "(the folder with the scheduler_config.json the model was trained with)"
    )


def sample_shape(architecture: dict[str, Any]) -> tuple[int, int]:
    """(channels, resolution) of the images a UNet with `architecture` was built for."""
    size = architecture.get("sample_size")
    if isinstance(size, list):
        if len(set(size)) != 1:
            raise CheckpointError(
                f"the UNet's sample_size {size} is not square; retrac handles square images"
            )
        size = size[0]
    if not isinstance(size, int):
        raise CheckpointError(
            "the UNet config has no sample_size; cannot tell the image size it was trained at"
        )
    return int(architecture.get("in_channels", 3)), size


def weights_file(path: str | Path) -> Path:
    """The safetensors weights file of a checkpoint folder (a UNet, pipeline or `checkpoint-N` folder)."""
    return _model_folder(path) / WEIGHTS_NAME


def scheduler_settings(folder: str | Path) -> dict[str, Any]:
    """The entries of the scheduler config in `folder` that fix the schedule (`config_settings`)."""
    return config_settings(Path(folder) / SCHEDULER_CONFIG)


def config_settings(file: Path) -> dict[str, Any]:
    """The entries of a diffusers config file: all but the diffusers version that saved it, so a
    config saved again by another diffusers compares equal."""
    config = json.loads(file.read_text())
    return {k: _jsonable(v) for k, v in sorted(config.items()) if k != "_diffusers_version"}


def sha256_file(file: Path) -> str:
    """sha256 of a file's bytes, read in blocks (weights files can be large)."""
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_checkpoint(path: str | Path) -> str:
    """sha256 of the config and weights files together, as format-2 stores before per-input
    fingerprints recorded a checkpoint (`storage.freshness` still compares old stores by it)."""
    folder = _model_folder(path)
    digest = hashlib.sha256()
    for name in ("config.json", WEIGHTS_NAME):
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class DiffusionModel:
    """A denoiser (a UNet or a DiT, named `unet` throughout) and the diffusers scheduler it was trained
    with: what every gradient needs."""

    unet: Denoiser
    scheduler: Scheduler

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> PredictionType:
        return self.scheduler.config.prediction_type

    @classmethod
    def from_parts(cls, unet: Denoiser, scheduler: Scheduler) -> DiffusionModel:
        check_compatible(architecture(unet.config), scheduler)
        return cls(unet=unet, scheduler=scheduler)

    def to(self, device: torch.device | str) -> DiffusionModel:
        return DiffusionModel(self.unet.to(device), self.scheduler)


def check_compatible(unet_architecture: dict[str, Any], scheduler: Scheduler) -> None:
    """A CheckpointError if the UNet's output is not exactly the scheduler's prediction."""
    if type(scheduler).__name__ not in SCHEDULER_CLASSES:
        raise CheckpointError(
            f"scheduler {type(scheduler).__name__} is not handled; use a DDPM or DDIM scheduler"
        )
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise CheckpointError(
            f"prediction type {scheduler.config.prediction_type!r} is not one of {list(PREDICTION_TYPES)}"
        )
    channels_in, channels_out = unet_architecture.get("in_channels"), unet_architecture.get("out_channels")
    if channels_out is None and unet_architecture.get("patch_size") is not None:
        channels_out = channels_in  # a DiT's default: as many channels out as in
    if channels_in != channels_out:
        raise CheckpointError(
            f"the denoiser maps {channels_in} channels to {channels_out} (learned variances, as DiT's "
            "learned-sigma split, are trained with a variational-bound term besides the prediction loss); "
            "retrac handles models whose output is the prediction alone (out_channels = in_channels)"
        )


def check_architecture(path: str | Path, found: dict[str, Any], expect: dict[str, Any]) -> None:
    """A CheckpointError naming the differing config entries, if `found` is not `expect`."""
    differing = sorted(k for k in set(expect) | set(found) if expect.get(k) != found.get(k))
    if differing:
        raise CheckpointError(
            f"{path}: a checkpoint of another architecture (config differs in {', '.join(differing)}); "
            "all checkpoints of an index must share one architecture"
        )


def _model_folder(path: str | Path) -> Path:
    """The denoiser folder itself, also when `path` is a full pipeline folder with a `unet/` or
    `transformer/` inside."""
    folder = Path(path)
    if not (folder / "config.json").exists():
        for name in DENOISER_FOLDERS:
            if (folder / name).is_dir():
                return folder / name
    return folder


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))
