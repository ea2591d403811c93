"""natask.sentry with a real sentry-sdk client whose transport keeps envelopes in memory (no network),
a real server and a real worker."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from natask import Natask, TaskFailed
from natask.options import Request
from natask.sentry import Reporting, instrument
from natask.testing import worker


class Recording(Transport):
    """Keeps what the client would send."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    def events(self) -> list[dict[str, Any]]:
        return [e.get_event() for e in self.envelopes if e.get_event() is not None]  # type: ignore[misc]


@pytest.fixture
def sent() -> Iterator[Recording]:
    transport = Recording()
    # No default integrations: they would patch logging and threading for the whole test process.
    client = sentry_sdk.Client(dsn="https://key@sentry.invalid/1", transport=transport, default_integrations=False)
    scope = sentry_sdk.get_global_scope()
    before = scope.client
    scope.set_client(client)
    try:
        yield transport
    finally:
        scope.set_client(before)
        client.close()


async def test_a_failure_is_captured_with_task_tags_and_a_retry_is_not(app: Natask, sent: Recording) -> None:
    reporting = instrument(app)
    assert isinstance(reporting, Reporting) and instrument(app) is reporting and app.hooks.middleware == [reporting]
    attempts: list[int] = []
    tags_seen: list[dict[str, Any]] = []

    @app.task(name="s.flaky", max_retries=1, retry_backoff=0, autoretry_for=(KeyError,))
    def flaky() -> str:
        attempts.append(1)
        raise KeyError(f"attempt {len(attempts)}")

    @app.task(name="s.fine")
    async def fine() -> str:
        # The run's scope is current inside the task.
        tags_seen.append(dict(sentry_sdk.get_isolation_scope()._tags))
        return "ok"

    async with worker(app):
        result = await flaky.adelay()
        with pytest.raises(TaskFailed):
            await result.aget(timeout=10)
        assert await (await fine.adelay()).aget(timeout=10) == "ok"

    (event,) = sent.events()  # the second (last) attempt only; the first was retried
    assert event["exception"]["values"][-1]["type"] == "KeyError"
    assert event["exception"]["values"][-1]["value"] == "'attempt 2'"
    assert event["tags"] == {"natask.task": "s.flaky", "natask.task_id": result.id, "natask.queue": "default",
                             "natask.retries": "1"}
    assert event["contexts"]["natask"]["id"] == result.id and event["contexts"]["natask"]["retries"] == 1
    assert event["transaction"] == "s.flaky"
    assert tags_seen[0]["natask.task"] == "s.fine"
    assert sentry_sdk.get_isolation_scope()._tags == {}  # nothing leaked outside the runs


def test_scopes_do_not_leak_between_runs(sent: Recording) -> None:
    reporting = Reporting()
    for n in range(2):
        reporting.before_task(Request(id=f"{n:032x}", task="s.t", queue="q"))
        reporting.leave()
    sentry_sdk.capture_message("outside")
    (event,) = sent.events()
    assert "natask.task" not in event.get("tags", {})


def test_natask_does_not_import_sentry_sdk_and_instrument_names_the_extra() -> None:
    code = (
        "import sys\n"
        "import natask\n"
        "assert 'sentry_sdk' not in sys.modules, 'natask imported sentry_sdk'\n"
        "sys.modules['sentry_sdk'] = None\n"
        "import natask.sentry\n"
        "try:\n"
        "    natask.sentry.instrument(natask.Natask('x'))\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "natask[sentry]"' in out
