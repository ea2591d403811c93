"""OpenTelemetry end to end: a caller's span, the producer side in this process (in-memory exporter), a
real server, and a worker in another process exporting its spans to a file: one trace throughout."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from natask import Natask, TaskFailed, TaskRevoked, chain
from natask.otel import instrument
from natask.server import NatsServer
from natask.testing import worker

from .helpers import WorkerProcess
from .otelapp import fail, flaky, span_dict, step

PREFIX = "otel"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def producer(nats_server: NatsServer, exporter: InMemorySpanExporter) -> AsyncIterator[Natask]:
    """An instrumented producer app registering the worker app's tasks under their names."""
    app = Natask("producer", servers=[nats_server.url], subject_prefix=PREFIX)
    for task in (step, flaky, fail):
        app.task(name=task.name, max_retries=task.options.max_retries, bind=task.options.bind)(task.fn)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrument(app, tracer_provider=provider)
    app.provider = provider  # type: ignore[attr-defined]
    try:
        yield app
    finally:
        await app.aclose()


async def worker_spans(nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       work: Any) -> list[dict[str, Any]]:
    """Run ``await work()`` beside a worker process; the spans that worker exported once it stopped
    (its spans end before its drain does, so the file is complete when the process has exited)."""
    spans = tmp_path / "spans.jsonl"
    monkeypatch.setenv("NATASK_TEST_SPANS", str(spans))
    w = await WorkerProcess(nats_server.url, PREFIX, tmp_path / "calls.log",
                            app="tests.integration.otelapp:app").ready()
    try:
        await work()
    finally:
        w.signal(signal.SIGTERM)
        assert await w.wait() == 0, w.output()
    return [json.loads(line) for line in spans.read_text().splitlines()]


