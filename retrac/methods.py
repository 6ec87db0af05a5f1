"""What each scoring method reads from an index, and the refusal of a method an index cannot serve.

| method | rows (`IndexSpec.output_function`) | training side      | query side                 |
|--------|------------------------------------|--------------------|----------------------------|
| tracin | loss                               | slot mean of g     | G (timestep mean of P h)   |
| retrac | loss                               | slot mean of g/|g| | G^ (per timestep normalised) |
| trak   | loss                               | slot mean of g     | F^{-1} G (`retrac.kernels`)  |
| dtrak  | output-norm                        | slot mean of g     | F^{-1} G                    |

So trak and dtrak are TracIn's scan over preconditioned query vectors: they need the index's kernel.
`require_methods` raises a `SpecError` naming the `index create` flag that adds what is missing.
"""

from __future__ import annotations

from collections.abc import Sequence

from api_schemas import IndexSpec, Method, OutputFunction
from retrac.exceptions import SpecError

ROWS: dict[Method, OutputFunction] = {
    "tracin": "loss", "retrac": "loss", "trak": "loss", "dtrak": "output-norm",
}
"""The function whose gradients each method's rows hold."""

PRECONDITIONED: frozenset[Method] = frozenset({"trak", "dtrak"})
"""Methods whose query vectors go through the kernel's `F^{-1}`."""


def needs_kernel(methods: Sequence[Method]) -> bool:
    return any(m in PRECONDITIONED for m in methods)


def require_methods(spec: IndexSpec, methods: Sequence[Method]) -> None:
    """A SpecError naming the flag that adds what is missing, if an index of `spec` cannot serve `methods`."""
    for method in methods:
        if method not in ROWS:
            raise SpecError(f"unknown method {method!r}; choose from {', '.join(ROWS)}")
        wanted, held = ROWS[method], spec.output_function
        if wanted != held:
            flag = "--output-function " + ("output-norm --kernel" if wanted == "output-norm" else "loss")
            raise SpecError(
                f"method {method} needs {wanted} rows and this index holds {held} rows: create an index "
                f"with {flag}"
            )
        if method in PRECONDITIONED and spec.kernel is None:
            raise SpecError(
                f"method {method} needs the index's TRAK kernel and this index has none: "
                "create it with --kernel"
            )


def methods_served(spec: IndexSpec) -> list[Method]:
    """Every method an index of `spec` can serve."""
    return [
        m for m, rows in ROWS.items()
        if rows == spec.output_function and (m not in PRECONDITIONED or spec.kernel is not None)
    ]
