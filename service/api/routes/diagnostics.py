"""Diagnostics of an index: gradient norm against timestep (statistics and plot), and self-influence."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from api_schemas.diagnostics import NormTimestepPublic, OutlierScore, SelfInfluencePublic
from retrac.exceptions import SpecError
from service.deps import EngineDep, IndexNameDep, ReadAccess, StoreDep
from service.diagnostics import norm_plot, norm_statistics, self_influence_ranking
from service.handlers import ERROR_RESPONSES
from storage import GradientStore

router = APIRouter(
    prefix="/indexes/{name}/diagnostics",
    tags=["diagnostics"],
    dependencies=[ReadAccess],
    responses=ERROR_RESPONSES,
)

CheckpointQuery = Annotated[
    int, Query(ge=-1000, le=1000, description="checkpoint position; negative counts from the end")
]
BinsQuery = Annotated[int, Query(ge=1, le=100, description="timestep bins of the statistics")]


def _checkpoint(store: GradientStore, checkpoint: int) -> int:
    count = store.num_checkpoints
    if not -count <= checkpoint < count:
        raise SpecError(f"checkpoint {checkpoint} does not exist; this index has checkpoints 0..{count - 1}")
    return checkpoint % count


@router.get("/norms", summary="Gradient norm against training timestep, over every stored slot")
def norms(
    name: IndexNameDep,
    store: StoreDep,
    engine: EngineDep,
    checkpoint: CheckpointQuery = -1,
    bins: BinsQuery = 10,
) -> NormTimestepPublic:
    chosen = _checkpoint(store, checkpoint)
    return norm_statistics(engine.norms(store, chosen), chosen, store.plan.num_timesteps, bins)


@router.get(
    "/norms.png",
    summary="Plot of gradient norm against training timestep",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "scatter of every stored slot, binned median"}
    },
)
def norms_plot(
    name: IndexNameDep,
    store: StoreDep,
    engine: EngineDep,
    checkpoint: CheckpointQuery = -1,
    bins: BinsQuery = 10,
) -> Response:
    chosen = _checkpoint(store, checkpoint)
    slots = engine.norms(store, chosen)
    statistics = norm_statistics(slots, chosen, store.plan.num_timesteps, bins)
    png = norm_plot(slots, statistics, f"{name}, checkpoint {chosen}: norm vs timestep")
    return Response(png, media_type="image/png")


@router.get("/self-influence", summary="Training samples ranked by self-influence (outlier candidates)")
def self_influence(
    name: IndexNameDep,
    store: StoreDep,
    engine: EngineDep,
    method: Annotated[
        OutlierScore,
        Query(description="self-influence under `tracin` or `retrac`, or the `relative_norm` or "
              "`atypical_direction` score (the best at finding planted outliers)"),
    ] = "retrac",
    limit: Annotated[int, Query(ge=1, le=1000, description="samples returned, highest first")] = 20,
) -> SelfInfluencePublic:
    scores = engine.outlier_scores(store)[method]
    return self_influence_ranking(scores, store.sample_ids, method, limit, store.plan.dataset.groups)
