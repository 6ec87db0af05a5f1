"""Attribution queries over HTTP: the request (images and query knobs) and the ranked answer.

Images come as uploaded files (multipart) or inside a JSON body, each either base64 of a file
(PNG, JPEG, ... or a `.npy` array) or a nested array of pixels. Every image of one request is
scored in the same pass over the store.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from api_schemas.common import Public, SampleId
from api_schemas.specs import DEFAULT_TOP_K, Estimator, Method, QuerySpec, Search, StoreDType

MAX_ARRAY_SIDE = 4096
"""Longest axis of a nested-array image the schema accepts (the engine's image side limit)."""

MAX_JSON_INT = (1 << 53) - 1
"""Largest integer a JSON number carries exactly (a double's 53-bit mantissa)."""

PixelRow = Annotated[list[float], Field(min_length=1, max_length=MAX_ARRAY_SIDE)]
GreyPixels = Annotated[list[PixelRow], Field(min_length=1, max_length=MAX_ARRAY_SIDE)]
ColourPixels = Annotated[list[GreyPixels], Field(min_length=1, max_length=MAX_ARRAY_SIDE)]


class EncodedImage(Public):
    """An image file's bytes, base64-encoded: PNG, JPEG, BMP, WEBP, GIF, TIFF, or a `.npy` array."""

    base64: str = Field(min_length=1, description="the file's bytes in standard base64")


class ArrayImage(Public):
    """Pixels as nested lists: (H, W) grey, or (H, W, C) / (C, H, W) with C = 1 or 3; floats in [0, 1]."""

    array: GreyPixels | ColourPixels


class QueryOptions(QuerySpec):
    """The knobs of a query, shared by the JSON and the multipart form of the request: the query-side
    estimator (`QuerySpec`: K, M, seed, with its limits) plus what to rank and return."""

    seed: int = Field(
        0, ge=0, le=MAX_JSON_INT, description="seed of the query's noise draws (< 2^53: exact in JSON)"
    )
    methods: list[Method] = Field(["tracin", "retrac"], min_length=1, description="scores to rank by")
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=1000, description="proponents and opponents returned per method")
    checkpoints: list[int] | None = Field(
        None, min_length=1, description="positions of the checkpoints to use; default: all"
    )


class AttributeRequest(QueryOptions):
    """A JSON attribution request: one or more images and the query knobs."""

    images: list[EncodedImage | ArrayImage] = Field(min_length=1, description="query images")


class BandsPublic(Public):
    """A score split by the query timesteps it comes from, in thirds of the schedule: `coarse`
    (t >= 2T/3, where the model shapes composition), `middle`, `fine` (t < T/3, texture). They sum to
    the score."""

    coarse: float
    middle: float
    fine: float


class InfluencePublic(Public):
    """One training sample ranked for one query image by one method."""

    sample_id: SampleId
    rank: int = Field(ge=1, description="1 is the strongest proponent (or opponent)")
    score: float
    contributions: list[float] = Field(description="per checkpoint used, in order; they sum to score")
    timesteps: list[int] = Field(description="the stored training timestep of each slot of this sample")
    bands: BandsPublic = Field(description="the score split into coarse, middle and fine timestep bands")


class RankingPublic(Public):
    """Proponents (highest score first) and opponents (lowest score first) of one method."""

    proponents: list[InfluencePublic]
    opponents: list[InfluencePublic]


class AttributionPublic(Public):
    """The answer for one query image: a ranking per method asked for, and the estimator that made it."""

    image: str | None = Field(
        None,
        description="the query image answered: its file name as uploaded (or `images[i]`, its place in the "
        "request), or its path as given to `retrac attribute`",
    )
    estimator: Estimator
    methods: dict[Method, RankingPublic]


class TimingsPublic(Public):
    """Where a query's time went, in seconds."""

    wait_s: float = Field(
        description="waiting for other queries' gradients to finish (this process's gradient lock, or an "
        "idle query-pool process) before this query's own began"
    )
    gradient_s: float = Field(description="query-side gradients at every checkpoint, waiting excluded")
    scan_s: float = Field(description="the pass over the stored gradients")
    total_s: float = Field(description="the whole request, decoding included")


class AttributionsPublic(Public):
    """Answers for every image of a request, in the order sent, with the settings used."""

    index: str
    checkpoints: list[int] = Field(description="positions of the checkpoints used")
    timesteps: int
    draws: int
    seed: int
    estimator: Estimator
    search: Search = Field(description="which search produced the ranking: exact or approximate")
    dtype: StoreDType = Field(
        description="precision of the stored gradients scored: bfloat16 scores are bf16 products (~3e-3 of "
        "the largest score), float16 and float32 ones float32 products"
    )
    label: int | str | None = Field(
        None, description="the class label the images were attributed under, as given (class-conditional indexes)"
    )
    prompt: str | None = Field(
        None, description="the prompt the images were attributed under (text-conditional indexes)"
    )
    data: list[AttributionPublic]
    count: int
    timings: TimingsPublic
    notices: list[str] = Field(
        default_factory=list,
        description="what decoding the query images converted (resized, cropped, channels, alpha, pixel type), "
        "one sentence per kind",
    )
