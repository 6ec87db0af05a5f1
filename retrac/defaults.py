"""What a query runs when it names no estimator or method: the measured best the index can serve.

docs/experiment.md's standard preset ranked trak under the matched estimator first (LDS 0.184
validation, 0.131 generated), then dtrak, retrac and tracin. So a query that leaves them out runs
the matched estimator where the index has shared-noise grid slots (`api_schemas.specs.default_estimator`)
and, under it, the first method of `MEASURED_ORDER` the index serves; under the paper's estimator (chosen,
or the only one the index serves) the paper's own methods, tracin and retrac. A default never fails on
an index that lacks a part: it falls back to what the index serves, and `chosen` says in a notice what
the better default would need. A method or estimator the query names is run as named, or refused
(`retrac.methods.require_methods`, `retrac.query_side.resolve_query`) with the flag that adds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from api_schemas import Estimator, IndexSpec, Method, QuerySpec
from api_schemas.specs import DEFAULT_ESTIMATOR, default_estimator
from retrac.exceptions import SpecError
from retrac.methods import ROWS, methods_served, require_methods

AnyQuery = TypeVar("AnyQuery", bound=QuerySpec)

MEASURED_ORDER: tuple[Method, ...] = ("trak", "dtrak", "retrac", "tracin")
"""Methods best first, by LDS under the matched estimator on the standard preset (docs/experiment.md)."""
PAPER_METHODS: tuple[Method, ...] = ("tracin", "retrac")
"""The paper's methods: what its estimator runs unless told."""
STORE_KNOBS = ("timesteps", "draws", "seed")
"""Query knobs the matched estimator takes from the index: one given means the query wants its own."""


def default_methods(spec: IndexSpec, estimator: Estimator) -> list[Method]:
    """The methods a query that names none runs on an index of `spec` (module docstring); a SpecError
    naming the flag if it serves none (output-norm rows without their kernel)."""
    served = methods_served(spec)
    if not served:
        require_methods(spec, [m for m in MEASURED_ORDER if ROWS[m] == spec.output_function][:1])
    if estimator == "paper":
        return [m for m in PAPER_METHODS if m in served] or served
    return [next(m for m in MEASURED_ORDER if m in served)]


def chosen(
    query: AnyQuery, spec: IndexSpec, methods: Sequence[Method] | None
) -> tuple[AnyQuery, list[Method], list[str]]:
    """(query with its estimator settled, methods to run, notices): a query's `estimator` left out
    (not in its fields set) and `methods` None or empty take the defaults for `spec`. The answer names
    the estimator and methods that ran; the notices say where a default fell back because the index
    lacks what the measured best needs, and the flag that adds it."""
    notices: list[str] = []
    if "estimator" not in query.model_fields_set:
        knobs = bool(set(STORE_KNOBS) & query.model_fields_set)
        estimator = default_estimator(spec.slots, query.search, knobs)
        query = query.model_copy(update={"estimator": estimator})
        if estimator != DEFAULT_ESTIMATOR and not knobs and query.search == "exact":
            notices.append(
                f"estimator {estimator}: this index has no shared-noise grid slots for the matched "
                "estimator, the measured best (index create's default slots add them)"
            )
    if methods:
        return query, list(methods), notices
    picked = default_methods(spec, query.estimator)
    if query.estimator == DEFAULT_ESTIMATOR and picked[0] != MEASURED_ORDER[0]:
        try:
            require_methods(spec, MEASURED_ORDER[:1])
        except SpecError as missing:
            notices.append(f"methods {', '.join(picked)}, the best this index serves ({missing})")
    return query, picked, notices
