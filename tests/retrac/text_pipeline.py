"""A tiny text-conditional pipeline saved as diffusers saves one: `text_encoder/` (a 2-layer
`CLIPTextModel`), `tokenizer/` (a `CLIPTokenizer` over a small vocabulary written here), `unet/` (a
`UNet2DConditionModel` whose cross-attention takes the text encoder's hidden states) and `scheduler/`.

Random weights from configs (nothing can be downloaded): 8 px grey images, pixel space, and captions
of the letters a-z and a few whole words, so the byte-pair tokenizer runs its merges for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SIDE, CHANNELS, HIDDEN, MAX_LENGTH = 8, 1, 16, 8
WORDS = ("red", "blue", "dot", "bar")
"""Whole words the vocabulary has one token for (by the merges below); other words go letter by letter."""
UNET_CONFIG = dict(
    sample_size=SIDE,
    in_channels=CHANNELS,
    out_channels=CHANNELS,
    block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
    attention_head_dim=4,
    cross_attention_dim=HIDDEN,
)


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of a CLIP byte-pair tokenizer: the letters, each letter ending a word
    (`a</w>`), the merges that build `WORDS`, and the start/end tokens."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1], *parts[2:]]
    tokens = [*letters, *(c + "</w>" for c in letters), *("".join(pair) for pair in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merge_file = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({token: i for i, token in enumerate(dict.fromkeys(tokens))}))
    merge_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab, merge_file


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    vocab, merges = write_tokenizer_files(folder)
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_LENGTH, pad_token="<|endoftext|>")


def save_text_pipeline(folder: Path, seed: int = 0) -> Path:
    """The pipeline folder `folder`, its weights drawn from `seed`; the text encoder's from `seed` alone."""
    tokenizer = tiny_tokenizer(folder / "_vocab")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPTextModel(config).save_pretrained(folder / "text_encoder", safe_serialization=True)
        torch.manual_seed(seed + 1)
        UNet2DConditionModel(**UNET_CONFIG).save_pretrained(folder / "unet", safe_serialization=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    for leftover in (folder / "_vocab").iterdir():
        leftover.unlink()
    (folder / "_vocab").rmdir()
    return folder


CAPTIONS = ("a red dot", "a blue bar", "red bar", "blue dot here", "a dot", "bar bar red")


def write_captioned_folder(folder: Path, captions: tuple[str, ...] = CAPTIONS, column: str = "text") -> Path:
    """An image folder of one random grey PNG per caption and its metadata.jsonl (Hugging Face
    imagefolder)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(captions):
        name = f"img-{i:02d}.png"
        Image.fromarray(generator.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)).save(folder / name)
        lines.append(json.dumps({"file_name": name, column: caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
