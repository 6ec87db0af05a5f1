"""`retrac index create | run | status | inspect | delete`: build a gradient store and fill it.

retrac index create STORE --run runs/digits            # spec from flags (dataset from the run)
retrac index create STORE --spec index.json            # or a full IndexSpec as JSON
retrac index run STORE                                 # embedded: in this process, progress bar
retrac index run STORE --queue --wait                  # as a Celery job, for `retrac worker`s
retrac index status STORE [--verify] [--json]
retrac index inspect STORE [--json]
retrac index delete STORE                              # safe while workers write it
retrac index ann STORE [--lists N] [--probe N]          # (re)build the ANN index of approximate search
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from api_schemas import (
    DatasetSpec,
    IndexSpec,
    KernelSpec,
    LossKind,
    LossWeighting,
    OutputFunction,
    ProjectorSpec,
    SlotNoise,
)
from api_schemas.specs import DEFAULT_SLOTS, ProjectorKind, StoreDType
from cli.common import (
    Channels,
    DataSeed,
    Limit,
    Resolution,
    absolute_text,
    data_option,
    default,
    print_notices,
    store_location,
    typed_flags,
)
from cli.progress import PhaseBars
from cli.specs import INDEX_FLAGS, SlotPreset, checkpoint_fields, index_spec
from retrac.exceptions import SpecError

if TYPE_CHECKING:
    from storage import GradientStore

POLL_SECONDS = 1.0
"""How often `run --queue --wait` rereads the store's done marks."""

app = typer.Typer(
    help="Build a gradient store and fill it (embedded or with workers).",
    short_help="build a gradient store and fill it (embedded or with workers)",
)

Store = Annotated[str, typer.Argument(help="a gradient store (retrac index create): folder or s3://BUCKET/PREFIX")]

SLOTS, PROJECTION = DEFAULT_SLOTS, ProjectorSpec()
"""The defaults `create`'s flags show and start from (`api_schemas.specs.DEFAULT_SLOTS`)."""
def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="index")


