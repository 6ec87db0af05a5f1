"""Benchmark: sub-linear queries (the ANN index) and the exact scan against the memory read limit.

1. ANN on a real store: a micro UNet trained on `builtin:outliers` indexes `--real-rows` samples (the
   replayed step and 2 grid slots, k = 4,096, two checkpoints); 16 held-out patches are queried by
   `storage.attribute` with search "exact" and "approximate". `recall_at_10`: the share of the exact
   top-10 proponents and bottom-10 opponents the approximate answer has; `speedup`: the exact scan's
   time over the approximate search's (candidates and their exact rescoring), per query, the store
   resident; `build_s`, `memory_mb` (the ANN files).
2. ANN at scale on `--sizes` (rows x k) synthetic rows made from the real store's: each the direction
   of a random mix of two real rows' directions, perturbed by isotropic noise of relative size
   `--noise`, scaled by a real row's norm (k = 1,024 folds them by a count sketch). TracIn only. Over
   a sweep of lists probed and candidates (`PER_K_SWEPT`), each entry is the fastest setting with
   recall@10 >= 0.95 (else the best recall), with the sweep and `peak_rss_mb` beside it.
3. Scan near the memory limit on `--scan-rows` rows at k = 4,096, resident in each store format: the
   scan for 1 and 16 queries as a ratio to that format's read limit (the fastest plain reduction over
   the same bytes, timed alternately, median of the pairs), its score error against float64, the
   same ratio for its matmul alone (`matmul_ratio_to_limit`), int8 products as a trial, and
   `roofline` (the matmul's GFLOP/s per dtype).
4. The object store (`bench/object_store.py`'s `object_store_ratios`), moto's S3 server on loopback.

Prints one JSON object on stdout (progress on stderr); never asserts a timing. One thread throughout
(`--threads`), as workers run several to a machine. Figures and the machines they came from: see
docs/performance.md#approximate-search-ann. Usage: `python bench/scale.py [--real-rows 4096]
[--sizes 1000000x1024,250000x4096] [--scan-rows 65536] [--parts ann scan object_store]`.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import torch

from api_schemas import DatasetSpec, IndexSpec, ProjectorSpec, QuerySpec, SlotSpec, TrainSpec
from retrac.computers import GradientComputerCache
from retrac.datasets import load_dataset
from retrac.query_side import QueryVectors, query_vectors
from retrac.scoring import (  # the scan's own product
    RowChunk,
    _blocks,
    _products,
    accumulator,
    contributions,
    scan,
)
from retrac.training import train
from storage import GradientStore, attribute, build_ann, run_pending
from storage.ann import (
    MIN_CANDIDATES,
    AnnIndex,
    AnnParams,
    build_indexes,
    candidate_count,
    load_ann,
    structure,
)
from storage.store import RESIDENT_STEP

sys.path.insert(0, str(Path(__file__).parent))
from object_store import object_store_ratios  # bench/object_store.py, beside this file

PARTS = ("ann", "scan", "object_store")

TOP_K = 10
TARGET_RECALL = 0.95
PER_K_SWEPT = (16, 64, 128)
"""Candidates per row asked that a synthetic sweep tries (`storage.ann.CANDIDATES_PER_K` the default)."""
QUERY = QuerySpec(timesteps=10, draws=2, seed=0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median_seconds(job: Callable[[], object], repeats: int) -> float:
    job()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        job()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def best_of(sweep: list[dict]) -> dict:
    """The fastest setting of a sweep with recall@10 >= TARGET_RECALL, else the best recall."""
    good = [s for s in sweep if s["recall_at_10"] >= TARGET_RECALL]
    return dict(
        max(good, key=lambda s: s["speedup"]) if good else max(sweep, key=lambda s: s["recall_at_10"])
    )


def recall(exact: list[set[int]], found: list[set[int]]) -> float:
    return sum(len(e & f) for e, f in zip(exact, found, strict=True)) / sum(len(e) for e in exact)


# --- 1. a real store ------------------------------------------------------------------------------------


def real_store(folder: Path, rows: int) -> GradientStore:
    dataset = DatasetSpec(source="builtin:outliers", resolution=8, limit=rows)
    spec = TrainSpec(dataset=dataset, preset="micro", epochs=4, batch_size=64, lr=2e-3, save_every=2)
    run = train(spec, load_dataset(dataset), folder / "run")
    store = GradientStore.create(folder / "real.zarr", IndexSpec(
        dataset=dataset, run=str(run.folder), slots=SlotSpec(replay=True, grid=2),
        projector=ProjectorSpec(kind="sketch", dim=4096), batch_size=64, shard_size=512,
    ))
    started = time.perf_counter()
    run_pending(store, GradientComputerCache("cpu", threads=torch.get_num_threads()))
    log(
        f"real store: {rows} samples x 3 slots x 2 checkpoints indexed in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return store


def held_out(rows: int) -> torch.Tensor:
    return load_dataset(DatasetSpec(source="builtin:outliers", resolution=8, limit=16, seed=rows + 1)).images


def answer_sets(results: list) -> list[set[str]]:
    return [
        {(m, side, i.sample_id) for m, ranking in r.methods.items() for side in ("proponents", "opponents")
         for i in getattr(ranking, side)}
        for r in results
    ]


def real_ann(store: GradientStore, images: torch.Tensor, repeats: int) -> dict[str, float]:
    started = time.perf_counter()
    params = build_ann(store)
    build_s = time.perf_counter() - started
    models = GradientComputerCache("cpu", threads=torch.get_num_threads())
    approximate = QUERY.model_copy(update={"search": "approximate"})
    exact_sets = answer_sets(attribute(store, images, QUERY, top_k=TOP_K, models=models).results)
    one = images[:1]

    def scan_s(query: QuerySpec) -> float:
        attribute(store, one, query, top_k=TOP_K, models=models)  # warm
        return statistics.median(
            attribute(store, one, query, top_k=TOP_K, models=models).timings.scan_s for _ in range(repeats)
        )

    exact_s, sweep = scan_s(QUERY), []
    loaded = load_ann(store)
    for nprobe in sorted({max(1, params.nlist // d) for d in (16, 8, 4, 2)}):
        for index in loaded.indexes.values():
            index.nprobe = nprobe
        found_sets = answer_sets(attribute(store, images, approximate, top_k=TOP_K, models=models).results)
        sweep.append({"nprobe": nprobe, "recall_at_10": recall(exact_sets, found_sets),
                      "speedup": exact_s / scan_s(approximate)})
        log(f"  real, nprobe {nprobe}: {sweep[-1]}")
    files = (store.path / "ann").glob("*.faiss")
    result = {
        **best_of(sweep),
        "rows": store.num_rows,
        "dim": store.dim * store.num_checkpoints,
        "build_s": build_s,
        "memory_mb": sum(f.stat().st_size for f in files) / 2**20,
        "nlist": params.nlist,
        "default_nprobe": params.nprobe,
        "candidates": candidate_count(store.num_rows, TOP_K),
        "source": "real store (2 checkpoints x k=4096 concatenated; both methods)",
        "sweep": sweep,
    }
    log(f"real ANN: {result}")
    return result


# --- 2. synthetic rows from real ones -------------------------------------------------------------------


def fold(matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """A count sketch of `(n, K)` rows to `dim`: one random bucket and sign per coordinate."""
    generator = torch.Generator().manual_seed(7)
    buckets = torch.randint(dim, (matrix.shape[1],), generator=generator)
    signs = torch.randint(2, (matrix.shape[1],), generator=generator).float() * 2 - 1
    out = torch.zeros(matrix.shape[0], dim)
    return out.index_add_(1, buckets, matrix * signs)


def base_structure(base: torch.Tensor, sample: int = 4096) -> dict:
    """What makes real gradient rows searchable, measured on up to `sample` of the base rows `(n, k)`:
    the share of their directions' energy in the top principal directions, and the spread of norms."""
    picked = base[torch.randperm(base.shape[0], generator=torch.Generator().manual_seed(0))[:sample]]
    norms = picked.norm(dim=1)
    energy = torch.linalg.svdvals(picked / norms.unsqueeze(1)).square().cumsum(0)
    shares = {f"energy_top_{d}": (energy[d - 1] / energy[-1]).item() for d in (16, 64, 256)}
    low, high = torch.quantile(norms, torch.tensor([0.01, 0.99])).tolist()
    return {"rows": len(picked), "dim": base.shape[1], **shares, "norm_p99_over_p1": high / low}


