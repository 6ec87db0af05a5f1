"""Submitting a job for a store that needs nothing: a clear answer, nothing queued."""

from __future__ import annotations

import pytest

from cli import main
from storage import NothingToIndexError
from worker import control


def test_queueing_a_complete_store_says_so_and_queues_nothing(reference_store, capsys) -> None:
    with pytest.raises(NothingToIndexError, match="nothing is left to index"):
        control.submit(reference_store)
    assert main(["index", "run", str(reference_store), "--queue"]) == 0
    assert "nothing is left to index" in capsys.readouterr().out
