"""The contract shared by the service, the worker, the CLI and clients (pydantic only, no torch)."""

from api_schemas.specs import (
    CheckpointSpec,
    DatasetSpec,
    IndexSpec,
    BetaSchedule,
    LossKind,
    LossWeighting,
    PredictionType,
    Method,
    ProjectorKind,
    ProjectorSpec,
    QuerySpec,
    Search,
    SlotSpec,
    StoreDType,
    TrainSpec,
)

__all__ = [
    "CheckpointSpec",
    "DatasetSpec",
    "IndexSpec",
    "BetaSchedule",
    "LossKind",
    "LossWeighting",
    "PredictionType",
    "Method",
    "ProjectorKind",
    "ProjectorSpec",
    "QuerySpec",
    "Search",
    "SlotSpec",
    "StoreDType",
    "TrainSpec",
]
