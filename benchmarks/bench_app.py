"""The benchmark's natask app and its no-op tasks.

The worker subprocess imports this module (``natask worker -A bench_app:app``); the subject prefix
comes from ``$NATASK_BENCH_PREFIX`` so every measurement uses its own stream, and the server from
``$NATS_URL`` (natask's own default). ``run.py`` builds its producer apps with ``make_app(prefix)``,
which registers the same tasks under the same explicit names.
"""

from __future__ import annotations

import os
from typing import Any

from natask import Natask

QUEUE = "bench"
"""The queue every benchmark task routes to (the worker runs with ``-Q bench``)."""

ADD = "bench.add"
AADD = "bench.aadd"
ADD_RT = "bench.add_rt"
AADD_RT = "bench.aadd_rt"


def make_app(prefix: str) -> Natask:
    """A fresh app on ``prefix`` with the three benchmark tasks."""
    app = Natask("bench", subject_prefix=prefix)

    @app.task(name=ADD, queue=QUEUE, ignore_result=True)
    def add(x: Any, y: Any) -> Any:
        """No-op ``def`` task, results ignored (drain, delay, delay_many)."""
        return x + y

    @app.task(name=AADD, queue=QUEUE, ignore_result=True)
    async def aadd(x: Any, y: Any) -> Any:
        """No-op ``async def`` task, results ignored (async drain)."""
        return x + y

    @app.task(name=ADD_RT, queue=QUEUE)
    def add_rt(x: Any, y: Any) -> Any:
        """No-op ``def`` task with its result kept (round trip through the reply inbox)."""
        return x + y

    @app.task(name=AADD_RT, queue=QUEUE)
    async def aadd_rt(x: Any, y: Any) -> Any:
        """No-op ``async def`` task with its result kept (round trip, for comparison)."""
        return x + y

    return app


app = make_app(os.environ.get("NATASK_BENCH_PREFIX") or "bench")
add = app.tasks[ADD]
aadd = app.tasks[AADD]
add_rt = app.tasks[ADD_RT]
aadd_rt = app.tasks[AADD_RT]
