"""Training samples of an index: the image of a sample id, as PNG, optionally resized.

A sample id is a relative path (`2/0084.png`), so the route takes the rest of the URL path. The id is
only ever looked up among the index's ids, never opened as a file: no id reaches outside the index.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from api_schemas.common import SampleId
from retrac.exceptions import DatasetError
from service.deps import ReadAccess, StoreDep
from service.exceptions import NotFound
from service.handlers import ERROR_RESPONSES
from service.images import png_bytes

MAX_SIZE = 512
"""Largest side the service renders a sample at."""

router = APIRouter(
    prefix="/indexes/{name}/samples", tags=["samples"], dependencies=[ReadAccess], responses=ERROR_RESPONSES
)


@router.get(
    "/{sample_id:path}",
    summary="The image of a training sample, as PNG",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "the sample's pixels as the model saw them"}
    },
)
def sample_image(
    sample_id: Annotated[SampleId, Path(description="a sample id as the index's answers name it")],
    store: StoreDep,
    size: Annotated[
        int | None, Query(ge=1, le=MAX_SIZE, description="longer side in pixels (thumbnail)")
    ] = None,
) -> Response:
    dataset = store.plan.dataset
    try:
        (row,) = dataset.index_of([sample_id])
    except DatasetError as error:
        raise NotFound(f"no sample {sample_id!r} in this index; sample ids come from its answers") from error
    return Response(
        png_bytes(dataset.to_uint8(row), size),
        media_type="image/png",
        headers={"Cache-Control": "max-age=300"},
    )
