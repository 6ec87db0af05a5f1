"""`retrac demo`: the experiment's table, then the default query (trak, matched) next to the paper's
(tracin and retrac), each with what it is for; on the smoke preset, seconds."""

from __future__ import annotations

import re

from cli import main
from retrac.evaluation.estimators import USES


def test_the_demo_shows_the_default_next_to_the_papers_estimator(tmp_path, capsys) -> None:
    assert main(["demo", "--preset", "smoke", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    assert "| metric | TracIn | ReTrac |" in printed
    comparison = printed.split("The default query next to the paper's")[1]
    rows = re.findall(r"^\| (default|paper) \| (\w+) \| (\w+) \| ([\d.]+) \| ([\d.]+) \|$", comparison, re.M)
    assert [row[:3] for row in rows] == [
        ("default", "trak", "matched"), ("paper", "tracin", "paper"), ("paper", "retrac", "paper"),
    ]
    assert all(0 <= float(row[3]) <= 1 and 0 <= float(row[4]) <= 1 for row in rows)
    assert all(f"{name}: {use}" in comparison for name, use in USES.items())
