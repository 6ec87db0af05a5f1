#!/usr/bin/env bash
# Run the test suite: installs retrac, makes sure the real parts the tests use are there, runs ruff and
# mypy, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test

# System tools some tests drive (compose/Dockerfile linting, the web page in a browser).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  command -v redis-server >/dev/null || missing+=(redis-server)
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

# Redis at 127.0.0.1:6379 is the broker the Celery tests use.
if ! (command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1); then
  if command -v redis-server >/dev/null; then
    mkdir -p /tmp/retrac-redis
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /tmp/retrac-redis --logfile /tmp/retrac-redis/redis.log
    for _ in $(seq 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
fi

# Static checks first (configured in pyproject.toml): a lint or type error fails the run.
.venv/bin/ruff check .
.venv/bin/mypy

exec .venv/bin/python -m pytest "$@"
