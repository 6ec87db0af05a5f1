"""Models as diffusers saves them, every prediction type and schedule, against a brute force.

The reference is written from the formulas with plain diffusers and autograd (no retrac code):
`x_t = sqrt(a) x + sqrt(1 - a) eps` with `a` the scheduler's `alphas_cumprod[t]`, and the target
`eps`, `sqrt(a) eps - sqrt(1 - a) x` (velocity) or `x` (sample), the squared error weighted by 1 or
by the SNR `a / (1 - a)` (diffusers' train_unconditional.py for sample prediction). Three layouts are
indexed: a `retrac train` run with replay, a `DDPMPipeline.save_pretrained` folder and a training script's
`checkpoint-N/unet` folders (no replay: the slots the plan chose are read back as data).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, PNDMScheduler, UNet2DModel
from PIL import Image

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, ProjectorSpec, QuerySpec, SlotSpec, TrainSpec
from retrac.attribution import Attributor
from retrac.datasets import load_dataset
from retrac.exceptions import RetracError
from retrac.losses import noised, target
from retrac.models import load_scheduler
from retrac.plan import IndexPlan
from retrac.replay import TrainingRun
from retrac.training import train

torch.set_num_threads(1)

DATA = DatasetSpec(source="builtin:digits", resolution=8, limit=10)
K, M, SEED = 4, 2, 7
RELATIVE_ERROR = 1e-4
"""Bound on max |engine - reference| / max |reference|: float32 sums over ~45k parameters, taken in a
different order by the batched engine (a few 1e-6 relative), with room to spare."""

SCHEDULES = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "trained_betas": dict(trained_betas=torch.linspace(1e-4, 0.05, 1000).tolist()),
    "zero_snr": dict(beta_schedule="linear", rescale_betas_zero_snr=True),
}


def brute_force(
    unets: list[UNet2DModel],
    weights: list[float],
    slots: list[list[list[tuple[int, int]]]],
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    queries: torch.Tensor,
    weighting: str,
) -> dict[str, torch.Tensor]:
    """(N, Q) TracIn and ReTrac scores, one autograd call per gradient; `slots[c][n]` is sample n's
    (timestep, seed) list at checkpoint c; a sample's score is the mean over its slots."""
    alpha_bar = scheduler.alphas_cumprod.double()
    kind = scheduler.config.prediction_type
    n, q = images.shape[0], queries.shape[0]
    scores = {
        "tracin": torch.zeros(n, q, dtype=torch.float64),
        "retrac": torch.zeros(n, q, dtype=torch.float64),
    }
    grid = [
        math.floor(v)
        for v in torch.linspace(1, scheduler.config.num_train_timesteps - 1, K, dtype=torch.float64).tolist()
    ]
    for unet, weight, checkpoint_slots in zip(unets, weights, slots, strict=True):
        params = [p for p in unet.parameters() if p.requires_grad]

        def gradient(image: torch.Tensor, t: int, noises: list[torch.Tensor]) -> torch.Tensor:
            a = float(alpha_bar[t])
            weight = a / (1 - a) if weighting == "snr" else 1.0
            losses = []
            for eps in noises:
                x_t = math.sqrt(a) * image + math.sqrt(1 - a) * eps
                wanted = {
                    "epsilon": eps,
                    "v_prediction": math.sqrt(a) * eps - math.sqrt(1 - a) * image,
                    "sample": image,
                }[kind]
                losses.append(
                    weight * (unet(x_t[None].float(), torch.tensor([t])).sample[0] - wanted).square().mean()  # noqa: B023 (called within this iteration only)
                )
            grads = torch.autograd.grad(torch.stack(losses).mean(), params)  # noqa: B023 (called within this iteration only)
            return torch.cat([g.flatten() for g in grads]).double()

        def eps_of(seed: int) -> torch.Tensor:
            return torch.randn(images.shape[1:], generator=torch.Generator("cpu").manual_seed(seed))

        train_side = [[gradient(images[i], t, [eps_of(s)]) for t, s in checkpoint_slots[i]] for i in range(n)]
        for j in range(q):
            generator = torch.Generator("cpu").manual_seed(SEED)
            hs = [
                gradient(
                    queries[j], t, [torch.randn(images.shape[1:], generator=generator) for _ in range(M)]
                )
                for t in grid
            ]
            tracin_query = torch.stack(hs).mean(0)
            retrac_query = torch.stack([h / h.norm() for h in hs]).mean(0)
            for i in range(n):
                g = torch.stack(train_side[i])
                scores["tracin"][i, j] += weight * float((g @ tracin_query).mean())
                scores["retrac"][i, j] += weight * float(
                    ((g / g.norm(dim=1, keepdim=True)) @ retrac_query).mean()
                )
    return scores


