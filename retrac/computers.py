"""`GradientComputerCache`: one model load (and one projector build) per checkpoint per process.

A worker process runs many shards of the same checkpoints; loading the UNet and building the
projector (a count sketch draws one bucket and sign per parameter) once per checkpoint keeps that
cost out of every task. Entries are keyed by everything that fixes the gradient computation, so
stores with the same checkpoints and projector share them; the least recently used are dropped
beyond `capacity`. Every computer batches within the cache's memory budget (`retrac.budget`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from retrac.budget import memory_budget
from retrac.gradients import GradientComputer
from retrac.plan import IndexPlan

DEFAULT_CAPACITY = 4
"""Models kept per process: each costs its parameters once plus its projector's O(P) tables."""


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(setting: str) -> torch.device:
    """A device setting as a device: "auto" is `default_device()`, anything else torch's own name."""
    return default_device() if setting == "auto" else torch.device(setting)


class GradientComputerCache:
    """Gradient computers of (plan, checkpoint), loaded on first use on `device`.

    `threads` is the intra-op thread count used while computing rows on the CPU. It is fixed
    because CPU results depend on it: with it fixed, a shard's bytes are the same on every run
    (the store's idempotence rule); parallelism comes from running several workers instead.
    `budget` is the memory budget in bytes of each gradient batch (default: the device's share,
    `retrac.budget.memory_budget`); with the same budget, the same batches, so the same bytes.
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        *,
        threads: int = 1,
        capacity: int = DEFAULT_CAPACITY,
        budget: int | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.threads, self.capacity = threads, capacity
        self.budget = budget if budget is not None else memory_budget(self.device)
        self._entries: OrderedDict[tuple[str, ...], GradientComputer] = OrderedDict()
        self._lock = threading.Lock()  # a serving process asks from several threads

    def computer(self, plan: IndexPlan, checkpoint: int) -> GradientComputer:
        """The gradient computer of `plan` at checkpoint `checkpoint`, on this cache's device."""
        spec = plan.spec
        key = (
            str(plan.checkpoints[checkpoint].path),
            str(plan.base),
            repr(spec.parameters),
            str(plan.scheduler_folder),
            plan.loss,
            plan.loss_weighting,
            spec.output_function,
            spec.projector.model_dump_json(),
            str(spec.batch_size),
            str(checkpoint),
        )
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            model = plan.load_model(checkpoint, self.device)
            computer = plan.gradient_computer(checkpoint, model, budget=self.budget)
            self._entries[key] = computer
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return computer

    @contextmanager
    def compute(self) -> Iterator[None]:
        """Run the enclosed torch work with this cache's fixed CPU thread count."""
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)
