"""The typed options of the longer commands (`index create`, `attribute`, `eval generate`), one
`Annotated` alias per flag, so that a command's signature reads as a list of names and the flags two
commands share are declared once. Defaults stay in the signatures, read off the specs
(`cli.common.default`); the parameter names are the keys of `cli.specs`' flag tables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

import api_schemas as schemas
from api_schemas.specs import DEFAULT_ESTIMATOR, ProjectorKind, StoreDType
from cli.common import data_option, default
from cli.render import CSV_COLUMNS, OutputFormat
from cli.specs import SlotPreset

# `retrac index create`
NewStore = Annotated[str, typer.Argument(help="folder of the Zarr store to create, or s3://BUCKET/PREFIX")]
Spec = Annotated[Path | None, typer.Option(help="IndexSpec as a JSON file, under the flags typed")]
RunFolder = Annotated[str | None, typer.Option("--run", help="training run folder of `retrac train`")]
Checkpoint = Annotated[
    list[str] | None,
    typer.Option(
        metavar="DIR[:epoch=E,lr=LR|:weight=W]",
        help="a diffusers UNet, pipeline or checkpoint-N folder (repeatable), or with --base a LoRA adapter "
        "folder, with its epoch and learning rate or its TracIn weight",
    ),
]
Base = Annotated[
    str | None,
    typer.Option(
        help="the base model (a diffusers pipeline folder or its unet/) of LoRA adapters: each --checkpoint "
        "is then an adapter folder, peft's (adapter_config.json + adapter_model.safetensors) or diffusers' "
        "(pytorch_lora_weights.safetensors); gradients over the adapter only",
        show_default="none: the checkpoints are full models",
    ),
]
Parameters = Annotated[
    list[str] | None,
    typer.Option(
        "--parameters", metavar="PATTERN",
        help="take gradients over the parameters whose named_parameters() name matches (fnmatch, "
        "repeatable; e.g. '*attn2*')",
        show_default="every trainable parameter",
    ),
]
Scheduler = Annotated[
    str | None,
    typer.Option(
        help="folder with the scheduler_config.json", show_default="the run's, or beside the checkpoint"
    ),
]
Vae = Annotated[
    str | None,
    typer.Option(
        help="folder of a latent model's AutoencoderKL (its config.json and safetensors weights)",
        show_default="the vae/ of the checkpoint's pipeline folder; none for a pixel model",
    ),
]
TrainBatchSize = Annotated[
    int | None, typer.Option(help="training batch size, for weights from epoch and lr")
]
RunData = Annotated[str | None, data_option("the run's dataset")]
CaptionColumn = Annotated[
    str | None,
    typer.Option(
        help="column of the image folder's metadata.jsonl holding each caption (text-conditional models)",
        show_default=default(schemas.DatasetSpec, "caption_column"),
    ),
]
Loss = Annotated[schemas.LossKind | None, typer.Option(help="the training loss", show_default="the run's")]
LossWeighting = Annotated[
    schemas.LossWeighting | None,
    typer.Option(
        help="the training loss's per-sample weight: none, or snr = alpha_bar_t / (1 - alpha_bar_t) "
        "(diffusers' train_unconditional.py for sample-prediction models, which must declare it)",
        show_default="the run's, or none",
    ),
]
Preset = Annotated[
    SlotPreset | None,
    typer.Option(
        help="default: the replayed step plus shared-noise grid slots (the flags below); paper: the "
        "paper's slots, the replayed step alone (for --estimator paper; the slot flags are then refused)",
        show_default="default (a --spec file's slots, if it has them)",
    ),
]
Replay = Annotated[bool, typer.Option("--replay/--no-replay", help="a replayed-step slot")]
Grid = Annotated[int, typer.Option(help="grid timestep slots per sample")]
Random = Annotated[int, typer.Option(help="random timestep slots per sample")]
SlotSeed = Annotated[int, typer.Option(help="seed of the slots' timesteps and noise")]
SlotNoise = Annotated[
    schemas.SlotNoise,
    typer.Option(
        help="grid slots' noise: their own seeds, or shared with the query (for --estimator matched)"
    ),
]
SlotDraws = Annotated[int, typer.Option(help="M of shared-noise grid slots: noise images averaged per slot")]
Projector = Annotated[ProjectorKind, typer.Option(help="random projection of the gradients")]
Dim = Annotated[int, typer.Option(help="projected dimension k")]
ProjectorSeed = Annotated[int, typer.Option(help="seed of the projection")]
OutputFunction = Annotated[
    schemas.OutputFunction,
    typer.Option(
        help="the function differentiated on both sides: loss (tracin, retrac, trak) or output-norm, "
        "D-TRAK's mean squared model output (dtrak)"
    ),
]
Kernel = Annotated[
    bool,
    typer.Option(
        "--kernel/--no-kernel",
        help="build each checkpoint's TRAK kernel (methods trak and dtrak)",
        show_default="on for projected rows, off under --preset paper",
    ),
]
KernelRidge = Annotated[float, typer.Option(help="the kernel's lambda as a fraction of trace(Phi^T Phi) / k")]
Dtype = Annotated[
    StoreDType, typer.Option(help="stored gradient precision (bfloat16: float32's range, bf16 matmul scans)")
]
BatchSize = Annotated[int, typer.Option(help="samples per gradient batch")]
ShardSize = Annotated[int, typer.Option(help="rows per task, chunk and done mark")]
ModelsRoot = Annotated[
    Path | None,
    typer.Option(
        help="keep the run, checkpoints, scheduler, VAE and the parts found beside a checkpoint inside "
        "this folder, links followed, as the service's RETRAC_MODELS_ROOT does (recorded in the store)",
        show_default="not confined",
    ),
]
DataRoot = Annotated[
    Path | None,
    typer.Option(help="keep the dataset's files inside this folder", show_default="the models root"),
]

# `retrac attribute`, and the query flags `eval generate` shares
FilledStore = Annotated[
    str, typer.Argument(help="a filled store (retrac index create/run): folder or s3://BUCKET/PREFIX")
]
Images = Annotated[list[Path], typer.Argument(help="query images (PNG, JPEG or .npy) or folders of them")]
TopK = Annotated[int, typer.Option(help="proponents and opponents per method")]
RankAll = Annotated[
    bool,
    typer.Option(
        "--all",
        help="rank every training sample once per method (overrides --top-k): rank 1 the strongest "
        "proponent, the last the strongest opponent",
    ),
]
Timesteps = Annotated[int, typer.Option(help="K, query timestep grid size")]
Draws = Annotated[int, typer.Option(help="M, noise draws per timestep")]
QuerySeed = Annotated[int, typer.Option(help="seed of the query's noise draws")]
Estimator = Annotated[
    schemas.Estimator | None,
    typer.Option(
        help="matched: per timestep against the store's shared-noise slots (its K, M, seed), the "
        "measured best (docs/experiment.md); paper: Diffusion-TracIn/ReTrac as the paper defines them",
        show_default=f"{DEFAULT_ESTIMATOR} where the store has shared-noise slots (index create's "
        "default), else paper",
    ),
]
Search = Annotated[
    schemas.Search,
    typer.Option(help="exact: scan every row; approximate: rescore the store's ANN index's candidates"),
]
Method = Annotated[
    list[str] | None,
    typer.Option(
        help="a score to rank by (repeatable): tracin, retrac, trak, dtrak (docs/methods.md)",
        show_default="the measured best the store serves (trak under the matched estimator; "
        "tracin and retrac under the paper's)",
    ),
]
Gallery = Annotated[Path | None, typer.Option(help="write a PNG of each query's top proponents per method")]
Output = Annotated[OutputFormat, typer.Option("--format", help="how to print the results")]
AsJson = Annotated[
    bool, typer.Option("--json", help="same as --format json: the HTTP API's AttributionsPublic")
]
Columns = Annotated[
    list[str] | None,
    typer.Option(
        help=f"--format csv: the columns, repeatable ({', '.join(CSV_COLUMNS)})", show_default="all"
    ),
]
Threads = Annotated[int, typer.Option(help="CPU threads for the query gradients")]
MemoryBudget = Annotated[
    str | None,
    typer.Option(
        "--memory-budget",
        help="memory a gradient batch may use, e.g. 8GiB; a job that cannot fit one sample is refused",
        show_default="RETRAC_MEMORY_BUDGET, else half the RAM (CPU) or 80% of the GPU's memory",
    ),
]
"""The flag of every command that computes gradients (`index run`, `attribute`, `worker`)."""
Label = Annotated[
    str | None,
    typer.Option(
        help="class of the query images, for a class-conditional store: a class name or its integer "
        "(`retrac index inspect` lists them); required there, refused by an unconditional store",
        show_default="none: an unconditional store",
    ),
]
Prompt = Annotated[
    str | None,
    typer.Option(
        help="text the query images are attributed under, for a text-conditional store: required there "
        "(--prompt '' for the empty, unconditional prompt), refused by any other store",
        show_default="none: not a text-conditional store",
    ),
]

# `retrac eval generate`
Count = Annotated[int, typer.Option(help="images to generate")]
GenerateLabel = Annotated[
    str | None,
    typer.Option(
        help="class to generate, for a class-conditional store: a class name or its integer",
        show_default="none: an unconditional store",
    ),
]
GuidanceScale = Annotated[
    float | None,
    typer.Option(
        help="classifier-free guidance s: eps_uncond + s (eps_cond - eps_uncond); needs a model with a "
        "null class (a DiT); refused for a UNet2DModel",
        show_default="no guidance",
    ),
]
Sampler = Annotated[Literal["ddpm", "ddim"], typer.Option(help="diffusers sampler")]
Steps = Annotated[
    int | None, typer.Option(help="denoising steps", show_default="50 (ddim), the schedule's T (ddpm)")
]
SamplingSeed = Annotated[int, typer.Option(help="seed of the sampling noise")]
Out = Annotated[Path, typer.Option(help="output folder")]
