"""Attribution queries: the proponents and opponents of query images, per method.

Two forms of one request: a JSON body (images as base64 files or nested arrays), and a multipart
upload (image files plus the same knobs as form fields). Every image of a request shares one scan.
"""

from __future__ import annotations

import time
from typing import Annotated, TypeVar

from fastapi import APIRouter, Form, UploadFile
from pydantic import Field

from api_schemas import IndexSpec
from api_schemas.attribution import AttributeRequest, AttributionsPublic, QueryOptions
from retrac.datasets import Conversions
from retrac.defaults import chosen
from retrac.query_side import resolve_query
from service.deps import EngineDep, IndexNameDep, ReadAccess, SettingsDep, StoreDep
from service.handlers import ERROR_RESPONSES
from service.images import decode_file, decode_json_image
from service.query_engine import check_limits


class AttributeUpload(QueryOptions):
    """The multipart form: image files plus the query knobs as form fields."""

    images: list[UploadFile] = Field(
        min_length=1,
        description="one or more image files: PNG, JPEG, ... or .npy",
        # `format: binary` besides OpenAPI 3.1's media type: client generators then send files
        json_schema_extra={
            "items": {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}
        },
    )


Options = TypeVar("Options", bound=QueryOptions)


def with_defaults(options: Options, spec: IndexSpec) -> tuple[Options, list[str]]:
    """The request with what it left out chosen for the index (`retrac.defaults`: the measured best it
    serves) and its K, M and seed settled (`resolve_query`), and the notices saying what was chosen."""
    options, methods, notices = chosen(options, spec, options.methods)
    return resolve_query(options.model_copy(update={"methods": methods}), spec.slots), notices


router = APIRouter(
    prefix="/indexes/{name}", tags=["attribute"], dependencies=[ReadAccess], responses=ERROR_RESPONSES
)


@router.post("/attribute", summary="Attribute images sent in a JSON body")
def attribute(
    name: IndexNameDep,
    body: AttributeRequest,
    store: StoreDep,
    engine: EngineDep,
    settings: SettingsDep,
) -> AttributionsPublic:
    started = time.perf_counter()
    body, chosen = with_defaults(body, store.spec)
    check_limits(body, len(body.images), settings)
    shape, conversions = store.spec.dataset, Conversions()
    names = [f"images[{i}]" for i in range(len(body.images))]
    images = [
        decode_json_image(
            image, resolution=shape.resolution, channels=shape.channels, name=where, conversions=conversions
        )
        for where, image in zip(names, body.images, strict=True)
    ]
    answer = engine.attribute(name, store, images, names, body, started=started)
    return answer.model_copy(update={"notices": [*conversions.notices(len(images), "query images"), *chosen]})


@router.post("/attribute/upload", summary="Attribute uploaded image files (PNG, JPEG, ... or .npy)")
def attribute_upload(
    name: IndexNameDep,
    form: Annotated[AttributeUpload, Form(media_type="multipart/form-data")],
    store: StoreDep,
    engine: EngineDep,
    settings: SettingsDep,
) -> AttributionsPublic:
    started = time.perf_counter()
    form, chosen = with_defaults(form, store.spec)
    check_limits(form, len(form.images), settings)
    shape, conversions = store.spec.dataset, Conversions()
    names = [upload.filename or f"images[{i}]" for i, upload in enumerate(form.images)]
    decoded = [
        decode_file(
            upload.file.read(), resolution=shape.resolution, channels=shape.channels, name=where,
            conversions=conversions,
        )
        for where, upload in zip(names, form.images, strict=True)
    ]
    answer = engine.attribute(name, store, decoded, names, form, started=started)
    return answer.model_copy(
        update={"notices": [*conversions.notices(len(decoded), "query images"), *chosen]}
    )
