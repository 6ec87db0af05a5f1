"""Progress bars on stderr (stdout stays the command's answer): one per phase of a query."""

from __future__ import annotations

from types import TracebackType

from tqdm import tqdm

PHASE_UNITS = {"gradients": "image-checkpoint", "scan": "rows"}
"""What each phase of `retrac.attribution.attribute` counts (`QueryProgress`)."""


class PhaseBars:
    """A `QueryProgress` callback that opens a bar per phase when the phase first reports."""

    def __init__(self) -> None:
        self.bars: dict[str, tqdm] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self.bars:
            self.bars[phase] = tqdm(total=total, desc=phase, unit=PHASE_UNITS.get(phase, "it"))
        self.bars[phase].update(done)

    def __enter__(self) -> PhaseBars:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        for bar in self.bars.values():
            bar.close()
