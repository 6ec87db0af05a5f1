"""How the paper judges attributions (method.md section 6), as pure functions on scores and rankings.

Shapes: a score matrix is `(Q, N)` (one row per query, one column per training sample, higher means
more supportive); a ranking is `(Q, k)` training-sample positions, best first, as `top_k` returns it.
Group labels are plain strings per query and per training sample.

- `u_at_k`: specificity, the unique share of the pooled top-k of all queries.
- `generally_influential`, `pooled_share`: samples in the top-k of many queries, and the part of all
  top-k lists they fill.
- `precision_at_k`, `intrusion`: do a query's proponents come from its own group?
- `self_ranks`: the rank of a query among the training samples when it is one of them.
- `recall_at_count`, `roc_auc`, `group_auc`: outlier detection by self-influence.
- `fit`: Pearson, Spearman and the least-squares slope of y on x (norm vs timestep).
- `subset_predictions`, `lds_per_query`, `bootstrap_interval`: the linear datamodeling score (LDS)
  of attributions against losses of models retrained on subsets, with its bootstrap interval.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from retrac.exceptions import EvaluationError


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The `(Q, k)` positions of each query's k highest scores, highest first (ties: lower position first)."""
    scores = _matrix(scores, "scores")
    if not 1 <= k <= scores.shape[1]:
        raise EvaluationError(f"k must lie in 1..{scores.shape[1]} (the number of training samples), got {k}")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def u_at_k(ranking: np.ndarray) -> float:
    """`|unique samples in all top-k lists| / (Q k)`: 1 when no two queries share a proponent."""
    ranking = _matrix(ranking, "ranking")
    return len(np.unique(ranking)) / ranking.size


def generally_influential(ranking: np.ndarray, min_queries: int) -> list[tuple[int, int]]:
    """(position, number of queries) of the samples in the top-k of at least `min_queries` queries,
    most frequent first (ties: lower position first)."""
    ranking = _matrix(ranking, "ranking")
    if min_queries < 1:
        raise EvaluationError(f"min_queries must be at least 1, got {min_queries}")
    counts = Counter(int(row) for query in ranking for row in set(query.tolist()))
    found = [(row, count) for row, count in counts.items() if count >= min_queries]
    return sorted(found, key=lambda item: (-item[1], item[0]))


def pooled_share(ranking: np.ndarray, rows: Sequence[int]) -> float:
    """Share of all `Q k` top-k entries that are one of `rows`."""
    ranking = _matrix(ranking, "ranking")
    return float(np.isin(ranking, np.asarray(list(rows), dtype=np.int64)).mean())


def precision_at_k(
    ranking: np.ndarray, query_groups: Sequence[str], train_groups: Sequence[str]
) -> dict[str, float]:
    """Per query group g: the mean over its queries of the share of their top-k that is from g."""
    ranking = _matrix(ranking, "ranking")
    queries, labels = _groups(ranking, query_groups, train_groups)
    same = labels[ranking] == queries[:, None]
    return {str(g): float(same[queries == g].mean()) for g in sorted(set(queries.tolist()))}


def intrusion(
    ranking: np.ndarray,
    query_groups: Sequence[str],
    train_groups: Sequence[str],
    *,
    into: str = "majority",
    intruder: str = "outlier",
) -> float:
    """Share of the top-k entries of `into` queries that are `intruder` samples (0 is clean)."""
    ranking = _matrix(ranking, "ranking")
    queries, labels = _groups(ranking, query_groups, train_groups)
    chosen = queries == into
    if not chosen.any():
        raise EvaluationError(f"no query of group {into!r} to measure intrusion into")
    return float((labels[ranking[chosen]] == intruder).mean())


def self_ranks(scores: np.ndarray, own: Sequence[int]) -> np.ndarray:
    """`(Q,)` 1-based rank of sample `own[q]` in query q's scores: 1 + how many samples score higher."""
    scores = _matrix(scores, "scores")
    positions = np.asarray(list(own), dtype=np.int64)
    if positions.shape != (scores.shape[0],) or ((positions < 0) | (positions >= scores.shape[1])).any():
        raise EvaluationError(
            f"need one training position in 0..{scores.shape[1] - 1} per query, got {positions}"
        )
    own_scores = scores[np.arange(len(positions)), positions]
    return 1 + (scores > own_scores[:, None]).sum(axis=1)


def recall_at_count(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray) -> float:
    """Share of the positives among the |positives| highest scores (ties: lower position first)."""
    values, labels = _binary(scores, positive)
    count = int(labels.sum())
    highest = np.argsort(-values, kind="stable")[:count]
    return float(labels[highest].sum() / count)


