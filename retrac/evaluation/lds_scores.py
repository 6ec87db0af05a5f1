"""Score matrices the LDS harness judges: every engine method under every query estimator, and the
pixel-space cosine nearest-neighbour baseline.

`Scores` maps method -> estimator -> query split -> `(Q, N)` float64 scores (higher: more supportive).
Engine methods are scored through the one attribution path (`Attributor.score_every_row`: the
scores `attribute` ranks, for every sample, without ranking or band parts). `METHOD_INDEX` says which
IndexSpec fields a method needs beyond the harness's base index; methods with the same fields share one
index, built only when one of its matrices is not in the `ScoreCache` yet. An estimator an index cannot serve
is skipped with the engine's reason. `pixel_cosine` is the floor: the cosine of the flattened pixels.

The cache holds one `.npy` per (model, index spec, query spec, method, split images), named by their
digest (the model by its checkpoints' fingerprints, not by paths) and written under a temporary name
then renamed, so a killed run resumes without a half-written matrix.
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from api_schemas import IndexSpec, KernelSpec, Method, QuerySpec
from retrac.attribution import Attributor
from retrac.exceptions import EvaluationError, RetracError
from retrac.methods import ROWS
from retrac.plan import IndexPlan

Scores = dict[str, dict[str, dict[str, np.ndarray]]]
"""method -> estimator -> split -> `(Q, N)` scores."""

BASELINE = "pixel-cosine"
"""The baseline's method name; its one estimator is `BASELINE_ESTIMATOR`."""
BASELINE_ESTIMATOR = "baseline"
DEFAULT_ESTIMATOR = "paper"
"""The name under which results appear when `QuerySpec` offers no choice of estimator."""

METHOD_INDEX: dict[str, dict[str, Any]] = {
    method: {"output_function": rows, "kernel": KernelSpec()} for method, rows in ROWS.items()
}
"""IndexSpec fields each engine method needs beyond the base index (methods with equal fields share one):
its rows' output function, and the TRAK kernel (built for every index, so loss rows serve tracin,
retrac and trak from one index, output-norm rows dtrak)."""


def query_estimators() -> dict[str, dict[str, Any]]:
    """The query estimators `QuerySpec` offers: name -> the QuerySpec fields that choose it.

    Read from the spec's `estimator` field (a Literal), so a new estimator is evaluated as soon as
    the spec lists it; without such a field there is one, the paper's.
    """
    field = QuerySpec.model_fields.get("estimator")
    if field is None:
        return {DEFAULT_ESTIMATOR: {}}
    names = typing.get_args(field.annotation)
    if not names:
        raise EvaluationError(f"QuerySpec.estimator is {field.annotation}, not a Literal of names")
    return {str(name): {"estimator": name} for name in names}


def pixel_cosine(training: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """`(Q, N)` cosine similarity, float64, of each query's flattened pixels with each training image's."""
    train = torch.nn.functional.normalize(training.flatten(1).double(), dim=1)
    query = torch.nn.functional.normalize(queries.flatten(1).double(), dim=1)
    return (query @ train.T).numpy()


class ScoreCache:
    """`(Q, N)` matrices on disk under `folder`, by digest (module docstring); `model` identifies the
    run and data the indexes are built from (fingerprints)."""

    def __init__(self, folder: Path, model: str) -> None:
        self.folder, self.model = folder, model
        folder.mkdir(parents=True, exist_ok=True)

    def key(self, index: IndexSpec, query: QuerySpec, method: str, images: torch.Tensor) -> str:
        spec = index.model_dump(mode="json", exclude={"run": True, "dataset": {"source"}})
        digest = hashlib.sha256(
            json.dumps([self.model, spec, query.model_dump(mode="json"), method, list(images.shape)]).encode()
        )
        digest.update(np.ascontiguousarray(images.numpy(), dtype=np.float32).tobytes())
        return digest.hexdigest()[:32]

    def get(self, key: str) -> np.ndarray | None:
        file = self.folder / f"{key}.npy"
        return np.load(file, allow_pickle=False) if file.is_file() else None

    def put(self, key: str, matrix: np.ndarray) -> None:
        partial = self.folder / f".partial-{key}-{os.getpid()}.npy"
        np.save(partial, matrix)
        os.replace(partial, self.folder / f"{key}.npy")


def score_matrix(
    attributor: Attributor, images: torch.Tensor, query: QuerySpec, methods: Sequence[str], batch: int
) -> dict[str, np.ndarray]:
    """Full `(Q, N)` score matrices per method, float64, through the one scoring path
    (`Attributor.score_every_row`: the scores `attribute` ranks), `batch` query images at a time."""
    chosen = [typing.cast(Method, m) for m in methods]
    parts: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for start in range(0, len(images), batch):
        found = attributor.score_every_row(images[start : start + batch], query, methods=chosen)
        for method in chosen:
            parts[method].append(found[method].double().numpy())
    return {m: np.concatenate(p) for m, p in parts.items()}


def engine_scores(
    base: IndexSpec,
    methods: Sequence[str],
    splits: dict[str, torch.Tensor],
    query: QuerySpec,
    cache: ScoreCache,
    *,
    batch: int,
    on_index: Callable[[str], None] | None = None,
) -> tuple[Scores, dict[str, str]]:
    """Scores of `methods` under every estimator for each split's images; (scores, skipped estimators).

    `on_index(description)` hears of each index built (the expensive step)."""
    unknown = [m for m in methods if m not in METHOD_INDEX]
    if unknown:
        raise EvaluationError(f"methods {unknown} are not engine methods; choose from {list(METHOD_INDEX)}")
    groups: dict[str, list[str]] = {}
    for method in methods:
        groups.setdefault(json.dumps(METHOD_INDEX[method], sort_keys=True, default=str), []).append(method)
    scores: Scores = {m: {} for m in methods}
    skipped: dict[str, str] = {}
    for members in groups.values():
        spec = base.model_copy(update=METHOD_INDEX[members[0]])
        attributor: Attributor | None = None
        for name, fields in query_estimators().items():
            asked = query.model_copy(update=fields)
            keys = {
                (m, s): cache.key(spec, asked, m, images) for m in members for s, images in splits.items()
            }
            found: dict[tuple[str, str], np.ndarray | None] = {
                pair: cache.get(key) for pair, key in keys.items()
            }
            for split, images in splits.items():
                if all(found[m, split] is not None for m in members):
                    continue
                if attributor is None:
                    attributor = Attributor(IndexPlan.resolve(spec))
                    if on_index is not None:
                        on_index(f"index for {', '.join(members)}")
                    attributor.index()
                try:
                    computed = score_matrix(attributor, images, asked, members, batch)
                except RetracError as error:
                    skipped[f"{'/'.join(members)}:{name}"] = str(error)
                    break
                for method, matrix in computed.items():
                    cache.put(keys[method, split], matrix)
                    found[method, split] = matrix
            for (method, split), stored in found.items():
                if stored is not None:
                    scores[method].setdefault(name, {})[split] = stored
    for method in methods:
        complete = {e: by for e, by in scores[method].items() if set(by) == set(splits)}
        scores[method] = complete
    if not any(scores.values()):
        raise EvaluationError(f"no query estimator could score this index: {skipped}")
    return scores, skipped