@app.command("create", help="Create an empty store for an index spec (a --spec file, flags laid over it).")
def create(
    context: typer.Context,
    store: Annotated[str, typer.Argument(help="folder of the Zarr store to create, or s3://BUCKET/PREFIX")],
    spec: Annotated[
        Path | None, typer.Option(help="IndexSpec as a JSON file, under the flags typed")
    ] = None,
    run_folder: Annotated[
        str | None, typer.Option("--run", help="training run folder of `retrac train`")
    ] = None,
    checkpoint: Annotated[
        list[str] | None,
        typer.Option(
            metavar="DIR[:epoch=E,lr=LR|:weight=W]",
            help="a diffusers UNet, pipeline or checkpoint-N folder (repeatable), with its epoch and "
            "learning rate or its TracIn weight",
        ),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="folder with the scheduler_config.json", show_default="the run's, or beside the checkpoint"
        ),
    ] = None,
    vae: Annotated[
        str | None,
        typer.Option(
            help="folder of a latent model's AutoencoderKL (its config.json and safetensors weights)",
            show_default="the vae/ of the checkpoint's pipeline folder; none for a pixel model",
        ),
    ] = None,
    train_batch_size: Annotated[
        int | None, typer.Option(help="training batch size, for weights from epoch and lr")
    ] = None,
    data: Annotated[str | None, data_option("the run's dataset")] = None,
    resolution: Resolution = None,
    channels: Channels = None,
    limit: Limit = None,
    data_seed: DataSeed = None,
    caption_column: Annotated[
        str | None,
        typer.Option(
            help="column of the image folder's metadata.jsonl holding each caption (text-conditional models)",
            show_default=default(DatasetSpec, "caption_column"),
        ),
    ] = None,
    loss: Annotated[LossKind | None, typer.Option(help="the training loss", show_default="the run's")] = None,
    loss_weighting: Annotated[
        LossWeighting | None,
        typer.Option(
            help="the training loss's per-sample weight: none, or snr = alpha_bar_t / (1 - alpha_bar_t) "
            "(diffusers' train_unconditional.py for sample-prediction models, which must declare it)",
            show_default="the run's, or none",
        ),
    ] = None,
    preset: Annotated[
        SlotPreset | None,
        typer.Option(
            help="default: the replayed step plus shared-noise grid slots (the flags below); paper: the "
            "paper's slots, the replayed step alone (for --estimator paper; the slot flags are then refused)",
            show_default="default (a --spec file's slots, if it has them)",
        ),
    ] = None,
    replay: Annotated[bool, typer.Option("--replay/--no-replay", help="a replayed-step slot")] = SLOTS.replay,
    grid: Annotated[int, typer.Option(help="grid timestep slots per sample")] = SLOTS.grid,
    random: Annotated[int, typer.Option(help="random timestep slots per sample")] = SLOTS.random,
    slot_seed: Annotated[int, typer.Option(help="seed of the slots' timesteps and noise")] = SLOTS.seed,
    slot_noise: Annotated[
        SlotNoise,
        typer.Option(
            help="grid slots' noise: their own seeds, or shared with the query (for --estimator matched)"
        ),
    ] = SLOTS.noise,
    slot_draws: Annotated[
        int, typer.Option(help="M of shared-noise grid slots: noise images averaged per slot")
    ] = SLOTS.draws,
    projector: Annotated[
        ProjectorKind, typer.Option(help="random projection of the gradients")
    ] = PROJECTION.kind,
    dim: Annotated[int, typer.Option(help="projected dimension k")] = PROJECTION.dim,
    projector_seed: Annotated[int, typer.Option(help="seed of the projection")] = PROJECTION.seed,
    output_function: Annotated[
        OutputFunction,
        typer.Option(
            help="the function differentiated on both sides: loss (tracin, retrac, trak) or output-norm, "
            "D-TRAK's mean squared model output (dtrak)"
        ),
    ] = default(IndexSpec, "output_function"),
    kernel: Annotated[
        bool,
        typer.Option(
            "--kernel/--no-kernel", help="build each checkpoint's TRAK kernel (methods trak and dtrak)",
            show_default="on for projected rows, off under --preset paper",
        ),
    ] = False,
    kernel_ridge: Annotated[
        float, typer.Option(help="the kernel's lambda as a fraction of trace(Phi^T Phi) / k")
    ] = default(KernelSpec, "ridge"),
    dtype: Annotated[
        StoreDType,
        typer.Option(help="stored gradient precision (bfloat16: float32's range, bf16 matmul scans)"),
    ] = default(IndexSpec, "dtype"),
    batch_size: Annotated[int, typer.Option(help="samples per gradient batch")] = default(
        IndexSpec, "batch_size"
    ),
    shard_size: Annotated[int, typer.Option(help="rows per task, chunk and done mark")] = default(
        IndexSpec, "shard_size"
    ),
    models_root: Annotated[
        Path | None,
        typer.Option(
            help="keep the run, checkpoints, scheduler, VAE and the parts found beside a checkpoint inside "
            "this folder, links followed, as the service's RETRAC_MODELS_ROOT does (recorded in the store)",
            show_default="not confined",
        ),
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(help="keep the dataset's files inside this folder", show_default="the models root"),
    ] = None,
) -> int:
    from storage import GradientStore

    flags = typed_flags(context, [*INDEX_FLAGS, "preset"])
    index = index_spec(flags, _base_fields(spec, flags))  # every flag checked before a model loads
    opened = GradientStore.create(
        store_location(store), _recorded(index), root=models_root, data_root=data_root
    )
    print_notices(opened.plan.dataset.notices)
    print(created_text(opened))
    return 0


def _base_fields(spec: Path | None, flags: dict[str, Any]) -> dict[str, Any]:
    """What the typed flags are laid over: the --spec file's fields, else the run's dataset, else the
    image shape the first checkpoint takes."""
    from retrac.replay import TrainingRun

    if spec is not None:
        try:
            return dict(json.loads(spec.read_text()))
        except (OSError, ValueError) as error:
            raise SpecError(f"--spec: cannot read {spec} as JSON ({error})") from error
    if flags.get("run_folder"):  # its dataset, unless --data names another
        return {"dataset": TrainingRun.load(flags["run_folder"]).spec.dataset.model_dump()}
    if flags.get("data") is None:
        return {}  # refused by `index_spec`, naming --data
    checkpoints = [checkpoint_fields(c) for c in flags.get("checkpoint") or ()]
    return {"dataset": _model_shape(checkpoints, flags.get("vae"))}


