"""All settings of the service, read from the environment (prefix `RETRAC_`) in one class.

Only the service, the worker and the CLI read settings; the engine takes everything as arguments.
The job queue's settings (`RETRAC_BROKER_URL`, `RETRAC_RESULT_BACKEND`, `RETRAC_QUEUE`) belong to
`worker.settings`, which the service reads too: one source for where jobs go.
Outside development the validators refuse unsafe choices (no API key, CORS open to every origin).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from worker.settings import ComputeSettings, LogSettings, ObjectStoreSettings

if TYPE_CHECKING:
    from storage.location import Location

MIN_KEY_LENGTH = 16


class Settings(ComputeSettings, ObjectStoreSettings, LogSettings):
    """The service's settings; `device` and `torch_threads` (query gradients) come from
    `ComputeSettings`, shared with the workers."""

    environment: Literal["development", "production"] = "development"
    stores_root: Path | str = Field(
        Path("stores"),
        description="one Zarr store per index, in a folder (or under a prefix) named after it: a local "
        "folder, or an s3://BUCKET/PREFIX URL reached by the RETRAC_S3_* settings",
    )
    models_root: Path | str = Field(
        Path("models"),
        description="training runs and checkpoints that specs may name: a folder, or an s3://BUCKET/PREFIX "
        "URL (checkpoints and schedulers only; runs are read from folders)",
    )
    data_root: Path | str = Field(
        Path("data"),
        description="image folders and arrays that dataset specs may name: a folder or an s3:// URL",
    )

    api_key: SecretStr | None = Field(None, description="the X-API-Key that mutating requests must send")
    protect_queries: bool = Field(False, description="queries and reads need the API key too")

    max_upload_bytes: int = Field(8 << 20, ge=1024, description="largest request body")
    max_images: int = Field(16, ge=1, description="most query images in one request")
    max_top_k: int = Field(100, ge=1, le=1000, description="largest top_k of a query")
    max_query_gradients: int = Field(
        1600, ge=1, description="largest K*M per query image (the paper's K=100, M=16 is 1600)"
    )

    query_pool: int = Field(
        0,
        ge=0,
        description="processes computing query gradients beside each server process, each with "
        "torch_threads threads and its own models (docs/deployment.md); 0: in the server process, one "
        "query's gradients at a time",
    )

    cors_origins: list[str] = Field([], description="origins allowed to call the API from a browser")

    @field_validator("stores_root", "models_root", "data_root", mode="before")
    @classmethod
    def _folder_or_url(cls, root: object) -> object:
        """A URL as given (`storage.location.locate` checks it where it is used), a folder made absolute."""
        if isinstance(root, str) and "://" in root:
            return root.rstrip("/")
        return Path(str(root)).expanduser().resolve()

    def stores_location(self) -> Location:
        """Where the stores live: the stores root's folder, or its bucket prefix reached by the
        object-store settings. A StoreError in one line if the URL or the credentials cannot work."""
        from storage.location import locate  # here: reading settings must not import torch

        return locate(self.stores_root, self.bucket_options())

    @model_validator(mode="after")
    def _safe_outside_development(self) -> Settings:
        if self.environment == "development":
            return self
        key = self.api_key.get_secret_value() if self.api_key else ""
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(
                f"set RETRAC_API_KEY to a secret of at least {MIN_KEY_LENGTH} characters in production"
            )
        if "*" in self.cors_origins:
            raise ValueError("RETRAC_CORS_ORIGINS may not be '*' in production; list the allowed origins")
        return self


@functools.cache
def get_settings() -> Settings:
    """The settings of this process, read from the environment once (tests build their own `Settings`)."""
    return Settings()
