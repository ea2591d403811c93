"""The traced app a subprocess worker runs in the OpenTelemetry test (``-A tests.integration.otelapp:app``):
its spans go as JSON lines to the file named by ``$NATASK_TEST_SPANS``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from natask import Natask, Task
from natask.otel import instrument


class JsonLinesExporter(SpanExporter):
    """Appends one JSON object per finished span to a file (test only: the test process reads it)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a") as f:
            for span in spans:
                f.write(json.dumps(span_dict(span)) + "\n")
        return SpanExportResult.SUCCESS


def span_dict(span: ReadableSpan) -> dict[str, object]:
    """What the test compares, for a span exported here or in its own process."""
    assert span.context is not None
    return {
        "name": span.name, "kind": span.kind.name, "trace_id": f"{span.context.trace_id:032x}",
        "span_id": f"{span.context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "attributes": dict(span.attributes or {}), "status": span.status.status_code.name,
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
    }


app = Natask("otel-it", subject_prefix=os.environ.get("NATASK_TEST_PREFIX", "otel"))
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(os.environ.get("NATASK_TEST_SPANS", os.devnull))))
instrument(app, tracer_provider=provider)


@app.task(name="ot.step")
def step(x: int) -> int:
    return x + 1


@app.task(name="ot.flaky", bind=True, max_retries=3)
def flaky(self: Task[..., str]) -> str:
    if self.request.retries == 0:
        raise self.retry(exc=ConnectionError("first try"), countdown=0)
    return "ok"


@app.task(name="ot.fail", max_retries=0)
async def fail() -> None:
    raise ValueError("boom")
