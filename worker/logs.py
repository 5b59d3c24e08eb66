"""Log lines for operators: plain text by default, one JSON object per line with
``EMBEDQ_LOG_JSON=true`` (for log shippers). Fields passed as ``extra=`` (job, batch, texts, ms,
provider, ...) become JSON keys, so a batch's line can be filtered by job or provider."""

from __future__ import annotations

import json
import logging
from typing import Any

from worker.settings import get_settings

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def use_json(logger: logging.Logger | None = None) -> None:
    """Give every handler of ``logger`` (default: root) the JSON formatter, when configured."""
    if get_settings().log_json:
        for handler in (logger or logging.getLogger()).handlers:
            handler.setFormatter(JsonFormatter())


def on_setup(logger: logging.Logger, **_: Any) -> None:
    """``after_setup_logger`` / ``after_setup_task_logger``: JSON lines when configured."""
    use_json(logger)
