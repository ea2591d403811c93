"""The natask app of ``scale_queues.py``: one no-op task per queue (``q0`` … ``q99``) and a task
taking a large argument (queue ``big``).

The worker subprocess loads it with ``natask worker -A scale_app:app``; the subject prefix comes
from ``$NATASK_BENCH_PREFIX`` and the server from ``$NATS_URL``.
"""

from __future__ import annotations

import os
from typing import Any

from natask import Natask

QUEUES = [f"q{i}" for i in range(100)]
"""The queues of the many-queue curves."""
BIG_QUEUE = "big"
BIG = "scale.big"


def task_name(queue: str) -> str:
    return f"scale.{queue}"


def make_app(prefix: str, servers: list[str] | None = None) -> Natask:
    """A fresh app on ``prefix`` with the benchmark's tasks (results ignored)."""
    app = Natask("scale", servers=servers, subject_prefix=prefix)
    for queue in QUEUES:
        @app.task(name=task_name(queue), queue=queue, ignore_result=True)
        def add(x: Any, y: Any) -> Any:
            return x + y

    @app.task(name=BIG, queue=BIG_QUEUE, ignore_result=True)
    def big(blob: bytes) -> int:
        return len(blob)

    return app


app = make_app(os.environ.get("NATASK_BENCH_PREFIX") or "scale")
