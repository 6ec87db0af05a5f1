# retrac: the attribution service (`retrac serve`) and the indexing worker (`retrac worker`) in one image.
#
# CPU image (default):   docker build -t retrac .
# CUDA image:            docker build -t retrac:cuda \
#                          --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                          --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# The base image only needs a Debian or Ubuntu userland; Python is installed when it has none.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/retrac \
    PATH=/opt/retrac/bin:$PATH \
    RETRAC_STORES_ROOT=/data/stores \
    RETRAC_MODELS_ROOT=/data/models \
    RETRAC_DATA_ROOT=/data/datasets \
    MPLCONFIGDIR=/tmp/matplotlib

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python (CUDA base images have none) and a virtual environment owned by root.
RUN if ! command -v python3 >/dev/null || ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV"

# torch first, from the index of the image's flavour (the CPU wheels are a fraction of the CUDA ones).
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /srv/retrac
COPY pyproject.toml README.md ./
COPY api_schemas ./api_schemas
COPY retrac ./retrac
COPY storage ./storage
COPY worker ./worker
COPY service ./service
COPY cli ./cli
# -P keeps the source folder off sys.path, so the check sees the installed package (static files included).
RUN pip install --no-cache-dir . \
    && python -P -c "import service.main, worker.app; assert (service.main.STATIC / 'index.html').is_file()" \
    && retrac --version

# Run as an unprivileged user; the stores folder is the only one it writes.
RUN groupadd --system --gid 10001 retrac \
    && useradd --system --uid 10001 --gid retrac --home-dir /srv/retrac --shell /usr/sbin/nologin retrac \
    && mkdir -p /data/stores /data/models /data/datasets \
    && chown retrac:retrac /data/stores
USER 10001:10001

EXPOSE 8000
VOLUME ["/data/stores"]

# Role-aware: the API answers GET /v1/health; a worker (`retrac worker`) keeps its heartbeat file fresh.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-m", "worker.health"]

CMD ["retrac", "serve", "--host", "0.0.0.0", "--port", "8000"]
