"""`retrac index create | run | status | inspect`: build a gradient store and fill it.

retrac index create STORE --run runs/digits            # spec from flags (dataset from the run)
retrac index create STORE --spec index.json            # or a full IndexSpec as JSON
retrac index run STORE                                 # embedded: in this process, progress bar
retrac index run STORE --queue --wait                  # as a Celery job, for `retrac worker`s
retrac index status STORE [--verify] [--json]
retrac index inspect STORE [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cli.common import absolute, add_dataset_arguments, dataset_spec, first_error, store_location
from retrac.exceptions import SpecError

POLL_SECONDS = 1.0
"""How often `run --queue --wait` rereads the store's done marks."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index", help="build a gradient store and fill it (embedded or with workers)"
    )
    commands = parser.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    create = commands.add_parser("create", help="create an empty store for an index spec")
    create.add_argument("store", help="folder of the Zarr store to create, or s3://BUCKET/PREFIX")
    create.add_argument(
        "--spec", type=Path, help="IndexSpec as a JSON file (then the flags below are not used)"
    )
    create.add_argument("--run", dest="run_folder", help="training run folder of `retrac train`")
    create.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        type=_checkpoint,
        metavar="DIR[:epoch=E,lr=LR|:weight=W]",
        help="a diffusers UNet, pipeline or checkpoint-N folder (repeatable), with its epoch and learning "
        "rate or its TracIn weight",
    )
    create.add_argument("--scheduler", help="folder with the scheduler_config.json (default: the run's, or beside the checkpoint)")
    create.add_argument("--train-batch-size", type=int, help="training batch size, for weights from epoch and lr")
    add_dataset_arguments(create, default="the run's dataset")
    create.add_argument("--loss", choices=("mse", "l1"), help="the training loss (default: the run's)")
    create.add_argument("--no-replay", action="store_true", help="no replayed-step slot")
    create.add_argument("--grid", type=int, default=0, help="grid timestep slots per sample")
    create.add_argument("--random", type=int, default=0, help="random timestep slots per sample")
    create.add_argument("--slot-seed", type=int, default=0)
    create.add_argument("--projector", choices=("identity", "sketch", "dense"), default="sketch")
    create.add_argument("--dim", type=int, default=4096, help="projected dimension k")
    create.add_argument("--projector-seed", type=int, default=0)
    create.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    create.add_argument("--batch-size", type=int, default=32, help="samples per gradient batch")
    create.add_argument("--shard-size", type=int, default=256, help="rows per task, chunk and done mark")
    create.set_defaults(run=_create)

    run = commands.add_parser("run", help="compute every pending shard (embedded by default)")
    run.add_argument("store", help="folder or s3://BUCKET/PREFIX of the store")
    run.add_argument("--queue", action="store_true", help="submit a Celery job for `retrac worker`s instead")
    run.add_argument(
        "--wait", action="store_true", help="with --queue: follow the job until the store is complete"
    )
    run.add_argument("--device", help="embedded: torch device (default: CUDA when available)")
    run.add_argument(
        "--threads", type=int, default=1, help="embedded: CPU threads (a shard's bytes depend on it)"
    )
    run.set_defaults(run=_run)

    status = commands.add_parser("status", help="done/total per checkpoint, rate and time left")
    status.add_argument("store", help="folder or s3://BUCKET/PREFIX of the store")
    status.add_argument(
        "--verify", action="store_true", help="also reread every done shard against its digest"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=_status)

    inspect = commands.add_parser("inspect", help="the store's spec, shapes, fingerprints and freshness")
    inspect.add_argument("store", help="folder or s3://BUCKET/PREFIX of the store")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(run=_inspect)


def _create(args: argparse.Namespace) -> int:
    from storage import GradientStore

    store = GradientStore.create(store_location(args.store), _spec(args))
    print(
        f"{store.path}: {store.num_rows} samples x {store.num_slots} slots x k={store.dim}, "
        f"{store.num_checkpoints} checkpoints, {store.num_shards} shards each; "
        "fill it with `retrac index run`"
    )
    return 0


def _spec(args: argparse.Namespace) -> Any:
    from api_schemas import CheckpointSpec, IndexSpec, ProjectorSpec, SlotSpec
    from retrac.replay import TrainingRun

    try:
        if args.spec is not None:
            return _recorded(IndexSpec.model_validate_json(args.spec.read_text()))
        trained = TrainingRun.load(args.run_folder).spec.dataset if args.run_folder else None
        if args.data is None and trained is None:
            raise SpecError("give --data (or --run, whose dataset is used)")
        base = trained.model_dump() if trained else _model_shape(args.checkpoint)
        if args.data is not None:
            base.pop("limit", None)  # the run's sample limit belongs to the run's source
        dataset = dataset_spec(args, base)
        return _recorded(IndexSpec(
            dataset=dataset,
            run=args.run_folder,
            checkpoints=tuple(CheckpointSpec(**c) for c in args.checkpoint),
            scheduler=args.scheduler,
            loss=args.loss,
            train_batch_size=args.train_batch_size,
            slots=SlotSpec(
                replay=not args.no_replay, grid=args.grid, random=args.random, seed=args.slot_seed
            ),
            projector=ProjectorSpec(kind=args.projector, dim=args.dim, seed=args.projector_seed),
            dtype=args.dtype,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
        ))
    except ValidationError as error:
        raise SpecError(f"invalid index spec: {first_error(error)}") from error
    except OSError as error:
        raise SpecError(f"cannot read the spec: {error}") from error