def engine_scores(plan: IndexPlan, queries: torch.Tensor) -> dict[str, torch.Tensor]:
    results = Attributor(plan).attribute(
        queries, QuerySpec(timesteps=K, draws=M, seed=SEED), top_k=len(plan.dataset)
    )
    position = {s: i for i, s in enumerate(plan.dataset.ids)}
    table = {m: torch.zeros(len(position), len(results), dtype=torch.float64) for m in ("tracin", "retrac")}
    for j, result in enumerate(results):
        for method in table:
            for influence in result.methods[method].proponents:
                table[method][position[influence.sample_id], j] = influence.score
    return table


def relative_error(
    plan: IndexPlan, unets: list[UNet2DModel], scheduler: DDPMScheduler, queries: torch.Tensor
) -> float:
    """max relative error of the plan's exact scores against the brute force, both methods."""
    slots = []
    for c in range(len(plan.checkpoints)):
        timesteps, seeds = plan.slots(c, slice(0, plan.num_rows))
        slots.append(
            [list(zip(timesteps[i].tolist(), seeds[i].tolist(), strict=True)) for i in range(plan.num_rows)]
        )
    expected = brute_force(
        unets, plan.weights, slots, scheduler, plan.dataset.images, queries, plan.loss_weighting
    )
    got = engine_scores(plan, queries)
    return max(float((got[m] - expected[m]).abs().max() / expected[m].abs().max()) for m in got)


@pytest.fixture(scope="module")
def dataset():
    return load_dataset(DATA)


