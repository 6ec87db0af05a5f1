"""Generated queries: images sampled from an index's model, under a label and a guidance scale, to be
attributed under the label each was generated with (`POST /attribute` with that label)."""

from __future__ import annotations

from fastapi import APIRouter

from api_schemas.generation import GenerateRequest, GenerationPublic
from service.deps import EngineDep, IndexNameDep, ReadAccess, StoreDep
from service.handlers import ERROR_RESPONSES

router = APIRouter(
    prefix="/indexes/{name}", tags=["generate"], dependencies=[ReadAccess], responses=ERROR_RESPONSES
)


@router.post("/generate", summary="Generate query images from the index's last checkpoint")
def generate(
    name: IndexNameDep, body: GenerateRequest, store: StoreDep, engine: EngineDep
) -> GenerationPublic:
    return engine.generate(name, store, body)
