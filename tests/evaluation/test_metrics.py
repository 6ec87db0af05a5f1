"""Each metric against values computed by hand on small fixed score matrices."""

from __future__ import annotations

import numpy as np
import pytest

from retrac.evaluation import metrics
from retrac.exceptions import EvaluationError

# Three queries, five training samples. Orders by score:
#   q0: 0 (.9), 4 (.7), 2 (.5), 3 (.3), 1 (.1)
#   q1: 1 (.8), 2 (.6), 4 (.4), 0 (.2), 3 (.1)
#   q2: 0 (.95), 3 (.9), 1 (.3), 2 (.2), 4 (.1)
SCORES = np.array(
    [
        [0.9, 0.1, 0.5, 0.3, 0.7],
        [0.2, 0.8, 0.6, 0.1, 0.4],
        [0.95, 0.3, 0.2, 0.9, 0.1],
    ]
)
TRAIN_GROUPS = ["majority", "majority", "outlier", "majority", "outlier"]
QUERY_GROUPS = ["majority", "outlier", "majority"]
TOP2 = np.array([[0, 4], [1, 2], [0, 3]])


def test_top_k_orders_by_score_and_breaks_ties_by_position() -> None:
    assert metrics.top_k(SCORES, 2).tolist() == TOP2.tolist()
    assert metrics.top_k(np.array([[1.0, 2.0, 2.0, 0.0]]), 3).tolist() == [[1, 2, 0]]


def test_u_at_k_counts_unique_proponents() -> None:
    assert metrics.u_at_k(TOP2) == pytest.approx(5 / 6)  # {0, 1, 2, 3, 4} over 3 * 2 entries
    assert metrics.u_at_k(np.array([[7, 8], [8, 7]])) == pytest.approx(2 / 4)


def test_generally_influential_and_their_share() -> None:
    assert metrics.generally_influential(TOP2, 2) == [(0, 2)]
    assert metrics.generally_influential(TOP2, 3) == []
    assert metrics.generally_influential(TOP2, 1) == [(0, 2), (1, 1), (2, 1), (3, 1), (4, 1)]
    assert metrics.pooled_share(TOP2, [0]) == pytest.approx(2 / 6)
    assert metrics.pooled_share(TOP2, [0, 4]) == pytest.approx(3 / 6)
    assert metrics.pooled_share(TOP2, []) == 0.0


def test_precision_at_k_per_query_group() -> None:
    # q0 (majority): 0 majority, 4 outlier -> 1/2; q2 (majority): 0, 3 majority -> 1;
    # q1 (outlier): of 1, 2 only 2 -> 1/2
    assert metrics.precision_at_k(TOP2, QUERY_GROUPS, TRAIN_GROUPS) == pytest.approx(
        {"majority": 0.75, "outlier": 0.5}
    )


def test_outlier_intrusion_into_majority_queries() -> None:
    # majority queries q0, q2 hold 0, 4, 0, 3: one outlier (4) in four entries
    assert metrics.intrusion(TOP2, QUERY_GROUPS, TRAIN_GROUPS) == pytest.approx(0.25)
    assert metrics.intrusion(
        TOP2, QUERY_GROUPS, TRAIN_GROUPS, into="outlier", intruder="majority"
    ) == pytest.approx(0.5)
    with pytest.raises(EvaluationError, match="no query of group"):
        metrics.intrusion(TOP2, QUERY_GROUPS, TRAIN_GROUPS, into="nobody")


def test_self_rank_is_one_plus_the_samples_scoring_higher() -> None:
    # q0: sample 2 (.5) is beaten by .9 and .7; q1: sample 1 (.8) is first; q2: sample 4 (.1) is last
    assert metrics.self_ranks(SCORES, [2, 1, 4]).tolist() == [3, 1, 5]
    with pytest.raises(EvaluationError):
        metrics.self_ranks(SCORES, [0, 1])


def test_self_influence_recall_and_auc() -> None:
    scores = [0.5, 0.9, 0.1, 0.8, 0.3]
    positive = [False, True, False, False, True]
    # top-2 (two positives) are samples 1 and 3: one positive
    assert metrics.recall_at_count(scores, positive) == pytest.approx(0.5)
    # positive .9 beats all three negatives, positive .3 beats only .1: 4 of 6 pairs
    assert metrics.roc_auc(scores, positive) == pytest.approx(4 / 6)
    assert metrics.roc_auc([1.0, 1.0, 0.0], [True, False, False]) == pytest.approx(0.75)  # a tie counts 1/2
    with pytest.raises(EvaluationError, match="positive and one negative"):
        metrics.recall_at_count(scores, [False] * 5)


def test_fit_by_hand() -> None:
    # x = 0..3, y = 1, 3, 2, 5: Sxy = 5.5, Sxx = 5, Syy = 8.75; y ranks 1, 3, 2, 4
    result = metrics.fit([0, 1, 2, 3], [1, 3, 2, 5])
    assert result.slope == pytest.approx(1.1)
    assert result.intercept == pytest.approx(1.1)
    assert result.pearson == pytest.approx(5.5 / np.sqrt(5 * 8.75))
    assert result.spearman == pytest.approx(0.8)


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.top_k(SCORES, 6),
        lambda: metrics.top_k(np.zeros(3), 1),
        lambda: metrics.generally_influential(TOP2, 0),
        lambda: metrics.precision_at_k(TOP2, ["majority"], TRAIN_GROUPS),
        lambda: metrics.precision_at_k(TOP2, QUERY_GROUPS, TRAIN_GROUPS[:3]),
        lambda: metrics.fit([1, 2, 3], [2, 2, 2]),
        lambda: metrics.fit([1, 2], [1, 2]),
    ],
)
def test_bad_inputs_raise_named_errors(call) -> None:
    with pytest.raises(EvaluationError):
        call()
