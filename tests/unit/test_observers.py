"""Event batches and Prometheus metrics: the wire rows and the scrape-time collector."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from prometheus_client import generate_latest

from natask.events import Row, _pack, decode_events
from natask.metrics import WorkerMetrics


def test_event_rows_decode_to_maps() -> None:
    started: list[Row] = [(10.0, "a1", "t.add", {"retries": 2}), (10.1, "a2", "t.add", None)]
    assert list(decode_events(_pack({"worker": "h:1", "type": "task-started", "events": started}))) == [
        {"type": "task-started", "ts": 10.0, "worker": "h:1", "id": "a1", "name": "t.add", "retries": 2},
        {"type": "task-started", "ts": 10.1, "worker": "h:1", "id": "a2", "name": "t.add"},
    ]
    beat: list[Row] = [(11.0, None, None, {"processed": 7})]
    assert list(decode_events(_pack({"worker": "h:1", "type": "worker-heartbeat", "events": beat}))) == [
        {"type": "worker-heartbeat", "ts": 11.0, "worker": "h:1", "processed": 7},
    ]


@pytest.mark.parametrize("data", [
    b"\xc1",  # not msgpack
    msgpack.packb([{"type": "task-started"}]),  # not a batch
    msgpack.packb({"worker": "w", "type": "task-started", "events": "nope"}),
    msgpack.packb({"worker": "w", "type": 5, "events": []}),
    msgpack.packb({"worker": "w", "type": "task-started", "events": [[1, 2], "x", [1.0, None, None, None, 5]]}),
])
def test_malformed_event_messages_yield_nothing(data: bytes) -> None:
    assert list(decode_events(data)) == []


class _Worker:
    queues = ("q",)

    def active(self) -> list[Any]:
        return [object()]


def test_metrics_count_outcomes_and_bucket_durations() -> None:
    m = WorkerMetrics(_Worker())  # type: ignore[arg-type]
    m({"task-started": [(1.0, "a", "t.x", None), (1.0, "b", "t.x", None)]})
    m({"task-succeeded": [(1.02, "a", "t.x", None)], "task-failed": [(3.0, "b", "t.x", {"exc_type": "E"})],
       "task-revoked": [(4.0, "c", "t.y", None)], "worker-heartbeat": [(5.0, None, None, {})]})
    m.depth["q"] = (5, 2)
    text = generate_latest(m.registry).decode()
    for line in (
        'natask_tasks_total{outcome="succeeded",task="t.x"} 1.0',
        'natask_tasks_total{outcome="failed",task="t.x"} 1.0',
        'natask_tasks_total{outcome="revoked",task="t.y"} 1.0',
        'natask_task_duration_seconds_bucket{le="0.01",task="t.x"} 0.0',
        'natask_task_duration_seconds_bucket{le="0.05",task="t.x"} 1.0',  # 0.02 s
        'natask_task_duration_seconds_bucket{le="1.0",task="t.x"} 1.0',
        'natask_task_duration_seconds_bucket{le="5.0",task="t.x"} 2.0',  # 2 s
        'natask_task_duration_seconds_bucket{le="+Inf",task="t.x"} 2.0',
        'natask_task_duration_seconds_count{task="t.x"} 2.0',
        "natask_tasks_in_flight 1.0",
        'natask_queue_pending{queue="q"} 5.0',
        'natask_queue_in_flight{queue="q"} 2.0',
    ):
        assert line in text, line
    assert 'natask_task_duration_seconds_count{task="t.y"}' not in text  # never seen starting
