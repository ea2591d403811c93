"""An app whose module connects ``worker_process_init``: each child of ``natask worker --processes``
writes its pid to ``$NATASK_TEST_LOG`` when it starts (``test_hooks.py``)."""

from __future__ import annotations

import os
from typing import Any

from natask import Natask, signals

app = Natask("sig", subject_prefix=os.environ.get("NATASK_TEST_PREFIX", "tasks"))


@app.task(name="sig.add")
def add(x: int, y: int) -> int:
    return x + y


@signals.worker_process_init.connect
def child_started(sender: Any, **kwargs: Any) -> None:
    with open(os.environ.get("NATASK_TEST_LOG", os.devnull), "a") as f:
        f.write(f"process_init {os.getpid()}\n")