def created_text(opened: GradientStore) -> str:
    """What `create` tells of the new store."""
    lines = [
        f"{opened.path}: {opened.num_rows} samples x {opened.num_slots} slots x k={opened.dim}, "
        f"{opened.num_checkpoints} checkpoints, {opened.num_shards} shards each; "
        "fill it with `retrac index run`"
    ]
    if opened.classes is not None:
        lines.append(f"class-conditional: {len(opened.classes.classes)} classes; query it with --label NAME")
    if opened.text_conditional:
        lines.append(
            "text-conditional: captions encoded by the pipeline's text encoder; query it with --prompt TEXT"
        )
    return "\n".join(lines)


def _recorded(spec: IndexSpec) -> IndexSpec:
    """`spec` with every path absolute: the store records paths that resolve from any directory."""
    return spec.map_paths(absolute_text, absolute_text)


def _model_shape(checkpoints: list[dict[str, Any]], vae: str | None) -> dict[str, Any]:
    """resolution and channels of the images the first checkpoint takes (through its VAE, for a latent
    model): the default shape of its dataset."""
    from retrac.latents import latent_space_of
    from retrac.models import read_architecture
    from retrac.plan import model_image_shape
    from storage.inputs import is_url

    if not checkpoints or is_url(checkpoints[0]["path"]) or is_url(vae):  # at a URL: give --resolution
        return {}
    path = checkpoints[0]["path"]
    channels, resolution = model_image_shape(read_architecture(path), latent_space_of(path, vae))
    return {"resolution": resolution, "channels": channels}


@app.command(
    "run", help="Compute every pending shard (embedded by default, with a bar that moves per batch)."
)
def run(
    store: Store,
    queue: Annotated[
        bool, typer.Option("--queue", help="submit a Celery job for `retrac worker`s instead")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="with --queue: follow the job until the store is complete")
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="embedded: torch device", show_default="CUDA when available")
    ] = None,
    threads: Annotated[int, typer.Option(help="embedded: CPU threads (a shard's bytes depend on it)")] = 1,
) -> int:
    from tqdm import tqdm

    from retrac.computers import GradientComputerCache
    from storage import GradientStore, run_pending

    if queue:
        return _run_queued(store, wait)
    opened = GradientStore.open(store_location(store))
    rows = sum(opened.shard_length(s) for _, s in opened.pending())
    models = GradientComputerCache(device, threads=threads)
    with tqdm(total=rows, unit="rows", desc="indexing", smoothing=0.1) as bar, PhaseBars() as ann:
        count = run_pending(opened, models, on_rows=bar.update, on_ann=ann)
    print(f"{opened.path}: {count} shards computed; complete: {opened.status().complete}")
    return 0


def _run_queued(store: str, wait: bool) -> int:
    from tqdm import tqdm

    from storage import NothingToIndexError
    from worker import control
    from worker.settings import get_settings as worker_settings

    try:
        job_id = control.submit(store)
    except NothingToIndexError as done:
        print(done)
        return 0
    print(f"job {job_id} submitted: start workers with `retrac worker` on machines that see {store}")
    if not wait:
        return 0
    current, warned = control.progress(store), False
    stall_seconds = worker_settings().stall_seconds
    with tqdm(total=current.total_rows, initial=current.done_rows, unit="rows", desc="indexing") as bar:
        while True:
            bar.update(current.done_rows - bar.n)
            state = control.state(job_id)
            if current.complete or state in ("failed", "cancelled"):
                break
            reason = None if warned else control.stalled(job_id, store, seconds=stall_seconds)
            if reason:
                bar.write(f"job {job_id} looks stalled: {reason}")
                warned = True
            time.sleep(POLL_SECONDS)
            current = control.progress(store)
    why = control.failure(job_id) if state == "failed" else None
    print(f"job {job_id}: {state}" + (f": {why}" if why else ""))
    return 0 if current.complete else 1


