"""Logging for workers and the CLI: text or JSON, with the running task's id and name on every
line emitted while it runs (from the task, from natask, from any library)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final

from . import signals
from .options import current_request

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s%(task)s: %(message)s"


class TaskContextFilter(logging.Filter):
    """Adds ``task_id``/``task_name`` (empty outside tasks) and a ``task`` label to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request = current_request.get()
        record.task_id = request.id if request else ""
        record.task_name = request.task if request else ""
        record.task = f" [{request.task}[{request.id}]]" if request else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, task_id, task_name, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        task_id = getattr(record, "task_id", "")
        if task_id:
            out["task_id"] = task_id
            out["task_name"] = getattr(record, "task_name", "")
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger for a natask process (``--loglevel``, ``--log-format``); when the
    ``setup_logging`` signal has receivers they configure logging instead (Celery's rule)."""
    if signals.setup_logging.receivers:
        signals.setup_logging.send(None, loglevel=level.upper(), logfile=None, format=fmt, colorize=False)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TaskContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("nats").setLevel(max(logging.WARNING, root.level))
    signals.after_setup_logger.send(None, logger=root, loglevel=level.upper(), logfile=None, format=fmt,
                                    colorize=False)
