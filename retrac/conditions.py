"""What a conditional denoiser receives beside `(x_t, t)`: each sample's condition, batched.

A `Conditions` maps the keyword a diffusers model's forward takes to a tensor whose first axis runs
over samples: `class_labels` `(B,)` int64 for a class-conditional `UNet2DModel` (`num_class_embeds`
or `class_embed_type="timestep"`); a text-conditional `UNet2DConditionModel`'s `encoder_hidden_states`
`(B, L, D)` float32, its caption's (or prompt's) text encoder states (`retrac.text`). Every gradient path
takes one and lays it out like the images it goes with (repeated per slot, per query timestep, per noise
draw), so a sample's loss is always computed under its own condition. An unconditional model gets the empty
`Conditions()`.

`ClassLabels` is the label mapping of a class-conditional index (class name -> the integer the model
takes): it resolves a query's label and is recorded in the store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from retrac.exceptions import SpecError

CLASS_LABELS = "class_labels"
"""The forward keyword of diffusers' class-conditional UNets."""
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
"""The forward keyword of diffusers' text-conditional UNets: what cross-attention attends to."""


@dataclass(frozen=True)
class Conditions:
    """Per-sample model inputs by forward keyword, each `(B, ...)`; empty for an unconditional model."""

    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of_labels(cls, labels: Sequence[int] | torch.Tensor) -> Conditions:
        """Integer class labels `(B,)` as the conditions of a class-conditional UNet."""
        return cls({CLASS_LABELS: torch.as_tensor(labels, dtype=torch.int64)})

    @classmethod
    def of_text(cls, states: torch.Tensor) -> Conditions:
        """Text encoder states `(B, L, D)` as the conditions of a text-conditional UNet."""
        return cls({ENCODER_HIDDEN_STATES: states.float()})

    def __bool__(self) -> bool:
        return bool(self.tensors)

    def select(self, rows: slice | torch.Tensor) -> Conditions:
        """The conditions of the samples `rows` (a slice or an index tensor)."""
        return Conditions({k: v[rows] for k, v in self.tensors.items()})

    def repeat_interleave(self, count: int) -> Conditions:
        """Each sample's condition `count` times in a row, as `images.repeat_interleave(count, 0)` lays them
        out."""
        return Conditions({k: v.repeat_interleave(count, dim=0) for k, v in self.tensors.items()})

    def to(self, device: torch.device | str) -> Conditions:
        return Conditions({k: v.to(device) for k, v in self.tensors.items()})

    def check(self, batch: int) -> None:
        """A SpecError unless every tensor has `batch` rows (one condition per sample)."""
        wrong = {k: tuple(v.shape) for k, v in self.tensors.items() if v.ndim == 0 or v.shape[0] != batch}
        if wrong:
            raise SpecError(f"conditions {wrong} do not give one row to each of {batch} samples")


@dataclass(frozen=True)
class ClassLabels:
    """The label mapping of a class-conditional index: each class name and the integer the model takes.

    Names come from the dataset (image-folder subfolders sorted, numbered 0..n-1; `.npz` integer
    labels named by their decimal text and kept as given). A query's label is a class name, or else
    one of the mapping's integers: names win where a name is itself a numeral (folders `0`..`10`).
    """

    classes: Mapping[str, int]

    def resolve(self, label: int | str) -> int:
        """The integer of a query's `label`: a class name, else a class's integer; a SpecError listing the
        classes."""
        text = str(label)
        if text in self.classes:
            return self.classes[text]
        if text.isdigit() and int(text) in self.classes.values():
            return int(text)
        shown = ", ".join(f"{name} ({value})" for name, value in list(self.classes.items())[:12])
        more = f" and {len(self.classes) - 12} more" if len(self.classes) > 12 else ""
        raise SpecError(f"label {text!r} is not a class of this index; give one of: {shown}{more}")

    def fingerprint(self, labels: Sequence[int]) -> str:
        """sha256 of the mapping and each sample's label: a store built with other labels is stale."""
        text = json.dumps({"classes": dict(self.classes), "labels": [int(v) for v in labels]})
        return hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return dict(self.classes)


def query_conditions(
    classes: ClassLabels | None,
    label: int | str | None,
    count: int,
    *,
    text: Callable[[Sequence[str]], torch.Tensor] | None = None,
    prompt: str | None = None,
) -> Conditions:
    """The conditions of `count` query images asked with `label` and `prompt` of an index with `classes`
    (class-conditional) or `text` (text-conditional: its caption encoder, `retrac.text.TextEncoder.encode`).

    A conditional index needs its condition: a class-conditional one a label (no label is neutral), a
    text-conditional one a prompt, where the empty prompt "" (the unconditional input of classifier-free
    guidance) must be given as such, never assumed. An index refuses a condition its model does not take,
    rather than ignore it."""
    if prompt is not None and text is None:
        raise SpecError(
            f"this index's model is not text-conditional: it takes no prompt (got {prompt[:40]!r}); leave "
            "the prompt out"
        )
    if text is not None:
        if prompt is None:
            raise SpecError(
                "this index's model is text-conditional: give the query's prompt (--prompt TEXT; --prompt '' "
                "for the empty, unconditional prompt)"
            )
        if label is not None:
            raise SpecError(
                f"this index's model is text-conditional: it takes no label (got {label!r}); give a prompt"
            )
        return Conditions.of_text(text([prompt]).expand(count, -1, -1))
    if classes is None:
        if label is not None:
            raise SpecError(
                f"this index's model is unconditional: it takes no label (got {label!r}); leave the label out"
            )
        return Conditions()
    if label is None:
        shown = ", ".join(list(classes.classes)[:12])
        raise SpecError(f"this index's model is class-conditional: give the query's label (one of: {shown})")
    return Conditions.of_labels([classes.resolve(label)] * count)
