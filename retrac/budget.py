"""Memory budgets: how many gradient groups a batch may hold, decided before any batch runs.

A budget is bytes of the gradient device's memory (the machine's RAM for the CPU, the GPU's own):
given (`parse_bytes`: "8GiB", "512MB", plain bytes) or by default a share of it (`RAM_SHARE`,
`GPU_SHARE`). `Footprint` estimates what a gradient computation holds at `b` groups of `d` copies:

    fixed + b * per_group + (b or 1) * d * per_copy

`fixed`: the runtime allowance, every weight and buffer, the projector's tables. `per_group`: one
group's per-sample gradient as its strategy holds it (one parameter tensor at a time layer-wise, all
P trainable parameters under vmap or one backward per group) and its projected row. `per_copy`:
what one noised copy's forward keeps for the backward, counted in a batch-1 forward
(`activation_bytes`), times `ACTIVATION_MARGIN`. The largest batch that fits is taken, at most the
spec's; a job that cannot fit one group is refused (`MemoryBudgetError`) with the bytes it needs.
The batch never changes the answer beyond float32 summation order (docs/performance.md#memory-budgets).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ByteSize, PositiveInt, TypeAdapter, ValidationError
from torch import nn

from retrac.exceptions import SpecError

RAM_SHARE = 0.5
"""Default budget on the CPU: half the machine's RAM (or of its cgroup's limit, in a container), so a
worker leaves room for the service, the store's resident rows and one more process."""
GPU_SHARE = 0.8
"""Default budget on a GPU: 80% of its memory; the rest is the CUDA context and allocator slack."""
RUNTIME_BYTES = {"cpu": 768 << 20, "cuda": 512 << 20}
"""What the process holds besides the model and the batch: the libraries (~450 MiB resident after
importing torch and diffusers) and allocator slack on the CPU; on a GPU the CUDA context's share."""
ACTIVATION_MARGIN = 2.0
"""Factor over the counted activations for the backward's transient gradients and kernel workspace:
measured peaks ran to 1.8x the count (docs/performance.md#memory-budgets)."""
LAYER_TEMPORARIES = 3
"""Copies of the largest parameter tensor's per-sample gradient a layer-wise group holds at once:
the rule's output, its flattened float32 view times the signs, the sum of a reused layer's calls."""
GROUP_TEMPORARIES = 2
"""Copies of all P per-sample gradients a vmap group holds: vmap's output and its batching temporaries."""
ENVIRONMENT = "RETRAC_MEMORY_BUDGET"
"""The setting that gives the budget where no flag does (read by the CLI, the workers and the service)."""

_SIZE = TypeAdapter(ByteSize)


class MemoryBudgetError(SpecError):
    """A gradient batch of one group does not fit the memory budget: the message gives the bytes."""


def parse_bytes(text: str) -> int:
    """Bytes from "8GiB", "1.5 GB", "512MiB" or "1000000" (pydantic's `ByteSize`, as the setting
    `RETRAC_MEMORY_BUDGET` reads); a SpecError saying the form otherwise."""
    try:
        return TypeAdapter(PositiveInt).validate_python(int(_SIZE.validate_python(text)))
    except ValidationError:
        raise SpecError(
            f"memory budget {text!r}: give a positive size with a unit, e.g. 8GiB or 512MiB"
        ) from None


def format_bytes(count: float) -> str:
    """`count` bytes in GiB (or MiB below one GiB), for messages."""
    return f"{count / (1 << 30):.1f} GiB" if count >= 1 << 30 else f"{count / (1 << 20):.0f} MiB"


def device_memory(device: torch.device) -> int:
    """Total memory of `device`: a GPU's own, else the RAM this process may use (cgroup limit or RAM)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = Path("/sys/fs/cgroup/memory.max")
    text = limit.read_text().strip() if limit.is_file() else "max"
    return min(ram, int(text)) if text.isdigit() else ram


def memory_budget(device: torch.device, given: int | None = None) -> int:
    """The budget on `device`: `given` bytes (a flag, or the setting `RETRAC_MEMORY_BUDGET` read by
    the CLI, worker and service), else the default share of its memory."""
    if given is not None:
        return given
    return int((GPU_SHARE if device.type == "cuda" else RAM_SHARE) * device_memory(device))


def activation_bytes(forward: Callable[[], torch.Tensor], params: Iterable[torch.Tensor],
                     layers: Iterable[nn.Module]) -> int:
    """Bytes a forward keeps for its backward: autograd's saved tensors (each storage once, weights
    not counted), plus the outputs of `layers` (their gradients, which the layer-wise path holds)."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    outputs: list[int] = []
    handles = [layer.register_forward_hook(lambda _m, _a, y: outputs.append(y.nbytes)) for layer in layers]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return sum(saved.values()) + sum(outputs)


@dataclass(frozen=True)
class Footprint:
    """Bytes of one gradient computation (module docstring); `whole_batch_copies` False where only one
    group's copies are alive at a time (one backward per group)."""

    fixed: int
    per_group: int
    per_copy: int
    whole_batch_copies: bool = True

    def bytes_at(self, groups: int, draws: int) -> int:
        """Estimated peak bytes at `groups` groups of `draws` copies each."""
        copies = (groups if self.whole_batch_copies else 1) * draws
        return self.fixed + groups * self.per_group + copies * self.per_copy

    def groups(self, budget: int, draws: int) -> int:
        """The most groups of `draws` copies within `budget` bytes (0: not even one)."""
        if self.bytes_at(1, draws) > budget:
            return 0
        per_group = self.per_group + (draws * self.per_copy if self.whole_batch_copies else 0)
        return 1 + (budget - self.bytes_at(1, draws)) // max(per_group, 1)

    def refusal(self, budget: int, draws: int, what: str) -> MemoryBudgetError:
        """The one-line error of a computation (`what`) that cannot fit one group in `budget`."""
        return MemoryBudgetError(
            f"{what} needs {format_bytes(self.bytes_at(1, draws))} at batch 1 ({format_bytes(self.fixed)} "
            f"for the runtime, weights and projector, {format_bytes(self.per_group)} per-sample gradient, "
            f"{format_bytes(draws * self.per_copy)} activations) but the memory budget is "
            f"{format_bytes(budget)}: raise it (--memory-budget or {ENVIRONMENT}), use a device with more "
            "memory, or take gradients over fewer parameters (a LoRA adapter)"
        )
