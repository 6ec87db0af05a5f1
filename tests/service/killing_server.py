"""`retrac serve`'s app under uvicorn, killed (SIGKILL, by itself) at one step of deleting an index:
the fault injection of `test_delete_kill`. Usage: `python -m tests.service.killing_server PORT STEP`,
settings from the environment as for `retrac serve`.

Steps, in the order `service.indexes.delete_index` takes them:
- `marked`: the store is marked deleted, its job not yet cancelled;
- `cancelled`: the job is cancelled, the store not yet moved aside;
- `removing`: the store is moved aside and half its files are removed.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import uvicorn

import service.indexes
import service.repository
import storage.location
from service.main import create_app


def die(*_: Any, **__: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def remove_half_then_die(folder: str | Path, **_: Any) -> None:
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    for file in files[: len(files) // 2]:
        file.unlink()
    die()


def inject(step: str) -> None:
    if step == "marked":
        service.indexes.cancel_index_job = die  # type: ignore[assignment]
    elif step == "cancelled":
        service.repository.delete_store = die  # type: ignore[assignment]
    elif step == "removing":
        storage.location.shutil = SimpleNamespace(rmtree=remove_half_then_die)  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown step {step!r}; give marked, cancelled or removing")


if __name__ == "__main__":
    port, step = sys.argv[1:]
    inject(step)
    uvicorn.run(create_app(), host="127.0.0.1", port=int(port), log_level="warning")
