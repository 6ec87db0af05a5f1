"""The contract shared by the service, the worker, the CLI and clients (pydantic only, no torch)."""

from api_schemas.specs import (
    CheckpointSpec,
    DatasetSpec,
    Estimator,
    IndexSpec,
    BetaSchedule,
    LossKind,
    LossWeighting,
    PredictionType,
    Method,
    ProjectorKind,
    ProjectorSpec,
    QuerySpec,
    SlotNoise,
    SlotSpec,
    StoreDType,
    TrainSpec,
)

__all__ = [
    "CheckpointSpec",
    "DatasetSpec",
    "Estimator",
    "IndexSpec",
    "BetaSchedule",
    "LossKind",
    "LossWeighting",
    "PredictionType",
    "Method",
    "ProjectorKind",
    "ProjectorSpec",
    "QuerySpec",
    "SlotNoise",
    "SlotSpec",
    "StoreDType",
    "TrainSpec",
]
