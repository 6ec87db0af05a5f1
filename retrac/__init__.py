"""retrac's engine: models, losses, noise, per-sample gradients, projections, index plans, query
vectors, scoring, training, datasets and evaluation.

The public Python API is `__all__` (docs/python.md): specs in, `train` or `Recorder` for a run,
`IndexPlan.resolve` for what an index holds, `Attributor` to index in memory and attribute. The
names load lazily, so `import retrac` costs no torch import until one is used. The Zarr store above
the engine is `storage.GradientStore` (with `storage.run_pending` and `storage.attribute`).

The layering rule: the engine knows nothing of HTTP, queues or the gradient store. It imports only
`api_schemas` (the shared contract) and third-party numerics (torch, diffusers, numpy, ...); never
`storage`, `worker`, `service`, `cli`, nor fastapi, celery, redis or uvicorn. Those packages sit above
it and call into it (`cli -> service, worker -> storage -> retrac -> api_schemas`);
`tests/test_layering.py` checks every import, at module level or inside a function.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, QuerySpec, SlotSpec, TrainSpec
    from retrac.attribution import Attributor
    from retrac.datasets import load_dataset
    from retrac.exceptions import RetracError
    from retrac.plan import IndexPlan
    from retrac.replay import Recorder
    from retrac.training import train

try:
    __version__ = version("retrac")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_HOMES = {
    "Attributor": "retrac.attribution",
    "CheckpointSpec": "api_schemas",
    "DatasetSpec": "api_schemas",
    "IndexPlan": "retrac.plan",
    "IndexSpec": "api_schemas",
    "QuerySpec": "api_schemas",
    "Recorder": "retrac.replay",
    "RetracError": "retrac.exceptions",
    "SlotSpec": "api_schemas",
    "TrainSpec": "api_schemas",
    "load_dataset": "retrac.datasets",
    "train": "retrac.training",
}
"""Where each public name is defined: imported on first use, since most pull in torch and diffusers."""

__all__ = [
    "Attributor",
    "CheckpointSpec",
    "DatasetSpec",
    "IndexPlan",
    "IndexSpec",
    "QuerySpec",
    "Recorder",
    "RetracError",
    "SlotSpec",
    "TrainSpec",
    "load_dataset",
    "train",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'retrac' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