SYNTHETIC_STEP = 16384
"""Rows made at a time: at k = 4,096 each float32 temporary is 256 MB."""


def synthetic_rows(base: torch.Tensor, rows: int, noise: float, seed: int = 0) -> torch.Tensor:
    """`(rows, 1, k)` float16 rows: mixes of two real directions, perturbed, at real norms."""
    generator = torch.Generator().manual_seed(seed)
    norms = base.norm(dim=1)
    directions = base / norms.clamp_min(1e-30).unsqueeze(1)
    out = torch.empty(rows, 1, base.shape[1], dtype=torch.float16)
    for start in range(0, rows, SYNTHETIC_STEP):
        n = min(SYNTHETIC_STEP, rows - start)
        a, b = (torch.randint(base.shape[0], (n,), generator=generator) for _ in range(2))
        mix = torch.rand(n, 1, generator=generator)
        row = mix * directions[a] + (1 - mix) * directions[b]
        row = row / row.norm(dim=1, keepdim=True)
        row = row + torch.randn(n, base.shape[1], generator=generator) * (noise / base.shape[1] ** 0.5)
        scale = norms[torch.randint(base.shape[0], (n,), generator=generator)]
        out[start : start + n, 0] = (row / row.norm(dim=1, keepdim=True) * scale.unsqueeze(1)).half()
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB): what a size needs, with the
    real store and the models beside it, as it only grows over a run."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def resident_chunks(
    projected: torch.Tensor, norms: torch.Tensor
) -> Callable[[], Iterator[tuple[int, list[RowChunk]]]]:
    def chunks() -> Iterator[tuple[int, list[RowChunk]]]:
        for start in range(0, projected.shape[0], RESIDENT_STEP):
            part = slice(start, start + RESIDENT_STEP)
            yield start, [RowChunk(projected[part], norms[part])]
    return chunks


