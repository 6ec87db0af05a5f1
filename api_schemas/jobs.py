"""Indexing jobs as the HTTP API shows them. Progress is read from the store: its done marks, and
the records its running shards rewrite after each gradient batch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from api_schemas.common import IndexName, Public

JobState = Literal["queued", "running", "done", "failed", "cancelled"]


class JobPublic(Public):
    """An indexing job: which index, its state, and its progress in rows (one row = one sample at
    one checkpoint) with the rate and the estimated time left."""

    id: str
    index: IndexName
    state: JobState
    done: int = Field(description="rows stored, over all checkpoints")
    total: int = Field(description="rows to store, over all checkpoints")
    computing: int = Field(0, description="rows computed by the shards running now, not stored yet")
    fraction: float = Field(ge=0, le=1, description="done / total")
    rate_per_s: float | None = Field(
        None,
        description="rows per second lately: of the last shards stored, or before two are, of the shards "
        "running (from their first batch); null until measured",
    )
    eta_s: float | None = Field(None, description="seconds left at that rate, if known")
    error: str | None = Field(None, description="why the job failed: the error of its first failed shard")
    stalled: str | None = Field(
        None, description="set when no shard finished and no worker was seen for a while: what to do"
    )


class JobCreate(Public):
    """Start a job that indexes whatever the index still lacks."""

    index: IndexName
