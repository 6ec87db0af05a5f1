"""All settings of a worker (and of job submission), read from the environment (prefix `RETRAC_`).

Names shared with the service (`RETRAC_BROKER_URL`, `RETRAC_DEVICE`, `RETRAC_TORCH_THREADS`) mean the
same there. Only the worker, the job functions and the CLI read these; the engine takes arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import ByteSize, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from retrac.computers import GradientComputerCache
    from storage.location import BucketOptions

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


class ComputeSettings(BaseSettings):
    """Where and with how many threads gradients are computed: the same settings, with the same
    meaning, for workers (training side) and the service (query side)."""

    model_config = SettingsConfigDict(env_prefix="RETRAC_", extra="ignore")

    device: str = Field(
        "auto", description="torch device of the gradients: auto (CUDA when available), cpu, cuda:1, ..."
    )
    torch_threads: int = Field(
        1, ge=1, description="CPU threads per process; fixed, because a shard's bytes depend on it"
    )
    memory_budget: ByteSize | None = Field(
        None,
        gt=0,
        description="memory a gradient batch may use, e.g. 8GiB (`retrac.budget`); default half the "
        "machine's RAM on the CPU, 80% of the GPU's memory",
    )

    def gradient_computers(self, capacity: int | None = None) -> GradientComputerCache:
        """This process's gradient computers: on this device, with these threads, within this budget."""
        from retrac.budget import memory_budget  # here: reading settings must not import torch
        from retrac.computers import DEFAULT_CAPACITY, GradientComputerCache, parse_device

        device = parse_device(self.device)
        return GradientComputerCache(
            device, threads=self.torch_threads, capacity=capacity or DEFAULT_CAPACITY,
            budget=memory_budget(device, None if self.memory_budget is None else int(self.memory_budget)),
        )


class LogSettings(BaseSettings):
    """How the service and the workers write their log lines (`worker.logs`): the same for both."""

    model_config = SettingsConfigDict(env_prefix="RETRAC_", extra="ignore")

    log_format: Literal["text", "json"] = Field(
        "text", description="text (the default) or json: one JSON object per line on stderr"
    )


class ObjectStoreSettings(BaseSettings):
    """How to reach the S3-compatible service of stores at `s3://bucket/prefix` URLs: the same for
    workers and the service. Unset fields are left to the usual AWS environment variables
    (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...)."""

    model_config = SettingsConfigDict(env_prefix="RETRAC_", extra="ignore")

    s3_endpoint_url: str | None = Field(None, description="e.g. http://minio:9000; default AWS_ENDPOINT_URL")
    s3_region: str | None = Field(None, description="the bucket's region; default AWS_REGION")
    s3_access_key_id: str | None = Field(None, description="default AWS_ACCESS_KEY_ID")
    s3_secret_access_key: SecretStr | None = Field(None, description="default AWS_SECRET_ACCESS_KEY")
    s3_allow_http: bool | None = Field(
        None, description="allow a plain-HTTP endpoint; default AWS_ALLOW_HTTP"
    )
    s3_connect_timeout: float = Field(
        5.0, gt=0, description="seconds to open a connection to the object store before a request fails"
    )
    s3_read_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds a request to the object store waits for the server's next bytes before it "
        "fails (retried 3 times): a server that never answers is refused, not waited for",
    )
    input_cache: Path = Field(
        Path("~/.cache/retrac/inputs"),
        description="where datasets and checkpoints given by s3:// URL are mirrored (`storage.inputs`)",
    )
    input_cache_bytes: int = Field(
        20 << 30, ge=1 << 20, description="most bytes the input cache holds; a larger input is refused"
    )

    @field_validator(
        "s3_endpoint_url",
        "s3_region",
        "s3_access_key_id",
        "s3_secret_access_key",
        "s3_allow_http",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """An empty variable (a compose file's `${X:-}`) leaves the field to the AWS variables."""
        return None if value == "" else value

    def use_input_cache(self) -> None:
        """Mirror this process's inputs given by URL as these settings say (`storage.inputs.use_inputs`)."""
        from storage.inputs import InputCache, use_inputs  # here: reading settings must not import torch

        use_inputs(InputCache(self.input_cache, self.input_cache_bytes, self.bucket_options()))

    def bucket_options(self) -> BucketOptions:
        from storage.location import BucketOptions  # here: reading settings must not import torch

        secret = self.s3_secret_access_key
        return BucketOptions(
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            access_key_id=self.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
            allow_http=self.s3_allow_http,
            connect_timeout=self.s3_connect_timeout,
            read_timeout=self.s3_read_timeout,
        )


class WorkerSettings(ComputeSettings, ObjectStoreSettings, LogSettings):
    broker_url: str = Field(DEFAULT_REDIS, description="Celery broker (Redis)")
    result_backend: str = Field(DEFAULT_REDIS, description="Celery result backend (Redis)")
    queue: str = Field("retrac-index", description="queue the indexing tasks go to and workers consume")
    model_cache_size: int = Field(4, ge=1, description="checkpoints kept loaded per worker process")
    max_retries: int = Field(
        5, ge=0, description="retries, with exponential backoff, of a task hit by a transient error"
    )
    stall_seconds: int = Field(
        600, ge=1, description="a job with no shard finished and no worker seen for this long is stalled"
    )
    heartbeat_file: Path = Field(
        Path("/tmp/retrac-worker.heartbeat"),
        description="file a worker touches every 10 s while it runs (`python -m worker.health` checks it)",
    )
    visibility_timeout: int = Field(
        3600,
        ge=1,
        description="seconds before a task taken by a worker that died unannounced is handed out again; "
        "keep it above the longest shard",
    )


_current: WorkerSettings | None = None


def get_settings() -> WorkerSettings:
    """The settings of this process: those given to `use_settings`, else read from the environment
    once, on first use (never at import, so a caller may still choose them)."""
    global _current
    if _current is None:
        _current = WorkerSettings()
    return _current


def use_settings(settings: WorkerSettings) -> None:
    """Make `settings` this process's settings (the CLI's flags over the environment). Worker child
    processes are forked after this and inherit them."""
    global _current
    _current = settings
