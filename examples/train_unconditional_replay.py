"""Train an unconditional DDPM the way diffusers' `train_unconditional.py` example does, recording
the replay retrac needs with `retrac.replay.Recorder`.

    python examples/train_unconditional_replay.py runs/mine --data builtin:digits --resolution 16 --epochs 4
    python examples/train_unconditional_replay.py runs/mine --epochs 8 --resume  # from the last checkpoint
    retrac index create stores/mine.zarr --run runs/mine --grid 8

What differs from diffusers' example, and why: the noise comes from `recorder.noise` (each sample's
noise drawn by retrac's noise rule from a recorded seed), every sample is trained every epoch, the
loss is kept per sample, and checkpoints are `checkpoint-N/unet` folders plus the optimizer state in
safetensors (never pickled), so `--resume` continues the same run and the same record. The UNet has
no attention blocks, so the training forward uses the same arithmetic as retrac's gradient code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from api_schemas import DatasetSpec, TrainSpec
from retrac.datasets import load_dataset
from retrac.replay import Recorder

OPTIMIZER_NAME = "optimizer.safetensors"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "output_dir", type=Path, help="the run folder (checkpoints, scheduler, replay record)"
    )
    parser.add_argument("--data", default="builtin:digits", help="a retrac dataset source")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--limit", type=int, default=None, help="first N samples only")
    parser.add_argument(
        "--epochs", type=int, default=4, help="total epochs (with --resume: including those done)"
    )
    parser.add_argument("--train-batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--save-model-epochs", type=int, default=1)
    parser.add_argument("--prediction-type", default="epsilon", choices=("epsilon", "v_prediction", "sample"))
    parser.add_argument(
        "--beta-schedule", default="linear", choices=("linear", "scaled_linear", "squaredcos_cap_v2")
    )
    parser.add_argument("--num-train-timesteps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in output_dir"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    data = DatasetSpec(source=args.data, resolution=args.resolution, channels=args.channels, limit=args.limit)
    dataset = load_dataset(data)
    spec = TrainSpec(
        dataset=data,
        preset="custom",
        loss="mse",
        epochs=args.epochs,
        batch_size=args.train_batch_size,
        lr=args.learning_rate,
        save_every=args.save_model_epochs,
        seed=args.seed,
        num_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        prediction_type=args.prediction_type,
        loss_weighting="snr" if args.prediction_type == "sample" else "none",
    )
    out = args.output_dir
    torch.manual_seed(args.seed)
    if args.resume:
        recorder = Recorder.resume(out)
        last = out / f"checkpoint-{recorder.epoch}"
        model = UNet2DModel.from_pretrained(last / "unet", use_safetensors=True)
        noise_scheduler = DDPMScheduler.from_pretrained(out / "scheduler")
    else:
        recorder = Recorder(out, dataset.ids, dataset.fingerprint, spec)
        model = UNet2DModel(
            sample_size=args.resolution,
            in_channels=args.channels,
            out_channels=args.channels,
            layers_per_block=1,
            block_out_channels=(16, 32),
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        )
        noise_scheduler = DDPMScheduler(
            num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
            prediction_type=args.prediction_type,
        )
        noise_scheduler.save_pretrained(out / "scheduler")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    if args.resume:
        load_optimizer(optimizer, load_file(last / OPTIMIZER_NAME))
    model.train()
    for epoch in range(recorder.epoch, args.epochs):
        generator = torch.Generator().manual_seed(
            args.seed * 1_000_003 + epoch
        )  # so a resumed run draws the same
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
            if args.prediction_type == "epsilon":
                target = noise
            elif args.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(clean_images, noise, timesteps)
            else:
                target = clean_images
            per_sample = F.mse_loss(model_output, target, reduction="none").flatten(1).mean(dim=1)
            if args.prediction_type == "sample":  # as diffusers' example: the MSE weighted by the SNR
                alpha_t = noise_scheduler.alphas_cumprod[timesteps].float()
                per_sample = alpha_t / (1 - alpha_t) * per_sample
            per_sample.mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            recorder.losses(ids, per_sample)
        recorder.end_epoch()
        if (epoch + 1) % args.save_model_epochs == 0 or epoch + 1 == args.epochs:
            folder = out / f"checkpoint-{epoch + 1}"
            model.save_pretrained(folder / "unet", safe_serialization=True)
            save_file(optimizer_tensors(optimizer), folder / OPTIMIZER_NAME)
            recorder.checkpoint(folder / "unet")
        print(f"epoch {epoch + 1}: loss {float(per_sample.mean()):.4f}")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's state as named tensors (safetensors holds tensors only; `step` becomes a tensor too)."""
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).clone()
    return tensors


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})


if __name__ == "__main__":
    main()