@app.command("status", help="Done/total per checkpoint, rate and time left.")
def status(
    store: Store,
    verify: Annotated[
        bool, typer.Option("--verify", help="also reread every done shard against its digest")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> int:
    from storage import GradientStore, progress

    opened = GradientStore.open(store_location(store), check=False)
    counts, now = opened.status(verify=verify), progress(opened)
    info = opened.checkpoint_info
    if as_json:
        print(
            json.dumps(
                {
                    "complete": counts.complete,
                    "done_rows": now.done_rows,
                    "total_rows": now.total_rows,
                    "rate_per_s": now.rate_per_s,
                    "eta_s": now.eta_s,
                    "checkpoints": [
                        {
                            "checkpoint": c.checkpoint,
                            "epoch": info[c.checkpoint]["epoch"],
                            "done_shards": c.done_shards,
                            "total_shards": c.total_shards,
                            "done_rows": c.done_rows,
                            "total_rows": c.total_rows,
                            "complete": c.complete,
                        }
                        for c in counts.checkpoints
                    ],
                },
                indent=2,
            )
        )
        return 0
    for c in counts.checkpoints:
        epoch = info[c.checkpoint]["epoch"]
        print(
            f"checkpoint {c.checkpoint} (epoch {epoch}): {c.done_shards}/{c.total_shards} shards, "
            f"{c.done_rows}/{c.total_rows} rows{', complete' if c.complete else ''}"
        )
    rate = f"{now.rate_per_s:.1f} rows/s" if now.rate_per_s else "rate unknown"
    eta = f", about {now.eta_s:.0f} s left" if now.eta_s else ""
    print(f"total: {now.done_rows}/{now.total_rows} rows ({now.fraction:.0%}), {rate}{eta}")
    return 0


@app.command("delete", help="Delete a store, safe while workers write it (they skip it from the mark on).")
def delete(store: Store) -> int:
    from storage import delete_store
    from storage.errors import StoreError
    from storage.store import DELETED_MARK

    location = store_location(store)
    # Only what is a store, or what a deletion left marked: never an unrelated folder.
    if not (location.has("zarr.json") or location.has(DELETED_MARK)):
        raise StoreError(
            f"{store} is not a retrac store (no zarr.json); nothing deleted (if a deletion left it, remove "
            "it)"
        )
    delete_store(location)
    print(f"deleted {store}")
    return 0


@app.command(
    "ann",
    help="Build (or rebuild) the ANN index that `attribute --search approximate` uses; an indexing job "
    "builds one when it completes.",
)
def ann(
    store: Store,
    lists: Annotated[int | None, typer.Option(help="IVF lists", show_default="about sqrt(rows)")] = None,
    probe: Annotated[
        int | None, typer.Option(help="lists searched per query", show_default="an eighth of the lists")
    ] = None,
    threads: Annotated[int, typer.Option(help="CPU threads")] = 1,
) -> int:
    import torch

    from storage import GradientStore, build_ann
    from storage.ann import AnnParams

    opened = GradientStore.open(store_location(store))
    params = AnnParams.for_rows(opened.num_rows) if lists is None else AnnParams.with_lists(lists)
    params = params if probe is None else AnnParams(nlist=params.nlist, nprobe=probe)
    if not 1 <= params.nlist <= opened.num_rows or not 1 <= params.nprobe <= params.nlist:
        raise SpecError(f"--lists must be 1..{opened.num_rows} (the rows) and --probe 1..--lists")
    torch.set_num_threads(threads)
    started = time.perf_counter()
    with PhaseBars() as bars:
        build_ann(opened, params, on_progress=bars)
    print(f"{opened.path}: ANN index built ({params.nlist} lists, {params.nprobe} probed) in "
          f"{time.perf_counter() - started:.1f} s")
    return 0


@app.command("inspect", help="The store's spec, shapes, fingerprints and freshness.")
def inspect(store: Store, as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> int:
    from storage import GradientStore, StaleStoreError

    opened = GradientStore.open(store_location(store), check=False)
    try:
        opened.check()
        freshness = "fresh: checkpoints, dataset, record, schedule and VAE (if any) unchanged"
    except StaleStoreError as error:
        freshness = str(error)
    report = {
        "path": str(opened.path),
        "format": opened.attrs["format"],
        "shape": {
            "rows": opened.num_rows,
            "slots": opened.num_slots,
            "dim": opened.dim,
            "dtype": opened.spec.dtype,
            "slot_kinds": list(opened.slot_kinds),
        },
        "shards": {"size": opened.shard_size, "per_checkpoint": opened.num_shards},
        "checkpoints": opened.checkpoint_info,
        "scheduler": {
            "folder": opened.attrs.get("scheduler"),
            "prediction_type": opened.attrs.get("prediction_type"),
        },
        "vae": opened.attrs.get("vae"),  # None: a pixel-space model
        "loss_weighting": opened.attrs.get("loss_weighting", "none"),  # stores from before it: none
        "classes": opened.attrs.get("classes"),  # a class-conditional index's labels; null: unconditional
        "text": opened.attrs.get("text"),  # a text-conditional index's text encoder; null: no text
        "fingerprints": opened.attrs["fingerprints"],
        "size_bytes": opened.size_bytes(),
        "freshness": freshness,
        "spec": opened.attrs["spec"],
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0
