"""How commands print their answers: text for people, JSON in the HTTP API's own models, CSV for tables.

An attribution is printed from an `AttributionsPublic`, the model `POST /v1/indexes/NAME/attribute`
returns: `--json` is that model's JSON, so one parser reads both. CSV has one row per (query image,
method, side, rank), with the columns `--columns` chooses (`CSV_COLUMNS`): `contributions` spreads
into one column per checkpoint used (`contribution_C`), `bands` into `coarse,middle,fine`,
`timesteps` into one column per stored slot (`timestep_S`). Progress and notices go to stderr, so
stdout is the answer alone.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel

from api_schemas.attribution import AttributionPublic, AttributionsPublic, InfluencePublic

__all__ = ["CSV_COLUMNS", "OutputFormat", "attributions", "attributions_text", "csv_rows", "print_json"]

OutputFormat = Literal["text", "json", "csv"]

CSV_COLUMNS = ("query", "method", "side", "rank", "sample_id", "score", "contributions", "bands", "timesteps")
"""What `--columns` may choose, in the order printed: every one by default."""

SIDES = ("proponents", "opponents")


def print_json(answer: BaseModel | Mapping[str, Any]) -> None:
    """`answer` as indented JSON on stdout (a model as its JSON schema says)."""
    text = answer.model_dump_json(indent=1) if isinstance(answer, BaseModel) else json.dumps(answer, indent=1)
    print(text)


def attributions(
    answer: AttributionsPublic, output: OutputFormat, columns: Sequence[str] = CSV_COLUMNS
) -> None:
    """Print an attribution answer as text, JSON or CSV."""
    if output == "json":
        print_json(answer)
    elif output == "csv":
        csv.writer(sys.stdout).writerows(csv_rows(answer, columns))
    else:
        print("\n".join(attributions_text(answer)))


def _ranked(result: AttributionPublic) -> Iterator[tuple[str, str, list[InfluencePublic]]]:
    """(method, side, its influences) of one result, sides with nothing ranked left out."""
    for method, ranking in result.methods.items():
        for side in SIDES:
            if getattr(ranking, side):
                yield method, side, getattr(ranking, side)


def attributions_text(answer: AttributionsPublic) -> list[str]:
    """Per query image, a line per method and side, then the settings and timings."""
    lines = []
    for result in answer.data:
        lines.append(f"\n{result.image}")
        for method, side, ranked in _ranked(result):
            listed = ", ".join(f"{i.sample_id} ({i.score:.3g})" for i in ranked)
            lines.append(f"  {method:6} {side:10} {listed}")
    condition = f", label {answer.label}" if answer.label is not None else ""
    condition += f", prompt {answer.prompt!r}" if answer.prompt is not None else ""
    lines.append(
        f"\n{answer.estimator} estimator, K = {answer.timesteps}, M = {answer.draws}, "
        f"seed {answer.seed}{condition}: "
        f"query gradients {answer.timings.gradient_s:.2f} s, {answer.search} search "
        f"{answer.timings.scan_s:.3f} s over {answer.dtype} rows"
    )
    return lines


def csv_rows(answer: AttributionsPublic, columns: Sequence[str] = CSV_COLUMNS) -> Iterator[list[str]]:
    """The header, then one row per (query image, method, side, rank) with the chosen `columns`."""
    chosen = [c for c in CSV_COLUMNS if c in columns]
    slots = len(answer.data[0].methods[next(iter(answer.data[0].methods))].proponents[0].timesteps)
    spread = {
        "contributions": [f"contribution_{c}" for c in answer.checkpoints],
        "bands": ["coarse", "middle", "fine"],
        "timesteps": [f"timestep_{s}" for s in range(slots)],
    }
    yield [name for column in chosen for name in spread.get(column, [column])]
    for result in answer.data:
        for method, side, ranked in _ranked(result):
            for influence in ranked:
                cells = {
                    "query": [str(result.image)],
                    "method": [method],
                    "side": [side],
                    "rank": [str(influence.rank)],
                    "sample_id": [influence.sample_id], "score": [repr(influence.score)],
                    "contributions": [repr(v) for v in influence.contributions],
                    "bands": [repr(v) for v in influence.bands.model_dump().values()],
                    "timesteps": [str(t) for t in influence.timesteps],
                }
                yield [cell for column in chosen for cell in cells[column]]
