"""An approximate maximum-inner-product (ANN) index over a store's rows: sub-linear queries.

Over C checkpoints a score is one inner product (method.md section 4, weights folded into the rows):

    TracIn(z, q) = < concat_c w_c mean_s g_c(z, s),            concat_c G_c(q)  >
    ReTrac(z, q) = < concat_c w_c mean_s g_c(z, s)/||g_c(z, s)||, concat_c G^_c(q) >

so proponents are a maximum-inner-product search over the row vectors and opponents the same search
for the negated query. One FAISS index per method holds the row vectors.

Structure: an inverted file (IVF, `nlist` k-means lists, `nprobe` of them searched, each row in the
list of largest inner product) whose rows are 4-bit product-quantizer codes of their residual to the
list's centroid (`PQ{d/8}x4fs`: one code per 8 coordinates, 1/32 of the float16 row; per fewer below
2,048, `sub_dim`), scanned by FAISS's fast-scan kernels (lookup tables in SIMD registers). Search is
two-stage: the codes propose `CANDIDATES_PER_K` per row asked, rescored exactly from the store by the
scan's own arithmetic, so every score and contribution returned is exact: approximation can miss a
row, never give a wrong number (recall, speed, what was tried: docs/performance.md#approximate-search-ann).

Layout, in the store's folder (deleted with it): `ann/manifest.json` (format, the store's uid, the
rows digest of the weights and every shard digest it was built from, the structure and its
parameters, per method its file and the xxh3_64 of its bytes) and `ann/<method>.faiss`
(`faiss.serialize_index`). The files are written first and the manifest last, each by a rename, so
a half-written ANN index is no index. A search checks the manifest against the store (rebuilt or
other shards: stale) and each file against its digest (damaged) and refuses with an `AnnIndexError`
saying how to rebuild.
"""

from __future__ import annotations

import json
import math
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import faiss
import numpy as np
import torch
import xxhash

from api_schemas import Method
from retrac.methods import PRECONDITIONED
from retrac.query_side import QueryVectors
from retrac.scoring import METHODS, SCAN_ROWS, RowChunk, slot_means
from storage.errors import AnnIndexError, IncompleteStoreError
from storage.store import GradientStore

FORMAT = "retrac-ann/2"
FOLDER = "ann"
MANIFEST = "manifest.json"

CANDIDATES_PER_K = 128
"""Candidates the index proposes per row asked (at least `MIN_CANDIDATES`), all rescored exactly: the
4-bit codes rank roughly, so the net is wide; a wider one costs rows read and rescored (see
docs/performance.md#parameters-candidates-and-codes)."""
MIN_CANDIDATES = 256
CANDIDATE_SHARE = 1 / 16
"""Most candidates per query, method and side, as a share of the rows (but at least `MIN_CANDIDATES`):
four such searches rescore up to a quarter of a small store, and more would cost as much as the exact
scan (see docs/performance.md#parameters-candidates-and-codes)."""

SUB_DIM = 8
"""Coordinates per 4-bit product-quantizer code (rows are padded with zeros to a multiple of it), fewer
for short vectors so that they keep `MIN_CODES` codes: each code ranks roughly, many average out
(see docs/performance.md#parameters-candidates-and-codes)."""
MIN_CODES = 256
CODEBOOK = 16
"""Centroids of a 4-bit codebook: a store of fewer rows trains on its rows repeated."""

TRAINING_ROWS_PER_LIST = 64
"""k-means training rows per IVF list (FAISS warns below 39): more fit the lists better, slower."""

PROBED_SHARE = 1 / 8
"""Share of the lists a search probes by default (at least one): probing the 4-bit codes is cheap, so
recall first (bench/scale.py, 250k rows at k = 4,096, 640 candidates: 31 of 500 lists 0.97, 62 0.98-0.99,
125 0.98-0.997); `retrac index ann --probe` sets it."""

REBUILD = "build it with `retrac index ann STORE` (an indexing job builds it when it completes)"


