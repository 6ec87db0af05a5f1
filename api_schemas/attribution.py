"""Attribution queries over HTTP: the request (images and query knobs) and the ranked answer.

Images come as uploaded files (multipart) or inside a JSON body, each either base64 of a file
(PNG, JPEG, ... or a `.npy` array) or a nested array of pixels. Every image of one request is
scored in the same pass over the store.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

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


STORE_FIXED = ("timesteps", "draws", "seed")
"""Knobs that an index fixes under the matched estimator: optional in the schema (no default sent by
generated clients), so a request naming only its images and the estimator is answered."""


LEFT_OUT = (*STORE_FIXED, "estimator")
"""Knobs a request may leave out (or send as null) for the index to choose: K, M and seed under the
matched estimator, and the estimator itself (`retrac.defaults`)."""


def _store_fixed_optional(schema: dict[str, Any]) -> None:
    """The schema of `STORE_FIXED`: an integer or null, no default (left out or null: the index's value
    under the matched estimator, else the `QuerySpec` default the description names); the estimator's
    without a default either (left out: the index's best), so a generated client sends none unless told."""
    schema["properties"]["estimator"].pop("default")
    for name in STORE_FIXED:
        field = schema["properties"][name]
        default = field.pop("default")
        number = {key: field.pop(key) for key in ("type", "minimum", "maximum") if key in field}
        field["anyOf"] = [number, {"type": "null"}]
        field["description"] += f"; left out or null: the index's under estimator 'matched', else {default}"


class QueryOptions(QuerySpec):
    """The knobs of a query, shared by the JSON and the multipart form of the request: the query-side
    estimator (`QuerySpec`: K, M, seed, with its limits) plus what to rank and return. K, M and seed may
    be null, which means left out (`STORE_FIXED`)."""

    model_config = ConfigDict(json_schema_extra=_store_fixed_optional)

    seed: int = Field(
        0, ge=0, le=MAX_JSON_INT, description="seed of the query's noise draws (< 2^53: exact in JSON)"
    )
    estimator: Estimator = Field(
        "paper",
        description="paper: mean over slots . mean over timesteps; matched: per timestep against the "
        "index's shared-noise grid slots (K, M and seed then default to the index's); left out or null: "
        "matched where the index has shared-noise slots and the query gives no K, M or seed, else paper",
    )
    methods: list[Method] | None = Field(
        None,
        min_length=1,
        description="scores to rank by; left out or null: under the matched estimator the measured best "
        "the index serves (trak, then dtrak, retrac, tracin), under the paper's tracin and retrac; the "
        "answer's notices name them",
    )
    top_k: int = Field(
        DEFAULT_TOP_K, ge=1, le=1000, description="proponents and opponents returned per method"
    )
    checkpoints: list[int] | None = Field(
        None, min_length=1, description="positions of the checkpoints to use; default: all"
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_left_out(cls, data: Any) -> Any:
        """A null K, M, seed or estimator is left out, so its default (or the index's) applies."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (k in LEFT_OUT and v is None)}
        return data


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
        None,
        description="the class label the images were attributed under, as given (class-conditional indexes)",
    )
    prompt: str | None = Field(
        None, description="the prompt the images were attributed under (text-conditional indexes)"
    )
    data: list[AttributionPublic]
    count: int
    timings: TimingsPublic
    notices: list[str] = Field(
        default_factory=list,
        description="what decoding the query images converted (resized, cropped, channels, alpha, pixel "
        "type), one sentence per kind; and which estimator and methods ran where the request left them to "
        "the index",
    )
