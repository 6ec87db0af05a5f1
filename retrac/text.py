"""Text-conditional pipelines: a frozen `transformers` text encoder turns each caption into the
`encoder_hidden_states` a `UNet2DConditionModel` cross-attends to.

A text-conditional pipeline folder, as diffusers saves Stable Diffusion's, holds `text_encoder/` (a
`CLIPTextModel`, safetensors) and `tokenizer/` beside `unet/` and `scheduler/` (and usually `vae/`,
`retrac.latents`). Each caption is encoded as diffusers' text-to-image training script encodes it:

    ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    c   = text_encoder(ids).last_hidden_state                              (L, D), no attention mask

once per caption and process (the encoder is frozen: its output never changes while its files do not;
the store fingerprints them, `fingerprint`). A query's prompt is encoded the same way. Gradients are
over the denoiser's parameters only. A caption longer than L tokens is cut there, as in training.
An index holds its captions' states in memory, `N * L * D` float32 (236 KB a sample for Stable
Diffusion 1.x's 77 x 768).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retrac.exceptions import CheckpointError
from retrac.models import sha256_file

TEXT_ENCODER_FOLDER, TOKENIZER_FOLDER = "text_encoder", "tokenizer"
"""The text encoder's and tokenizer's folders in a pipeline folder, as diffusers names them."""

TEXT_WEIGHTS = "model.safetensors"
TEXT_ENCODERS = ("CLIPTextModel",)
"""Text encoder classes retrac loads: whose `last_hidden_state` is what Stable Diffusion conditions on."""

ENCODE_CHUNK = 64
"""Captions encoded per text encoder forward: bounds its activations."""

MAX_TOKENS = 1024
"""Longest padded token sequence accepted (CLIP's is 77): an unset `model_max_length` is refused."""


@dataclass(frozen=True, eq=False)
class TextEncoder:
    """A pipeline's frozen text encoder and its tokenizer; the modules are loaded on first use."""

    encoder_folder: Path
    tokenizer_folder: Path
    settings: dict[str, Any]

    @classmethod
    def load(cls, pipeline: Path) -> TextEncoder:
        """The text encoder in `pipeline`, its files checked; a CheckpointError saying what to do
        otherwise."""
        encoder, tokenizer = pipeline / TEXT_ENCODER_FOLDER, pipeline / TOKENIZER_FOLDER
        if not (encoder / "config.json").is_file() or not (tokenizer / "tokenizer_config.json").is_file():
            raise CheckpointError(
                f"{pipeline}: the UNet is text-conditional but the pipeline has no "
                f"{TEXT_ENCODER_FOLDER}/config.json and {TOKENIZER_FOLDER}/tokenizer_config.json; save the "
                "pipeline with its text encoder and tokenizer"
            )
        settings = {k: v for k, v in json.loads((encoder / "config.json").read_text()).items()
                    if k != "transformers_version"}
        names = settings.get("architectures") or []
        if len(names) != 1 or names[0] not in TEXT_ENCODERS:
            raise CheckpointError(
                f"{encoder}: text encoder {names} is not handled; retrac encodes captions with a "
                f"{' or '.join(TEXT_ENCODERS)}"
            )
        if not (encoder / TEXT_WEIGHTS).is_file():
            raise CheckpointError(
                f"{encoder}: no {TEXT_WEIGHTS}; retrac loads safetensors only (convert pickled .bin weights "
                "first)"
            )
        return cls(encoder, tokenizer, settings)

    @property
    def hidden_size(self) -> int:
        return int(self.settings["hidden_size"])

    @functools.cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_folder, local_files_only=True)
        except Exception as error:  # transformers raises many kinds; the user needs the path and the cause
            raise CheckpointError(f"{self.tokenizer_folder}: cannot load the tokenizer: {error}") from error
        if not 1 <= tokenizer.model_max_length <= MAX_TOKENS:
            raise CheckpointError(
                f"{self.tokenizer_folder}: model_max_length {tokenizer.model_max_length} is not the padded "
                f"length of training (1..{MAX_TOKENS}); set it in tokenizer_config.json"
            )
        return tokenizer

    @functools.cached_property
    def encoder(self) -> torch.nn.Module:
        """The text encoder, in eval mode, float32, every parameter frozen."""
        import transformers

        transformers.utils.logging.disable_progress_bar()
        model_class = getattr(transformers, self.settings["architectures"][0])
        try:
            model = model_class.from_pretrained(
                self.encoder_folder, use_safetensors=True, local_files_only=True
            )
        except Exception as error:  # as above
            raise CheckpointError(f"{self.encoder_folder}: cannot load the text encoder: {error}") from error
        return model.eval().float().requires_grad_(False)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """`encoder_hidden_states` `(N, L, D)` float32 of `captions` (module docstring)."""
        states = []
        with torch.no_grad():
            for start in range(0, len(captions), ENCODE_CHUNK):
                ids = self.tokenizer(
                    list(captions[start : start + ENCODE_CHUNK]), padding="max_length",
                    max_length=self.max_length, truncation=True, return_tensors="pt",
                ).input_ids
                states.append(self.encoder(ids).last_hidden_state.float())
        return torch.cat(states).contiguous()

    def fingerprint(self) -> dict[str, str]:
        """sha256 of the text encoder (config entries and weights) and of the tokenizer's files: a store
        built with another encoder or tokenizer is stale."""
        encoder = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode())
        encoder.update(sha256_file(self.encoder_folder / TEXT_WEIGHTS).encode())
        tokenizer = hashlib.sha256()
        for file in sorted(p for p in self.tokenizer_folder.rglob("*") if p.is_file()):
            tokenizer.update(f"{file.relative_to(self.tokenizer_folder).as_posix()}:{sha256_file(file)}".encode())
        return {"text_encoder": encoder.hexdigest(), "tokenizer": tokenizer.hexdigest()}


def captions_fingerprint(captions: Sequence[str]) -> str:
    """sha256 of each sample's caption, in row order: a store built with other captions is stale."""
    return hashlib.sha256(json.dumps(list(captions)).encode()).hexdigest()