@dataclass(frozen=True)
class AnnParams:
    """The structure of an ANN index: `nlist` IVF lists, `nprobe` searched per query."""

    nlist: int
    nprobe: int

    @classmethod
    def for_rows(cls, rows: int) -> AnnParams:
        """About sqrt(N) lists (FAISS's guidance is 4-16 sqrt(N) at millions of rows; fewer, larger lists
        recall better at the same share probed), and never fewer training rows than lists need."""
        return cls.with_lists(max(1, min(round(math.sqrt(rows)), rows // TRAINING_ROWS_PER_LIST)))

    @classmethod
    def with_lists(cls, nlist: int) -> AnnParams:
        """`nlist` lists, `PROBED_SHARE` of them probed."""
        return cls(nlist=nlist, nprobe=max(1, round(nlist * PROBED_SHARE)))


def row_vectors(
    chunks: Sequence[RowChunk], weights: Sequence[float], methods: Sequence[Method] = METHODS
) -> dict[Method, np.ndarray]:
    """Row vectors `(n, C k)` float32 of each of `methods`: each checkpoint's slot mean, times its
    weight, side by side (the training side of the one inner product)."""
    parts: dict[Method, list[torch.Tensor]] = {m: [] for m in methods}
    for chunk, weight in zip(chunks, weights, strict=True):
        means = slot_means(chunk)
        for method in methods:
            parts[method].append(weight * means[method])
    return {m: torch.cat(p, dim=1).numpy() for m, p in parts.items()}


def query_matrix(
    vectors: Sequence[QueryVectors], checkpoints: Sequence[int], num_checkpoints: int, method: Method
) -> np.ndarray:
    """Query vectors `(Q, C k)` float32 of one method over every checkpoint of the index: zeros at the
    checkpoints not chosen, so the inner product is the score over the chosen ones alone."""
    chosen = {
        c: v.mean_vector(method).detach().float().cpu() for c, v in zip(checkpoints, vectors, strict=True)
    }
    zeros = torch.zeros_like(next(iter(chosen.values())))
    return torch.cat([chosen.get(c, zeros) for c in range(num_checkpoints)], dim=1).numpy()


def rows_digest(store: GradientStore) -> str:
    """xxh3_64 of what the row vectors are made of: the store's uid, the weights and every shard digest."""
    hasher = xxhash.xxh3_64()
    hasher.update(json.dumps([store.attrs.get("uid"), store.weights]).encode())
    for checkpoint in range(store.num_checkpoints):
        hasher.update(store.shard_digests(checkpoint).tobytes())
    return hasher.hexdigest()


AnnProgress = Callable[[str, int, int], None]
"""Called with (phase, units just finished, units in the phase) while an ANN index is built: phases
`ANN_PHASES`, the passes over the rows counting rows, the training counting methods."""

ANN_PHASES = ("ann: rows sampled", "ann: lists trained", "ann: rows added")


def build_ann(
    store: GradientStore, params: AnnParams | None = None, on_progress: AnnProgress | None = None
) -> AnnParams:
    """Build the ANN index of a complete store (both methods, every checkpoint) and write it beside the
    store, replacing any earlier one; `on_progress` hears of each phase's steps. Returns the parameters
    used."""
    everything = list(range(store.num_checkpoints))
    if not store.status().complete:
        raise IncompleteStoreError(
            f"{store.path.name}: not every shard is done; finish indexing (`retrac index run`) first"
        )
    params = params or AnnParams.for_rows(store.num_rows)
    digest = rows_digest(store)
    indexes = build_indexes(
        lambda: store.chunks(everything, SCAN_ROWS),
        store.num_rows,
        store.weights,
        params,
        on_progress=on_progress,
    )
    _write(store, indexes, params, digest)
    return params


def build_indexes(
    chunks: Callable[[], Iterable[tuple[int, Sequence[RowChunk]]]],
    num_rows: int,
    weights: Sequence[float],
    params: AnnParams,
    methods: Sequence[Method] = METHODS,
    on_progress: AnnProgress | None = None,
) -> dict[Method, Any]:
    """One FAISS index per method over the row vectors of every row `chunks()` yields, in two passes:
    the first keeps the k-means training rows (every `stride`-th row), the second adds every row. A
    method's training rows are let go as they are joined (at 1M rows of k = 4,096 they are 1 GB)."""
    sampled, trained, added = (_step(on_progress, phase, total) for phase, total in zip(
        ANN_PHASES, (num_rows, len(methods), num_rows), strict=True
    ))
    faiss.omp_set_num_threads(torch.get_num_threads())
    stride = max(1, num_rows // (params.nlist * TRAINING_ROWS_PER_LIST))
    training: dict[Method, list[np.ndarray]] = {m: [] for m in methods}
    for first, part in chunks():
        keep = (np.arange(first, first + part[0].projected.shape[0]) % stride) == 0
        vectors = row_vectors(part, weights, methods)
        for method in methods:
            training[method].append(vectors[method][keep])
        sampled(len(keep))
    indexes = {}
    for method in methods:
        rows = coded(np.concatenate(training.pop(method)))
        index = cast(faiss.IndexIVFPQFastScan, faiss.index_factory(  # faiss returns the factory's class
            rows.shape[1], f"IVF{params.nlist},PQ{rows.shape[1] // sub_dim(rows.shape[1])}x4fs",
            faiss.METRIC_INNER_PRODUCT,
        ))
        index.pq.cp.min_points_per_centroid = 1  # a small store's codebooks fit what rows it has
        index.train(rows if len(rows) >= CODEBOOK else np.resize(rows, (CODEBOOK, rows.shape[1])))
        index.nprobe = params.nprobe
        indexes[method] = index
        trained(1)
    for _, part in chunks():
        vectors = row_vectors(part, weights, methods)
        for method in methods:
            indexes[method].add(coded(vectors[method]))
        added(part[0].projected.shape[0])
    return indexes


def _step(on_progress: AnnProgress | None, phase: str, total: int) -> Callable[[int], None]:
    """`on_progress` bound to one phase and its size (a no-op without one)."""
    return (lambda done: on_progress(phase, done, total)) if on_progress is not None else (lambda _: None)


def structure(index: Any) -> str:
    """An index's FAISS factory string: its lists and codes."""
    return f"IVF{index.nlist},PQ{index.pq.M}x4fs"


def sub_dim(dim: int) -> int:
    """Coordinates per code of `dim`-coordinate vectors (`SUB_DIM`, fewer for short vectors)."""
    return max(1, min(SUB_DIM, dim // MIN_CODES))


def coded(matrix: np.ndarray) -> np.ndarray:
    """`(n, d)` vectors as FAISS takes them: contiguous float32, zero-padded to a multiple of
    `sub_dim(d)` coordinates (zeros change no inner product)."""
    padding = -matrix.shape[1] % sub_dim(matrix.shape[1])
    padded = np.pad(matrix, ((0, 0), (0, padding))) if padding else matrix
    return np.ascontiguousarray(padded, dtype=np.float32)


def build_ann_when_complete(store: GradientStore, on_progress: AnnProgress | None = None) -> bool:
    """The job step after indexing: build the ANN index once every shard is done, unless a current one
    is there (`on_progress` as `build_ann`'s). Returns whether it built. Two workers finishing the last
    shards together may both build; each writes whole files by rename, so either's complete index is
    what remains."""
    if not store.status().complete or _current(store):
        return False
    build_ann(store, on_progress=on_progress)
    return True


class AnnIndex:
    """A loaded, checked ANN index: candidate rows for query matrices."""

    def __init__(self, indexes: dict[Method, Any], params: AnnParams) -> None:
        self.indexes, self.params = indexes, params

    def candidates(self, queries: dict[Method, np.ndarray], count: int, needed: int) -> np.ndarray:
        """Sorted unique rows that the index proposes as the `count` largest and the `count` smallest
        inner products of each query `(Q, C k)` of each method: a search whose probed lists hold fewer
        than `needed` rows (the k asked, at most the rows indexed) is redone over every list. trak and
        dtrak search TracIn's row vectors (the same slot means) with their preconditioned queries."""
        faiss.omp_set_num_threads(torch.get_num_threads())
        found = []
        for method, matrix in queries.items():
            index = self.indexes["tracin" if method in PRECONDITIONED else method]
            for signed in (coded(matrix), coded(-matrix)):
                labels = index.search(signed, count)[1]
                if (labels >= 0).sum(axis=1).min() < needed:
                    labels = index.search(
                        signed, count, params=faiss.SearchParametersIVF(nprobe=index.nlist)  # type: ignore[call-arg]
                    )[1]
                found.append(labels[labels >= 0])
        return np.unique(np.concatenate(found)).astype(np.int64)


def candidate_chunks(
    store: GradientStore, checkpoints: Sequence[int], vectors: Sequence[QueryVectors], *, top_k: int,
    methods: Sequence[Method],
) -> tuple[np.ndarray, list[RowChunk]]:
    """The rows the ANN index proposes for every query and method, and their stored rows at each of
    `checkpoints`, to rescore exactly. An AnnIndexError if the index is missing, stale or damaged."""
    ann = load_ann(store)
    queries = {m: query_matrix(vectors, checkpoints, store.num_checkpoints, m) for m in methods}
    count = candidate_count(store.num_rows, top_k)
    rows = ann.candidates(queries, count, min(top_k, store.num_rows))
    return rows, [store.rows_at(c, rows) for c in checkpoints]


def candidate_count(num_rows: int, top_k: int) -> int:
    """Candidates the index proposes per query, method and side for the top `top_k` of `num_rows`."""
    wanted = min(CANDIDATES_PER_K * top_k, round(num_rows * CANDIDATE_SHARE))
    return min(num_rows, max(wanted, MIN_CANDIDATES, top_k))


_loaded: weakref.WeakKeyDictionary[GradientStore, tuple[str, AnnIndex]] = weakref.WeakKeyDictionary()
_loading = threading.Lock()


def load_ann(store: GradientStore) -> AnnIndex:
    """The store's ANN index, checked against the store's current rows on every call and read (and its
    files checked against their digests) once per opened store and manifest (a rebuilt index is read
    again)."""
    manifest = _manifest(store)
    key = json.dumps(manifest, sort_keys=True)
    with _loading:
        cached = _loaded.get(store)
        if cached is not None and cached[0] == key:
            return cached[1]
        indexes = {}
        for method in METHODS:
            entry = manifest["methods"][method]
            data = store.location.read(f"{FOLDER}/{entry['file']}") or b""
            if xxhash.xxh3_64_hexdigest(data) != entry["digest"]:
                raise AnnIndexError(
                    f"{store.path.name}: the ANN index file {entry['file']} does not match its digest "
                    f"(damaged); {_rebuild(store)}"
                )
            indexes[method] = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        loaded = AnnIndex(indexes, AnnParams(**manifest["params"]))
        _loaded[store] = (key, loaded)
        return loaded


def _manifest(store: GradientStore) -> dict[str, Any]:
    """The manifest of a current ANN index of `store`, or an AnnIndexError saying what is wrong."""
    text = store.location.read(f"{FOLDER}/{MANIFEST}")
    if text is None:
        raise AnnIndexError(
            f"{store.path.name} has no ANN index for approximate search; {_rebuild(store)}, or search exactly"
        )
    try:
        manifest = json.loads(text)
        built_as, fresh = manifest["format"], manifest["rows_digest"] == rows_digest(store)
    except (ValueError, KeyError, TypeError) as error:
        raise AnnIndexError(
            f"{store.path.name}: its ANN manifest is unreadable ({error}); {_rebuild(store)}"
        ) from error
    if built_as != FORMAT:
        raise AnnIndexError(
            f"{store.path.name}: its ANN index is in format {built_as!r}, which this version does not read "
            f"(it reads {FORMAT!r}); {_rebuild(store)}"
        )
    if not fresh:
        raise AnnIndexError(
            f"{store.path.name}: its ANN index was built from other rows than the store holds now (stale); "
            f"{_rebuild(store)}"
        )
    return manifest


def _current(store: GradientStore) -> bool:
    try:
        _manifest(store)
    except AnnIndexError:
        return False
    return True


def _write(store: GradientStore, indexes: dict[Method, Any], params: AnnParams, digest: str) -> None:
    """Each index file, then the manifest, each written whole (`Location.write`): a reader sees the
    old index or the new one, and a manifest only after its files."""
    files = {}
    for method, index in indexes.items():
        data = faiss.serialize_index(index).tobytes()
        store.require_live()
        store.location.write(f"{FOLDER}/{method}.faiss", data)
        files[method] = {"file": f"{method}.faiss", "digest": xxhash.xxh3_64_hexdigest(data)}
    manifest = {
        "format": FORMAT,
        "rows_digest": digest,
        "structure": f"{structure(next(iter(indexes.values())))}, inner product",
        "params": {"nlist": params.nlist, "nprobe": params.nprobe},
        "methods": files,
    }
    store.require_live()
    store.location.write(f"{FOLDER}/{MANIFEST}", json.dumps(manifest, indent=1).encode())


def _rebuild(store: GradientStore) -> str:
    return REBUILD.replace("STORE", store.path.name)
