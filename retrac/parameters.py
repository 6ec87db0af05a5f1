"""Which parameters an index takes gradients over: every trainable one, or those matching name patterns.

A pattern is an `fnmatch` pattern over `named_parameters()` names (`*attn2*`, `*.to_k.*`), as a user
reads them off `model.named_parameters()`; a parameter is kept when any pattern matches it. A pattern
that matches nothing is refused, naming the closest names (a typo would otherwise index a silently
smaller model). Everything not kept is frozen, so every gradient path, which differentiates the
trainable parameters only, sees the subset alone.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

from retrac.exceptions import SpecError


def select_parameters(model: nn.Module, patterns: Sequence[str]) -> int:
    """Freeze the trainable parameters of `model` that no pattern matches (none given: keep all); the
    number of values left trainable. A SpecError for a pattern that matches no trainable parameter."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.0)
            raise SpecError(
                f"--parameters {pattern!r} matches no trainable parameter of the model; closest names: "
                f"{', '.join(close)} (fnmatch over named_parameters() names, e.g. '*attn2*')"
            )
    count = 0
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and patterns and not any(fnmatchcase(name, p) for p in patterns):
            parameter.requires_grad_(False)
        count += parameter.numel() if parameter.requires_grad else 0
    return count