def trained(tmp: Path, prediction: str, schedule: str, weighting: str = "none") -> Path:
    spec = TrainSpec(
        dataset=DATA, preset="micro", loss="mse", epochs=2, batch_size=5, lr=2e-3, save_every=1, seed=1,
        prediction_type=prediction, beta_schedule=schedule, loss_weighting=weighting,
    )
    return train(spec, load_dataset(DATA), tmp / "run").folder


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"], ids=["linear", "cosine"])
@pytest.mark.parametrize(
    ("prediction", "weighting"),
    [("epsilon", "none"), ("v_prediction", "none"), ("sample", "none"), ("sample", "snr")],
)
def test_exact_scores_equal_brute_force_for_every_layout(
    tmp_path, dataset, prediction, weighting, schedule
) -> None:
    run = trained(tmp_path, prediction, schedule, weighting)
    scheduler = DDPMScheduler.from_pretrained(run / "scheduler")
    assert scheduler.config.prediction_type == prediction
    queries = torch.stack([dataset.images[2], torch.flip(dataset.images[5], dims=[-1])])
    identity = ProjectorSpec(kind="identity")
    unets = [UNet2DModel.from_pretrained(run / "checkpoints" / f"epoch-{e:04d}").eval() for e in (1, 2)]
    errors = {}

    # 1. the run of `retrac train`, replayed steps
    plan = IndexPlan.resolve(
        IndexSpec(dataset=DATA, run=str(run), slots=SlotSpec(replay=True), projector=identity)
    )
    assert (plan.prediction_type, plan.loss_weighting) == (prediction, weighting)
    errors["replay"] = relative_error(plan, unets, scheduler, queries)

    # 2. a DDPMPipeline folder, its scheduler found inside; no replay
    pipeline = tmp_path / "pipeline"
    DDPMPipeline(unet=unets[1], scheduler=scheduler).save_pretrained(pipeline)
    external = dict(
        dataset=DATA,
        loss="mse",
        loss_weighting=weighting,
        slots=SlotSpec(replay=False, grid=2, random=1, seed=3),
        projector=identity,
    )
    plan = IndexPlan.resolve(
        IndexSpec(checkpoints=(CheckpointSpec(path=str(pipeline), weight=0.5),), **external)
    )
    assert plan.scheduler_folder == pipeline / "scheduler"
    errors["pipeline"] = relative_error(plan, unets[1:], scheduler, queries)

    # 3. checkpoint-N/unet folders of a training script, the scheduler in the output folder above
    output = tmp_path / "output"
    scheduler.save_pretrained(output / "scheduler")
    for e, unet in zip((1, 2), unets, strict=True):
        unet.save_pretrained(output / f"checkpoint-{e}" / "unet")
    given = tuple(
        CheckpointSpec(path=str(output / f"checkpoint-{e}" / "unet"), epoch=e, lr=2e-3) for e in (1, 2)
    )
    plan = IndexPlan.resolve(IndexSpec(checkpoints=given, train_batch_size=5, **external))
    assert plan.weights == pytest.approx([2e-3 * 5 / len(dataset)] * 2)
    errors["checkpoints"] = relative_error(plan, unets, scheduler, queries)

    print(
        f"\n{prediction:>12} {weighting:>4} {schedule:>18} "
        + " ".join(f"{k}={v:.2e}" for k, v in errors.items())
    )
    assert max(errors.values()) < RELATIVE_ERROR, errors


@pytest.mark.parametrize("kind", [DDPMScheduler, DDIMScheduler], ids=["ddpm", "ddim"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_noising_and_targets_are_the_schedulers_own(tmp_path, kind, schedule) -> None:
    kind(num_train_timesteps=1000, prediction_type="v_prediction", **SCHEDULES[schedule]).save_pretrained(
        tmp_path
    )
    loaded = load_scheduler(tmp_path)
    reference = kind.from_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 6, 3, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(
        noised(x0, timesteps, noise, loaded), reference.add_noise(x0, noise, timesteps), rtol=0, atol=0
    )
    torch.testing.assert_close(
        target(x0, timesteps, noise, loaded), reference.get_velocity(x0, noise, timesteps), rtol=0, atol=0
    )
    a = reference.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)  # and from the formula
    torch.testing.assert_close(noised(x0, timesteps, noise, loaded), a.sqrt() * x0 + (1 - a).sqrt() * noise)


def external_spec(path: Path, **fields) -> IndexSpec:
    return IndexSpec(
        dataset=fields.pop("dataset", DATA),
        checkpoints=(CheckpointSpec(path=str(path), weight=1.0),),
        loss="mse",
        slots=SlotSpec(replay=False, grid=2),
        **fields,
    )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, dataset) -> Path:
    """An epsilon pipeline folder of an 8x8 grey micro model."""
    run = trained(tmp_path_factory.mktemp("refusals"), "epsilon", "linear")
    folder = run.parent / "pipeline"
    DDPMPipeline(
        unet=UNet2DModel.from_pretrained(run / "checkpoints" / "epoch-0002"),
        scheduler=DDPMScheduler.from_pretrained(run / "scheduler"),
    ).save_pretrained(folder)
    return folder


def refusal(spec: IndexSpec) -> str:
    with pytest.raises(RetracError) as caught:
        IndexPlan.resolve(spec)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_folder_without_a_scheduler_is_refused(tmp_path, pipeline) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(pipeline / "unet", bare / "unet")
    assert "give --scheduler DIR" in refusal(external_spec(bare))
    assert "no scheduler_config.json" in refusal(external_spec(bare, scheduler=str(tmp_path)))