def roc_auc(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count one half)."""
    values, labels = _binary(scores, positive)
    return float(roc_auc_score(labels, values))


def group_auc(scores: Sequence[float] | np.ndarray, groups: Sequence[str] | None) -> dict[str, float] | None:
    """Per group: the ROC AUC of its members against every other sample (one against the rest).

    None when the samples carry no groups or only one: there is nothing to tell apart.
    """
    labels = np.asarray(list(groups or ()), dtype=object)
    if len(set(labels.tolist())) < 2:
        return None
    return {str(g): roc_auc(scores, labels == g) for g in sorted(set(labels.tolist()))}


@dataclass(frozen=True)
class Fit:
    """Correlations of y with x and the least-squares line `y = slope x + intercept`."""

    pearson: float
    spearman: float
    slope: float
    intercept: float


def fit(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Fit:
    """Pearson and Spearman correlation and the least-squares line of `y` on `x`."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.ndim != 1 or xs.shape != ys.shape or len(xs) < 3:
        raise EvaluationError(
            f"fit needs two equal-length 1-d series of 3 or more values, got {xs.shape}, {ys.shape}"
        )
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
        raise EvaluationError("fit needs x and y that both vary; a constant series has no correlation")
    line = stats.linregress(xs, ys)
    return Fit(
        pearson=float(stats.pearsonr(xs, ys).statistic),
        spearman=float(stats.spearmanr(xs, ys).statistic),
        slope=float(line.slope),
        intercept=float(line.intercept),
    )


def subset_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """`(M, Q)` predicted loss of each query under each subset model: `-sum_{i in S_m} score(q, i)`.

    `scores` `(Q, N)` with higher meaning more supportive (a proponent lowers the query's loss), `masks`
    `(M, N)` booleans, true where model m trained on sample i. The sign makes a good attribution
    correlate positively with the actual loss.
    """
    scores = _matrix(scores, "scores")
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[1] != scores.shape[1]:
        raise EvaluationError(f"need one (M, {scores.shape[1]}) mask of kept samples, got {masks.shape}")
    return -(masks.astype(np.float64) @ scores.astype(np.float64).T)


def lds_per_query(actual: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """`(Q,)` Spearman correlation, over the M models, of each query's actual and predicted loss `(M, Q)`.

    Ties take average ranks (as `scipy.stats.spearmanr`). A query whose actual or predicted loss is the
    same under every model has no rank correlation: an EvaluationError, never a NaN in an average.
    """
    actual, predicted = np.asarray(actual, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if actual.ndim != 2 or actual.shape != predicted.shape or actual.shape[0] < 3:
        raise EvaluationError(
            f"need (M, Q) actual and predicted losses over 3 or more models, got {actual.shape}, "
            f"{predicted.shape}"
        )
    ranks = [stats.rankdata(values, axis=0) for values in (actual, predicted)]
    centred = [r - r.mean(axis=0) for r in ranks]
    spread = np.sqrt((centred[0] ** 2).sum(axis=0) * (centred[1] ** 2).sum(axis=0))
    flat = np.flatnonzero(spread == 0)
    if flat.size:
        raise EvaluationError(
            f"queries {flat.tolist()[:5]} have the same actual or predicted loss under every model; "
            "train more models or on subsets that differ"
        )
    return (centred[0] * centred[1]).sum(axis=0) / spread


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, *, resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one per query).

    Resample b draws `len(values)` positions with replacement from `np.random.default_rng(seed)`,
    resample after resample; the interval is the (1 - confidence) / 2 and (1 + confidence) / 2
    quantiles of the resampled means (numpy's linear interpolation).
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size < 2:
        raise EvaluationError(f"a bootstrap interval needs 2 or more values, got shape {data.shape}")
    if resamples < 1 or not 0 < confidence < 1:
        raise EvaluationError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples}, {confidence}")
    rng = np.random.default_rng(seed)
    means = np.array([data[rng.integers(0, data.size, data.size)].mean() for _ in range(resamples)])
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def _matrix(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2 or 0 in array.shape:
        raise EvaluationError(f"{name} must be a non-empty (Q, N) or (Q, k) matrix, got shape {array.shape}")
    return array


def _groups(
    ranking: np.ndarray, query_groups: Sequence[str], train_groups: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    queries, labels = (
        np.asarray(list(query_groups), dtype=object),
        np.asarray(list(train_groups), dtype=object),
    )
    if len(queries) != ranking.shape[0]:
        raise EvaluationError(f"{len(queries)} query groups for {ranking.shape[0]} queries")
    if ranking.max() >= len(labels) or ranking.min() < 0:
        raise EvaluationError(
            f"ranking names sample {int(ranking.max())} but only {len(labels)} carry a group"
        )
    return queries, labels


def _binary(
    scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    values, labels = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    if values.ndim != 1 or values.shape != labels.shape:
        raise EvaluationError(
            f"need one label per score, got {values.shape} scores and {labels.shape} labels"
        )
    if labels.all() or not labels.any():
        raise EvaluationError("need at least one positive and one negative sample")
    return values, labels
