"""Event batches and Prometheus metrics: the wire rows and the scrape-time collector."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from prometheus_client import generate_latest

from natask.events import EventStream, Row, _pack, check_fields, decode_batch, decode_events
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
    assert decode_batch(data)[1] >= 1


def _batch(kind: str, *rows: object, worker: object = "h:1") -> bytes:
    return _pack({"worker": worker, "type": kind, "events": list(rows)})


GOOD_ONLINE = [1.0, None, None, {"queues": ["default"], "concurrency": 4, "pid": 7, "uptime": 0.5,
                                 "hostname": "h", "app": "a", "processed": 0, "failed": 0, "running": 0}]


@pytest.mark.parametrize("row", [
    [1.0, None, None, {"queues": 5}],  # blanked the dashboard: `queues.join` on a number
    [1.0, None, None, {"queues": ["a", 5]}],
    [1.0, None, None, {"concurrency": "4"}],
    [1.0, None, None, {"uptime": float("nan")}],  # JSON.parse refuses NaN: the whole page stalled
    [1.0, None, None, {"pid": True}],
    [1.0, None, None, {"hostname": "h" * 5000}],
    [1.0, None, None, {"worker": "forged"}],  # fields may not overwrite the event's own keys
    [1.0, None, None, {1: "x"}],
    [1.0, None, None, "fields"],
    ["1.0", None, None, None],  # crashed `natask events`
    [float("inf"), None, None, None],
    [True, None, None, None],
])
def test_a_malformed_worker_event_is_dropped_and_counted(row: list[object]) -> None:
    events, dropped = decode_batch(_batch("worker-online", row, GOOD_ONLINE))
    assert dropped == 1
    assert events == [{"type": "worker-online", "ts": 1.0, "worker": "h:1", **GOOD_ONLINE[3]}]  # type: ignore[dict-item]


@pytest.mark.parametrize("row", [
    [1.0, "a1", "t.add", {"retries": "abc"}],  # dropped the dashboard's event subscription
    [1.0, "a1", "t.add", {"retries": -1}],
    [1.0, "a1", "t.add", {"retries": 1.5}],
    [1.0, ">", "t.add", None],
    [1.0, "a.b", "t.add", None],
    [1.0, 7, "t.add", None],
    [1.0, "a1", "t..add", None],
    [1.0, "a1", "t.add" * 100, None],
    [1.0, "a1", "t.add", {"message": "m" * 3000}],
    [1.0, "a1", "t.add", {"countdown": -2}],
    [1.0, "a1", "t.add", {"exc_type": ["E"]}],
    [1.0, "a1", "t.add"],
])
def test_a_malformed_task_event_is_dropped_and_counted(row: list[object]) -> None:
    good = [2.0, "a2", "t.add", {"retries": 2, "message": "boom \x1b[31m", "exc_type": None}]
    events, dropped = decode_batch(_batch("task-retried", row, good))
    assert dropped == 1
    assert events == [{"type": "task-retried", "ts": 2.0, "worker": "h:1", "id": "a2", "name": "t.add",
                       "retries": 2, "message": "boom \x1b[31m", "exc_type": None}]


@pytest.mark.parametrize("batch", [
    {"worker": 5, "type": "task-started", "events": [[1.0, "a", "t.x", None]]},
    {"worker": "w\x1b[2J", "type": "task-started", "events": [[1.0, "a", "t.x", None]]},
    {"worker": "w" * 301, "type": "task-started", "events": [[1.0, "a", "t.x", None]]},
    {"worker": "w", "type": "Task Started", "events": [[1.0, "a", "t.x", None]]},
    {"worker": "w", "type": "x" * 41, "events": [[1.0, "a", "t.x", None]]},
])
def test_a_malformed_batch_drops_its_rows(batch: dict[str, object]) -> None:
    assert decode_batch(_pack(batch)) == ([], 1)


def test_unknown_fields_of_a_newer_worker_are_kept_when_plain() -> None:
    assert check_fields({"zone": "eu", "load": 0.5, "tags": ["a"], "ok": True}) == {"zone": "eu", "load": 0.5,
                                                                                   "ok": True}
    assert check_fields({"queues": "default"}) is None
    assert check_fields({f"k{i}": i for i in range(65)}) is None


async def test_event_stream_counts_what_it_drops() -> None:
    stream = EventStream(None)  # type: ignore[arg-type]
    stream._queue.put_nowait(b"\xc1")
    stream._queue.put_nowait(_batch("task-started", [1.0, "a", "t.x", None], ["x", "b", "t.x", None]))
    events = aiter(stream)
    assert (await anext(events))["id"] == "a"
    await events.aclose()  # type: ignore[attr-defined]
    assert stream.dropped == 2


class _Worker:
    queues = ("q",)
    results_not_stored = 3

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
        "natask_results_not_stored_total 3.0",
        'natask_queue_pending{queue="q"} 5.0',
        'natask_queue_in_flight{queue="q"} 2.0',
    ):
        assert line in text, line
    assert 'natask_task_duration_seconds_count{task="t.y"}' not in text  # never seen starting