def test_another_scheduler_class_is_refused(tmp_path, pipeline) -> None:
    PNDMScheduler().save_pretrained(tmp_path / "pndm")
    assert "'PNDMScheduler' is not handled" in refusal(
        external_spec(pipeline, scheduler=str(tmp_path / "pndm"))
    )


def test_learned_variances_are_refused(tmp_path, pipeline) -> None:
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "learned" / "unet")
    shutil.copytree(pipeline / "scheduler", tmp_path / "learned" / "scheduler")
    assert "maps 1 channels to 2" in refusal(external_spec(tmp_path / "learned"))


def test_a_dataset_of_another_shape_is_refused_naming_both(pipeline) -> None:
    message = refusal(
        external_spec(
            pipeline, dataset=DatasetSpec(source="builtin:digits", resolution=16, channels=3, limit=4)
        )
    )
    assert "3x16x16" in message
    assert "1x8x8" in message


def test_cli_indexes_a_pipeline_folder_with_its_shape_schedule_and_weights(
    tmp_path, pipeline, capsys
) -> None:
    from cli import main

    store = tmp_path / "store.zarr"
    checkpoint = f"{pipeline}:epoch=2,lr=0.002"
    assert main(["index", "create", str(store), "--checkpoint", checkpoint, "--train-batch-size", "5",
                 "--data", "builtin:digits", "--limit", "10", "--loss", "mse", "--no-replay", "--grid",
                 "2", "--slot-noise", "independent"]) == 0
    capsys.readouterr()
    assert main(["index", "inspect", str(store), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scheduler"] == {"folder": str(pipeline / "scheduler"), "prediction_type": "epsilon"}
    assert report["spec"]["dataset"]["resolution"] == 8
    assert report["spec"]["dataset"]["channels"] == 1
    assert report["checkpoints"][0]["weight"] == pytest.approx(2e-3 * 5 * 2 / 10)


def test_cli_sample_prediction_needs_its_weighting_and_inspect_shows_it(tmp_path, capsys) -> None:
    from cli import main

    run = tmp_path / "run"
    assert main(["train", str(run), "--data", "builtin:digits", "--resolution", "8", "--limit", "10",
                 "--preset", "micro", "--epochs", "1", "--prediction-type", "sample", "--loss-weighting",
                 "snr"]) == 0
    assert TrainingRun.load(run).spec.loss_weighting == "snr"
    folder = f"{run / 'checkpoints' / 'epoch-0001'}:weight=1"
    external = ["--checkpoint", folder, "--scheduler", str(run / "scheduler"), "--data", "builtin:digits",
                "--limit", "10", "--loss", "mse", "--no-replay", "--grid", "2", "--slot-noise", "independent"]
    capsys.readouterr()
    assert main(["index", "create", str(tmp_path / "refused.zarr"), *external]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert "declare the weighting it was trained with: --loss-weighting snr or none" in error[0]
    for name, flags in (
        ("external.zarr", [*external, "--loss-weighting", "snr"]),
        ("run.zarr", ["--run", str(run)]),
    ):
        assert main(["index", "create", str(tmp_path / name), *flags]) == 0
        capsys.readouterr()
        assert main(["index", "inspect", str(tmp_path / name), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["scheduler"]["prediction_type"], report["loss_weighting"]) == ("sample", "snr")


def test_cli_index_create_says_what_loading_the_images_converted(tmp_path, pipeline, capsys) -> None:
    from cli import main

    folder = tmp_path / "rgb"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 70 * i, np.uint8)).save(folder / f"{i}.png")
    assert main(["index", "create", str(tmp_path / "s.zarr"), "--checkpoint", str(pipeline), "--data",
                 str(folder), "--loss", "mse", "--no-replay", "--grid", "1",
                 "--slot-noise", "independent"]) == 0
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [
        "notice: rgb: 3 of 3 converted from RGB to grey (ITU-R BT.601 luma); rgb: 3 of 3 resized from 16x16 "
        "to 8x8 px (bilinear)"
    ]


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--scheduler", "{tmp}"], "no scheduler_config.json"),
        (["--resolution", "16"], "but the model takes 1x8x8"),
        (
            ["--checkpoint", "{pipeline}:epoch=2"],
            "every checkpoint a weight, or every checkpoint an epoch and a learning rate",
        ),
        (["--checkpoint", "{pipeline}:epoch=2,lr=0.1"], "give --train-batch-size B"),
        (["--checkpoint", "{pipeline}:speed=2"], "unknown checkpoint option 'speed'"),
    ],
    ids=["scheduler-without-config", "shape", "epoch-without-lr", "no-batch-size", "bad-option"],
)
def test_cli_refuses_at_create_in_one_line(tmp_path, pipeline, capsys, flags, says) -> None:
    from cli import main

    flags = [f.format(tmp=tmp_path, pipeline=pipeline) for f in flags]
    checkpoint = [] if "--checkpoint" in flags else ["--checkpoint", str(pipeline)]
    code = main(["index", "create", str(tmp_path / "s.zarr"), *checkpoint, "--data", "builtin:digits",
                 "--limit", "10", "--loss", "mse", "--no-replay", "--grid", "2",
                 "--slot-noise", "independent", *flags])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2, error
    assert says in error[-1], error
    assert not (tmp_path / "s.zarr").exists()


