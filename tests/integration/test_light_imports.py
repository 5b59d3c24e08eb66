"""What importing a module loads, and when it reads its settings, each checked in a fresh Python
process (this one has loaded everything by now): the producer and the API load no inference
library, and the Celery app and the download task read the settings when used, not at import.
Moved from tests/unit, which starts no process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

INFERENCE = ("onnxruntime", "tokenizers", "torch", "transformers")


def run_python(code: str, env: dict[str, str]) -> str:
    """What ``python -c code`` prints, in a process with ``env``."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return result.stdout.strip()


def test_importing_the_producer_loads_no_inference_library(tmp_path: Path) -> None:
    code = (
        "import sys; from tasks import producer; "
        "producer.register_model('hf://org/m', 'm', {'precision': 'int8'}); "
        f"print(sorted(m for m in {INFERENCE!r} if m in sys.modules))"
    )
    env = {**os.environ, "EMBEDQ_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}"}
    env.pop("EMBEDQ_BROKER_URL", None)
    assert run_python(code, env) == "[]"


def test_importing_the_api_loads_no_inference_library() -> None:
    code = (
        "import sys; import tasks.api.app; "
        f"print(sorted(m for m in {(*INFERENCE, 'openvino', 'celery')!r} if m in sys.modules))"
    )
    assert run_python(code, dict(os.environ)) == "[]"


def test_the_celery_app_and_the_download_task_read_the_settings_when_used_not_at_import() -> None:
    """Both modules are imported by now (a producer imports them to send by name); settings
    changed afterwards still reach the app's configuration and the task's limits."""
    code = (
        "import os\n"
        "from tasks.download import download\n"
        "from worker.app import app\n"
        "os.environ['EMBEDQ_BROKER_URL'] = 'redis://127.0.0.1:6379/5'\n"
        "os.environ['EMBEDQ_DOWNLOAD_TIME_LIMIT'] = '777'\n"
        "os.environ['EMBEDQ_TASK_TIME_LIMIT'] = '100'\n"
        "print(app.conf.broker_url, app.conf.task_time_limit, app.conf.task_soft_time_limit,"
        " download.time_limit, download.soft_time_limit)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    assert run_python(code, env).split() == ["redis://127.0.0.1:6379/5", "100", "90", "777", "747"]