def by_message(spans: list[dict[str, Any]], kind: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        if s["kind"] == kind:
            out.setdefault(s["attributes"]["messaging.message.id"], []).append(s)
    return out


async def test_one_trace_follows_a_caller_through_a_chain_of_three_tasks_in_a_worker_process(
        nats_server: NatsServer, producer: Natask, exporter: InMemorySpanExporter, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tracer = producer.provider.get_tracer("test")  # type: ignore[attr-defined]

    async def work() -> None:
        with tracer.start_as_current_span("caller"):
            result = await chain(producer.tasks["ot.step"].s(1), producer.tasks["ot.step"].s(),
                                 producer.tasks["ot.step"].s()).adelay()
        assert await result.aget(timeout=20) == 4

    remote = await worker_spans(nats_server, tmp_path, monkeypatch, work)
    local = [span_dict(s) for s in exporter.get_finished_spans()]
    caller = next(s for s in local if s["name"] == "caller")
    spans = local + remote
    assert {s["trace_id"] for s in spans} == {caller["trace_id"]}, spans

    producers, consumers = by_message(spans, "PRODUCER"), by_message(spans, "CONSUMER")
    assert len(producers) == len(consumers) == 3 and set(producers) == set(consumers)
    assert all(len(v) == 1 for v in (*producers.values(), *consumers.values()))
    # caller -> publish 1 -> process 1 -> publish 2 -> process 2 -> publish 3 -> process 3
    parent, ran = caller, []
    for _ in range(3):
        (sent,) = [p for (p,) in producers.values() if p["parent_id"] == parent["span_id"]]
        (run,) = consumers[sent["attributes"]["messaging.message.id"]]
        assert run["parent_id"] == sent["span_id"]
        ran.append(run)
        parent = run
    assert [s["name"] for s in ran] == ["process ot.step"] * 3
    first_publish = next(s for s in local if s["kind"] == "PRODUCER")  # sent here; the others by the worker
    assert first_publish["parent_id"] == caller["span_id"] and first_publish["name"] == "publish ot.step"

    run = ran[0]
    assert run["status"] == "OK"
    task_id = run["attributes"]["natask.task.id"]
    assert run["attributes"] == {
        "messaging.system": "nats", "messaging.operation.type": "process", "messaging.operation.name": "process",
        "messaging.destination.name": f"{PREFIX}.default.ot.step", "messaging.consumer.group.name": "default",
        "messaging.message.id": task_id, "natask.task.name": "ot.step", "natask.task.id": task_id,
        "natask.task.retries": 0, "natask.queue": "default", "natask.task.state": "SUCCESS"}
    sent = producers[task_id][0]["attributes"]
    assert sent["messaging.system"] == "nats" and sent["messaging.operation.type"] == "send"
    assert sent["messaging.destination.name"] == f"{PREFIX}.default.ot.step" and sent["natask.task.id"] == task_id


async def test_a_retry_is_a_second_run_span_and_a_failure_records_its_exception(
        nats_server: NatsServer, producer: Natask, exporter: InMemorySpanExporter, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ids: dict[str, str] = {}

    async def work() -> None:
        retried = await producer.tasks["ot.flaky"].adelay()
        failed = await producer.tasks["ot.fail"].adelay()
        ids.update(flaky=retried.id, fail=failed.id)
        assert await retried.aget(timeout=20) == "ok"
        with pytest.raises(TaskFailed, match="boom"):
            await failed.aget(timeout=20)

    remote = await worker_spans(nats_server, tmp_path, monkeypatch, work)
    local = {s["attributes"]["natask.task.id"]: s for s in map(span_dict, exporter.get_finished_spans())}
    runs = by_message(remote, "CONSUMER")

    sent = local[ids["flaky"]]
    first, second = sorted(runs[ids["flaky"]], key=lambda s: s["attributes"]["natask.task.retries"])
    assert first["trace_id"] == second["trace_id"] == sent["trace_id"]
    assert first["parent_id"] == second["parent_id"] == sent["span_id"]  # the retry carries the same context
    assert first["status"] == "ERROR" and second["status"] == "OK"
    assert [e["name"] for e in first["events"]] == ["natask.retry", "exception"]
    assert first["attributes"]["natask.task.state"] == "RETRY" and second["attributes"]["natask.task.retries"] == 1

    (failed,) = runs[ids["fail"]]
    assert failed["status"] == "ERROR" and failed["trace_id"] == local[ids["fail"]]["trace_id"]
    (exc,) = [e for e in failed["events"] if e["name"] == "exception"]
    assert exc["attributes"]["exception.type"] == "ValueError" and exc["attributes"]["exception.message"] == "boom"


@pytest.mark.parametrize("kind", ["def", "async def"])
async def test_a_task_that_calls_delay_continues_its_trace(app: Natask, kind: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrument(app, tracer_provider=provider)

    @app.task(name="ot.child")
    def child(x: int) -> int:
        return x

    if kind == "def":
        @app.task(name="ot.parent")
        def parent() -> str:
            return child.delay(1).id  # a sync call from a worker thread
    else:
        @app.task(name="ot.parent")
        async def parent() -> str:
            return (await child.adelay(1)).id

    async with worker(app):
        child_id = await (await parent.adelay()).aget(timeout=10)
        assert await app.AsyncResult(child_id).aget(timeout=10) == 1
    spans = {(s.kind.name, s.attributes["natask.task.name"] if s.attributes else ""): s
             for s in exporter.get_finished_spans()}
    parent_run = spans["CONSUMER", "ot.parent"]
    child_sent = spans["PRODUCER", "ot.child"]
    assert parent_run.context is not None and child_sent.parent is not None
    assert child_sent.parent.span_id == parent_run.context.span_id
    assert spans["CONSUMER", "ot.child"].parent.span_id == child_sent.context.span_id  # type: ignore[union-attr]


async def test_dead_letters_and_revokes_show_as_span_events(app: Natask) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrument(app, tracer_provider=provider)

    @app.task(name="ot.never")
    def never() -> None:
        raise AssertionError("a revoked task ran")

    @app.task(name="ot.broken", max_retries=1, retry_backoff=0, autoretry_for=(KeyError,))
    def broken() -> None:
        raise KeyError("always")

    async with worker(app, unknown_grace=0):
        revoked = app.AsyncResult("0" * 32)
        await revoked.arevoke()
        await never.aapply_async(task_id="0" * 32)
        unknown = await app.asend_task("ot.unknown", (1,))
        exhausted = await broken.adelay()
        for result in (revoked, unknown, exhausted):
            with pytest.raises((TaskFailed, TaskRevoked)):
                await result.aget(timeout=10)
    runs: dict[str, list[Any]] = {}
    for s in exporter.get_finished_spans():
        if s.kind.name == "CONSUMER" and s.attributes:
            runs.setdefault(str(s.attributes["natask.task.id"]), []).append(s)
    (run,) = runs["0" * 32]  # revoked before it ran: a short run span carrying the event
    assert [(e.name, dict(e.attributes or {})) for e in run.events] == [
        ("natask.revoked", {"natask.revoked.terminated": False, "natask.revoked.expired": False})]
    (run,) = runs[unknown.id]
    assert run.name == "process ot.unknown" and run.status.status_code.name == "ERROR"
    assert [e.name for e in run.events] == ["natask.dead_letter"]
    assert run.events[0].attributes["natask.dead_letter.reason"] == "unknown task"  # type: ignore[index]
    first, last = sorted(runs[exhausted.id], key=lambda s: s.attributes["natask.task.retries"])
    assert [e.name for e in first.events] == ["natask.retry", "exception"]
    assert [e.name for e in last.events] == ["natask.dead_letter", "exception"]  # the last run's own span
    assert last.status.status_code.name == "ERROR" and last.attributes["natask.task.state"] == "FAILURE"
