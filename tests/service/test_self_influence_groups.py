"""The self-influence answer names each group's AUC where the training samples carry groups."""

from __future__ import annotations

import numpy as np

from service.diagnostics import self_influence_ranking


def test_the_self_influence_answer_carries_group_auc_when_groups_are_known() -> None:
    scores = np.array([3.0, 1.0, 2.0, 0.5])
    ids = ("a", "b", "c", "d")
    answer = self_influence_ranking(scores, ids, "retrac", 2, ("outlier", "majority", "majority", "majority"))
    assert [e.sample_id for e in answer.data] == ["a", "c"]
    assert answer.total == 4
    assert answer.group_auc == {"outlier": 1.0, "majority": 0.0}
    assert self_influence_ranking(scores, ids, "retrac", 2).group_auc is None