def _recorded(spec: Any) -> Any:
    """`spec` with every path absolute: the store records paths that resolve from any directory."""
    return spec.map_paths(absolute_text, absolute_text)


def absolute_text(path: str) -> str:
    return str(absolute(path))


CHECKPOINT_KEYS = {"epoch": int, "lr": float, "weight": float}
"""What `--checkpoint DIR:key=value,...` may say about a checkpoint."""


def _checkpoint(value: str) -> dict[str, Any]:
    """`DIR` or `DIR:epoch=E,lr=LR` or `DIR:weight=W` as CheckpointSpec fields (argparse type)."""
    path, _, options = value.rpartition(":") if "=" in value.rpartition(":")[2] else (value, "", "")
    fields: dict[str, Any] = {"path": path}
    for option in filter(None, options.split(",")):
        key, _, text = option.partition("=")
        if key not in CHECKPOINT_KEYS:
            raise argparse.ArgumentTypeError(f"unknown checkpoint option {key!r}; use {', '.join(CHECKPOINT_KEYS)}")
        try:
            fields[key] = CHECKPOINT_KEYS[key](text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}={text!r} is not a number") from None
    return fields


def _model_shape(checkpoints: list[dict[str, Any]]) -> dict[str, Any]:
    """resolution and channels of the first checkpoint's UNet: the default shape of its dataset."""
    from retrac.models import read_architecture, sample_shape

    if not checkpoints:
        return {}
    channels, resolution = sample_shape(read_architecture(checkpoints[0]["path"]))
    return {"resolution": resolution, "channels": channels}


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from retrac.computers import GradientComputerCache
    from storage import GradientStore, run_pending

    if args.queue:
        return _run_queued(args)
    store = GradientStore.open(store_location(args.store))
    pending = store.pending()
    rows = sum(store.shard_length(s) for _, s in pending)
    models = GradientComputerCache(args.device, threads=args.threads)
    with tqdm(total=rows, unit="rows", desc="indexing", smoothing=0.1) as bar:
        count = run_pending(store, models, on_shard=lambda _c, _s, n: bar.update(n))
    print(f"{store.path}: {count} shards computed; complete: {store.status().complete}")
    return 0


def _run_queued(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from storage import NothingToIndexError
    from worker import control
    from worker.settings import get_settings as worker_settings

    try:
        job_id = control.submit(args.store)
    except NothingToIndexError as done:
        print(done)
        return 0
    print(f"job {job_id} submitted: start workers with `retrac worker` on machines that see {args.store}")
    if not args.wait:
        return 0
    current, warned = control.progress(args.store), False
    stall_seconds = worker_settings().stall_seconds
    with tqdm(total=current.total_rows, initial=current.done_rows, unit="rows", desc="indexing") as bar:
        while True:
            bar.update(current.done_rows - bar.n)
            state = control.state(job_id)
            if current.complete or state in ("failed", "cancelled"):
                break
            reason = None if warned else control.stalled(job_id, args.store, seconds=stall_seconds)
            if reason:
                bar.write(f"job {job_id} looks stalled: {reason}")
                warned = True
            time.sleep(POLL_SECONDS)
            current = control.progress(args.store)
    why = control.failure(job_id) if state == "failed" else None
    print(f"job {job_id}: {state}" + (f": {why}" if why else ""))
    return 0 if current.complete else 1


def _status(args: argparse.Namespace) -> int:
    from storage import GradientStore, progress

    store = GradientStore.open(store_location(args.store), check=False)
    status, now = store.status(verify=args.verify), progress(store)
    info = store.checkpoint_info
    if args.json:
        print(
            json.dumps(
                {
                    "complete": status.complete,
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
                        for c in status.checkpoints
                    ],
                },
                indent=2,
            )
        )
        return 0
    for c in status.checkpoints:
        epoch = info[c.checkpoint]["epoch"]
        print(
            f"checkpoint {c.checkpoint} (epoch {epoch}): {c.done_shards}/{c.total_shards} shards, "
            f"{c.done_rows}/{c.total_rows} rows{', complete' if c.complete else ''}"
        )
    rate = f"{now.rate_per_s:.1f} rows/s" if now.rate_per_s else "rate unknown"
    eta = f", about {now.eta_s:.0f} s left" if now.eta_s else ""
    print(f"total: {now.done_rows}/{now.total_rows} rows ({now.fraction:.0%}), {rate}{eta}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from storage import GradientStore, StaleStoreError

    store = GradientStore.open(store_location(args.store), check=False)
    try:
        store.check()
        freshness = "fresh: checkpoints, dataset, record and schedule unchanged"
    except StaleStoreError as error:
        freshness = str(error)
    report = {
        "path": str(store.path),
        "format": store.attrs["format"],
        "shape": {
            "rows": store.num_rows,
            "slots": store.num_slots,
            "dim": store.dim,
            "dtype": store.spec.dtype,
            "slot_kinds": list(store.slot_kinds),
        },
        "shards": {"size": store.shard_size, "per_checkpoint": store.num_shards},
        "checkpoints": store.checkpoint_info,
        "scheduler": {"folder": store.attrs.get("scheduler"), "prediction_type": store.attrs.get("prediction_type")},
        "fingerprints": store.attrs["fingerprints"],
        "size_bytes": store.size_bytes(),
        "freshness": freshness,
        "spec": store.attrs["spec"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0