def synthetic_ann(base: torch.Tensor, queries: torch.Tensor, rows: int, noise: float, repeats: int) -> dict:
    """ANN against the exact scan on `rows` synthetic rows of `base`'s k, for the real `queries` `(Q, k)`."""
    dim = base.shape[1]
    started = time.perf_counter()
    projected = synthetic_rows(base, rows, noise)
    norms = torch.ones(rows, 1)  # TracIn alone reads no norms
    log(f"{rows} x {dim}: synthetic rows made in {time.perf_counter() - started:.0f} s")
    chunks = resident_chunks(projected, norms)
    vectors = flat_vectors(queries)

    def exact(q: list[QueryVectors]):
        return scan(chunks(), q, [1.0], top_k=TOP_K, methods=["tracin"])

    truth = exact(vectors)
    exact_sets = [
        set(truth.proponents["tracin"].rows[i].tolist())
        | {-1 - r for r in truth.opponents["tracin"].rows[i].tolist()}
        for i in range(len(queries))
    ]
    one = flat_vectors(queries[:1])
    exact_s = median_seconds(lambda: exact(one), repeats)
    params = AnnParams.for_rows(rows)
    started = time.perf_counter()
    index = build_indexes(chunks, rows, [1.0], params, methods=["tracin"])["tracin"]
    build_s = time.perf_counter() - started
    memory_mb = (index.ntotal * (index.code_size + 8) + index.nlist * index.d * 4) / 2**20
    log(f"{rows} x {dim}: exact scan {exact_s:.3f} s per query; {structure(index)} built in {build_s:.0f} s")

    def approximate(matrix: np.ndarray, q: list[QueryVectors], count: int):
        candidates = AnnIndex({"tracin": index}, params).candidates({"tracin": matrix}, count, TOP_K)
        chunk = [RowChunk(projected[candidates], norms[candidates])]
        ranking = scan([(0, chunk)], q, [1.0], top_k=TOP_K, methods=["tracin"])
        return candidates, ranking

    sweep = []
    matrix = queries.numpy()
    for nprobe in sorted({max(1, params.nlist // d) for d in (64, 32, 16, 8, 4)}):
        for count in sorted({max(n * TOP_K, MIN_CANDIDATES) for n in PER_K_SWEPT}):
            index.nprobe = nprobe
            candidates, ranking = approximate(matrix, vectors, count)
            found = [set(candidates[ranking.proponents["tracin"].rows[i]].tolist())
                     | {-1 - r for r in candidates[ranking.opponents["tracin"].rows[i]].tolist()}
                     for i in range(len(queries))]
            seconds = median_seconds(lambda: approximate(matrix[:1], one, count), repeats)  # noqa: B023
            sweep.append({"nprobe": nprobe, "candidates": count, "recall_at_10": recall(exact_sets, found),
                          "speedup": exact_s / seconds})
            log(f"  nprobe {nprobe}, {count} candidates: {sweep[-1]}")
    return {
        **best_of(sweep),
        "rows": rows,
        "dim": dim,
        "build_s": build_s,
        "memory_mb": memory_mb,
        "nlist": params.nlist,
        "structure": structure(index),
        "exact_s": exact_s,
        "peak_rss_mb": peak_rss_mb(),
        "source": f"synthetic: real rows mixed and perturbed (noise {noise}); TracIn",
        "sweep": sweep,
    }


# --- 3. the scan near the read limit --------------------------------------------------------------------

STORE_FORMATS = ("float16", "bfloat16", "float32")


def flat_vectors(queries: torch.Tensor) -> list[QueryVectors]:
    """Query vectors of one checkpoint whose G (and G^) are the rows of `queries` `(Q, k)`: one timestep."""
    return [QueryVectors(per_timestep=queries.unsqueeze(1), timestep_norms=torch.ones(len(queries), 1),
                         bands=torch.zeros(1, dtype=torch.int64))]


def read_limits(rows: torch.Tensor) -> list[Callable[[], object]]:
    """Plain reductions over the bytes of `rows` `(n, ..., k)`: sums as int64 words and as float32
    ones, and a float32 matrix-vector product with ones (BLAS streams it faster than torch's sums); the
    fastest is the limit."""
    words = rows.reshape(rows.shape[0], -1).view(torch.float32)
    ones = torch.ones(words.shape[1])
    return [rows.view(torch.int64).sum, words.sum, lambda: words @ ones]


def paired_ratio(
    limits: list[Callable[[], object]], job: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """(median seconds of `job`, median of limit seconds / job seconds), the limit the fastest of
    `limits`, timed alternately with the job so that what other processes take from the memory bus
    hits both alike."""
    for run in (*limits, job):
        run()
    times, ratios = [], []
    for _ in range(repeats):
        limit_s = min(seconds_of(run) for run in limits)
        times.append(seconds_of(job))
        ratios.append(limit_s / times[-1])
    return statistics.median(times), statistics.median(ratios)


def seconds_of(job: Callable[[], object]) -> float:
    started = time.perf_counter()
    job()
    return time.perf_counter() - started


def roofline(dim: int, repeats: int) -> dict:
    """GFLOP/s of this machine's matmul in each dtype on one thread: a square 1,024^3 product, and the
    scan's own product (`retrac.scoring._products`: 16 query columns times 16,384 rows of `dim`).
    A scan of 16 queries can go no faster than the latter allows, whatever the memory. (float16 rows
    are multiplied in float32: a CPU without float16 arithmetic runs torch's float16 matmul slowly.)"""
    generator = torch.Generator().manual_seed(5)
    square = torch.randn(1024, 1024, generator=generator)
    rows = torch.randn(RESIDENT_STEP, 1, dim, generator=generator)
    sides = torch.randn(16, dim, generator=generator)
    out = torch.empty(16, RESIDENT_STEP)
    result = {}
    for name in ("float32", "bfloat16", "float16"):
        matrix, block = square.to(getattr(torch, name)), rows.to(getattr(torch, name))
        result[name] = {"gemm_gflops": 2 * 1024**3 / median_seconds(lambda m=matrix: m @ m, repeats) / 1e9}
        if name != "float16":  # the scan converts float16 rows to float32 before its product
            seconds = median_seconds(partial(_products, block, sides, out), repeats)
            result[name]["scan_product_gflops_q16"] = 2 * 16 * RESIDENT_STEP * dim / seconds / 1e9
    codes = square.clamp(-127, 127).to(torch.int8)
    result["int8"] = {
        "gemm_gflops": 2 * 1024**3 / median_seconds(lambda: torch._int_mm(codes, codes), repeats) / 1e9
    }
    log(f"roofline: {result}")
    return result


def scan_limits(rows_f32: torch.Tensor, repeats: int) -> dict:
    """The store's scan (`retrac.scoring.scan`, TracIn, top-10) of resident rows in each store format,
    as a ratio to that format's read limit (a plain reduction over the same resident bytes), with its
    largest score error against float64 scores of the float32 rows, relative to the largest score, and
    the ratio of its matmul alone (`matmul_ratio_to_limit`: the products of every chunk, nothing else),
    the most the scan could reach. The top-level `ratio_to_limit` is the default format's (float16).
    Then int8 products with a scale per row and per query (`torch._int_mm`), a trial rather than a
    store format, and the `roofline`."""
    n = rows_f32.shape[0]
    generator = torch.Generator().manual_seed(3)
    scales = rows_f32.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127
    int8 = (rows_f32 / scales).round().clamp(-127, 127).to(torch.int8)
    stored = {name: rows_f32.to(getattr(torch, name)).unsqueeze(1) for name in STORE_FORMATS}
    ones = torch.ones(n, 1)
    result: dict = {"rows": n, "dim": rows_f32.shape[1]}
    for count in (1, 16):
        queries = torch.randn(count, rows_f32.shape[1], generator=generator)
        reference = rows_f32.double() @ queries.double().T
        top = reference.abs().max().item()
        vectors = flat_vectors(queries)
        formats = {}
        for name, rows in stored.items():
            chunks = resident_chunks(rows, ones)
            products = torch.empty(count, RESIDENT_STEP)

            def scanned(chunks=chunks, vectors=vectors) -> object:
                return scan(chunks(), vectors, [1.0], top_k=TOP_K, methods=["tracin"])

            def matmul(chunks=chunks, queries=queries, products=products) -> None:
                for _, (chunk,) in chunks():
                    widest = accumulator(chunk.projected.shape[-1])
                    for start, block in _blocks(chunk.projected, slice(None), widest):
                        _products(block, queries, products[:, start : start + block.shape[0]])

            seconds, ratio = paired_ratio(read_limits(rows), scanned, repeats)
            scores = contributions([RowChunk(rows, ones)], vectors, [1.0], ["tracin"])["tracin"][:, :, 0]
            formats[name] = {
                "rows_per_s": n / seconds, "ratio_to_limit": ratio, "limit_rows_per_s": n / seconds / ratio,
                "matmul_ratio_to_limit": paired_ratio(read_limits(rows), matmul, repeats)[1],
                "score_error": (scores.double() - reference).abs().max().item() / top,
            }
        q_scales = queries.abs().amax(dim=1, keepdim=True) / 127
        padded = torch.nn.functional.pad((queries / q_scales).round().to(torch.int8).T.contiguous(),
                                         (0, max(0, 8 - count)))  # _int_mm wants >= 8 columns

        def int8_product(padded=padded, count=count, q_scales=q_scales) -> torch.Tensor:
            return torch._int_mm(int8, padded)[:, :count].float() * scales * q_scales.T

        seconds, ratio = paired_ratio(read_limits(int8), int8_product, repeats)
        formats["int8_row_scale_product"] = {
            "rows_per_s": n / seconds, "ratio_to_limit": ratio, "limit_rows_per_s": n / seconds / ratio,
            "score_error": (int8_product().double() - reference).abs().max().item() / top,
        }
        result[f"q{count}"] = {**formats["float16"], "formats": formats}
        log(f"q{count}: {formats}")
    result["roofline"] = roofline(rows_f32.shape[1], repeats)
    return result


def rows_parts(args: argparse.Namespace) -> dict:
    """The ANN and scan parts, on a real store and rows made from it."""
    folder = Path(tempfile.mkdtemp(prefix="retrac-bench-scale-"))
    try:
        store = real_store(folder, args.real_rows)
        images = held_out(args.real_rows)
        report: dict = {}
        last = store.num_checkpoints - 1
        base = store.rows_at(last, np.arange(store.num_rows)).projected.float().reshape(-1, store.dim)
        base = base[base.norm(dim=1) > 0]
        models = GradientComputerCache("cpu", threads=args.threads)
        queries = query_vectors(models.computer(store.plan, last), images, QUERY).tracin
        if "ann" in args.parts:
            report["base_rows"] = base_structure(base)
            log(f"base rows: {report['base_rows']}")
            report["ann"] = [real_ann(store, images, args.repeats)]
            for size in filter(None, args.sizes.split(",")):
                rows, dim = (int(v) for v in size.lower().split("x"))
                folded = (base, queries) if dim == base.shape[1] else (fold(base, dim), fold(queries, dim))
                report["ann"].append(synthetic_ann(*folded, rows, args.noise, args.repeats))
        if "scan" in args.parts:
            rows_f32 = synthetic_rows(base, args.scan_rows, args.noise)[:, 0].float()
            report["scan"] = scan_limits(rows_f32, args.repeats)
        return report
    finally:
        shutil.rmtree(folder, ignore_errors=True)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real-rows", type=int, default=4096, help="samples of the real store")
    parser.add_argument(
        "--sizes", default="1000000x1024,250000x4096", help="synthetic rows x k, comma-separated"
    )
    parser.add_argument(
        "--noise", type=float, default=0.5, help="relative size of the synthetic rows' perturbation"
    )
    parser.add_argument("--scan-rows", type=int, default=65536, help="rows of the scan-limit measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    report: dict = {}
    if {"ann", "scan"} & set(args.parts):
        report |= rows_parts(args)
    if "object_store" in args.parts:
        report["object_store"] = object_store_ratios(repeats=args.repeats)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