def test_snr_weighted_training_records_diffusers_train_unconditional_loss(tmp_path) -> None:
    # One batch per epoch: every step of epoch 2 starts from the checkpoint saved after epoch 1.
    spec = TrainSpec(
        dataset=DATA, preset="micro", loss="mse", epochs=2, batch_size=10, save_every=1, seed=4,
        prediction_type="sample", loss_weighting="snr",
    )
    run = train(spec, load_dataset(DATA), tmp_path / "run")
    scheduler = DDPMScheduler.from_pretrained(run.scheduler_folder)
    unet = UNet2DModel.from_pretrained(run.folder / "checkpoints" / "epoch-0001").eval()
    images, timesteps = load_dataset(DATA).images, run.timesteps[1]
    noise = torch.stack(
        [
            torch.randn(images.shape[1:], generator=torch.Generator("cpu").manual_seed(s))
            for s in run.seeds[1].tolist()
        ]
    )
    alpha_t = scheduler.alphas_cumprod[timesteps].float().reshape(-1, 1, 1, 1)  # as train_unconditional.py
    with torch.no_grad():
        output = unet(scheduler.add_noise(images, noise, timesteps), timesteps).sample
    expected = (
        (alpha_t / (1 - alpha_t) * torch.nn.functional.mse_loss(output, images, reduction="none"))
        .flatten(1)
        .mean(1)
    )
    torch.testing.assert_close(run.losses[1], expected, rtol=1e-6, atol=0)


def test_a_sample_prediction_model_must_declare_its_loss_weighting(tmp_path) -> None:
    run = trained(tmp_path, "sample", "linear", "snr")
    pipeline = tmp_path / "pipeline"
    DDPMPipeline(
        unet=UNet2DModel.from_pretrained(run / "checkpoints" / "epoch-0002"),
        scheduler=DDPMScheduler.from_pretrained(run / "scheduler"),
    ).save_pretrained(pipeline)
    assert "--loss-weighting snr or none" in refusal(external_spec(pipeline))
    assert IndexPlan.resolve(external_spec(pipeline, loss_weighting="snr")).loss_weighting == "snr"
    mismatch = IndexSpec(dataset=DATA, run=str(run), loss_weighting="none")
    assert "the run was trained with 'snr'" in refusal(mismatch)
    assert IndexPlan.resolve(IndexSpec(dataset=DATA, run=str(run))).loss_weighting == "snr"
