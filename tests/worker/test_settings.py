"""Worker settings are read when first used, not when the app and its tasks are imported."""

from __future__ import annotations

import os
import subprocess
import sys

IMPORT_THEN_CHOOSE = """
import worker.tasks
from worker.app import app
from worker.settings import WorkerSettings, use_settings
use_settings(WorkerSettings(queue="chosen-after-import", torch_threads=2))
print(app.conf.task_default_queue, worker.tasks.index_shard.max_retries)
"""


def run_python(code: str, **environment: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **environment}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


def test_importing_the_app_reads_no_settings() -> None:
    # An invalid environment value fails only where settings are used, so importing succeeds.
    result = run_python("import worker.tasks, worker.app", RETRAC_TORCH_THREADS="0")
    assert result.returncode == 0, result.stderr


def test_settings_chosen_after_import_configure_the_app() -> None:
    result = run_python(IMPORT_THEN_CHOOSE, RETRAC_QUEUE="from-environment", RETRAC_MAX_RETRIES="7")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["chosen-after-import", "7"]


def test_the_worker_command_refuses_bad_flags_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli", "worker", "--threads", "0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "torch_threads" in result.stderr

