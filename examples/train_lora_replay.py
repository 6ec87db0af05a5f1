"""Fine-tune a LoRA adapter of a frozen diffusers UNet the way diffusers' `train_text_to_image_lora.py`
does (peft's LoraConfig on the attention projections, Gaussian init, the base frozen), recording the
replay retrac needs with `retrac.replay.Recorder`.

    python examples/train_lora_replay.py runs/lora --data builtin:digits --resolution 8 --epochs 4
    retrac index create stores/lora.zarr --run runs/lora --base runs/lora/base --grid 8

Without `--base` the base is a tiny random UNet2DModel with attention, saved to `runs/lora/base` (a
stand-in for a pretrained model: nothing can be downloaded). What differs from diffusers' script, and
why: the noise comes from `recorder.noise` (each sample's noise drawn by retrac's noise rule from a
recorded seed), every sample is trained every epoch, the loss is kept per sample, attention runs the
plain processor (the arithmetic of retrac's gradient code), and each checkpoint saves the adapter
alone, `checkpoint-N/` in peft's format (`save_pretrained`: adapter_config.json and safetensors).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor
from peft import LoraConfig, get_peft_model

from api_schemas import DatasetSpec, TrainSpec
from retrac.datasets import load_dataset
from retrac.replay import Recorder


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("output_dir", type=Path, help="the run folder (adapters, scheduler, replay record)")
    parser.add_argument("--base", type=Path, default=None, help="a pipeline folder (unet/ and scheduler/)")
    parser.add_argument("--data", default="builtin:digits", help="a retrac dataset source")
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="first N samples only")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=4, help="the LoRA rank (alpha = rank, as diffusers')")
    parser.add_argument("--save-model-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def tiny_base(folder: Path, resolution: int, seed: int) -> Path:
    """A random UNet2DModel with attention and a DDPM scheduler, saved as a pipeline folder's parts."""
    torch.manual_seed(seed)
    UNet2DModel(
        sample_size=resolution, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).save_pretrained(folder / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return folder


def main() -> None:
    args = parse_args()
    out = args.output_dir
    base = args.base or tiny_base(out / "base", args.resolution, args.seed)
    unet = UNet2DModel.from_pretrained(str(base / "unet"), use_safetensors=True)  # a str: for peft's card
    noise_scheduler = DDPMScheduler.from_pretrained(base / "scheduler")
    noise_scheduler.save_pretrained(out / "scheduler")  # the run's schedule, where a retrac run keeps it
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    data = DatasetSpec(
        source=args.data, resolution=args.resolution, channels=unet.config.in_channels, limit=args.limit
    )
    dataset = load_dataset(data)
    spec = TrainSpec(
        dataset=data, preset="custom", loss="mse", epochs=args.epochs, batch_size=args.train_batch_size,
        lr=args.learning_rate, save_every=args.save_model_epochs, seed=args.seed,
        num_timesteps=noise_scheduler.config.num_train_timesteps,
    )
    recorder = Recorder(out, dataset.ids, dataset.fingerprint, spec)
    torch.manual_seed(args.seed)
    lora = LoraConfig(
        r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0"],
    )
    model = get_peft_model(unet, lora)  # the base frozen, the adapter's factors trainable
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    model.train()
    for epoch in range(args.epochs):
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        order = torch.randperm(len(dataset), generator=generator)
        for start in range(0, len(dataset), args.train_batch_size):
            rows = order[start : start + args.train_batch_size]
            clean_images = dataset.images[rows]
            ids = [dataset.ids[i] for i in rows.tolist()]
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (len(rows),), generator=generator
            )
            noise = recorder.noise(ids, timesteps, clean_images.shape[1:])
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            model_output = model(noisy_images, timesteps).sample
            per_sample = F.mse_loss(model_output, noise, reduction="none").flatten(1).mean(dim=1)
            per_sample.mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            recorder.losses(ids, per_sample)
        recorder.end_epoch()
        if (epoch + 1) % args.save_model_epochs == 0 or epoch + 1 == args.epochs:
            folder = out / f"checkpoint-{epoch + 1}"
            model.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors
            recorder.checkpoint(folder)
        print(f"epoch {epoch + 1}: loss {float(per_sample.mean()):.4f}")


if __name__ == "__main__":
    main()
