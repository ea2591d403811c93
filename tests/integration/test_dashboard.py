"""``natask dashboard`` against a real server: its HTTP API, then the page in a real headless Chromium
driven over the Chrome DevTools Protocol (queue and task appear, a dead letter is replayed by a click)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest

from natask import Natask, TaskFailed
from natask.dashboard import Dashboard
from natask.dlq import DeadLetters
from natask.server import NatsServer
from natask.testing import worker

from .helpers import ROOT, WorkerProcess

APP = "tests.integration.workerapp:app"
CHROMIUM = "/usr/bin/chromium"


async def http(url: str, method: str = "GET", path: str = "/", headers: dict[str, str] | None = None,
               ) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with the standard library; (status, headers, body)."""
    host, port = re.match(r"http://([^:/]+):(\d+)/", url).groups()  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Length: 0", "Connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    return int(status_line.split()[1]), {k.lower(): v.strip() for k, _, v in
                                          (h.partition(":") for h in header_lines)}, body


async def eventually(check: Any, timeout: float = 20, what: str = "") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


@pytest.fixture
async def dash_app(nats_server: NatsServer) -> AsyncIterator[Natask]:
    app = Natask("itest", servers=[nats_server.url], subject_prefix="dash")
    try:
        yield app
    finally:
        await app.aclose()


async def test_api_state_events_and_replay(dash_app: Natask) -> None:
    app = dash_app
    ran: list[str] = []
    add = app.task(name="d.add")(lambda x, y: x + y)
    async with worker(app, unknown_grace=0), Dashboard(app, port=0, refresh=0.2) as dash:
        url = dash.url
        page = await http(url)
        assert page[0] == 200 and b"<title>natask dashboard</title>" in page[2]
        assert page[1]["x-frame-options"] == "DENY"

        result = await add.adelay(2, 3)
        assert await result.aget(timeout=10) == 5

        async def succeeded() -> dict[str, Any] | None:
            state = json.loads((await http(url, path="/api/state"))[2])
            rows = [t for t in state["tasks"] if t["id"] == result.id and t["state"] == "SUCCESS"]
            queues = [q for q in state["summary"]["queues"] if q["name"] == "default"]
            workers = state["summary"]["workers"]
            return state if rows and queues and workers and rows[0]["runtime"] is not None else None

        state = await eventually(succeeded, what="the task's success in /api/state")
        [row] = [t for t in state["tasks"] if t["id"] == result.id]
        assert row["name"] == "d.add" and row["args"] == "(2, 3)" and row["queue"] == "default"
        assert state["summary"]["workers"][0]["status"] == "online"

        # A dead letter, with secrets in its arguments; the worker learns the task, then we replay it.
        lost = await app.asend_task("d.late", ["o-1"], {"password": "hunter2"})
        with pytest.raises(TaskFailed):
            await lost.aget(timeout=10)

        async def dead() -> list[dict[str, Any]]:
            body = json.loads((await http(url, path="/api/state"))[2])
            return [d for d in body["summary"]["dead_letters"]["entries"] if d["id"] == lost.id]

        [entry] = await eventually(dead, what="the dead letter in /api/state")
        assert entry["args"] == "('o-1', password='***')" and entry["reason"] == "unknown task"

        replay_path = f"/api/dlq/{lost.id}/replay"
        refused = await http(url, "POST", replay_path)  # no custom header: what a cross-site form sends
        assert refused[0] == 403
        foreign = await http(url, "POST", replay_path, {"X-Natask-Dashboard": "1", "Origin": "http://evil.test"})
        assert foreign[0] == 403
        assert (await http(url, "GET", replay_path))[0] == 405
        assert (await http(url, "POST", "/api/dlq/nope/replay", {"X-Natask-Dashboard": "1"}))[0] == 404
        assert len(await DeadLetters(app).list()) == 1

        app.task(name="d.late")(lambda order, password: ran.append(order) or "ok")
        async with worker(app, queues=["default"]):
            status, _, body = await http(url, "POST", replay_path, {"X-Natask-Dashboard": "1"})
            assert status == 200 and json.loads(body) == {"replayed": lost.id, "subject": "dash.default.d.late"}
            await eventually(lambda: _true(ran == ["o-1"]), what="the replayed task to run")

            async def replayed() -> bool:
                state = json.loads((await http(url, path="/api/state"))[2])
                rows = [t for t in state["tasks"] if t["id"] == lost.id]
                return bool(rows and rows[0]["state"] == "SUCCESS" and not state["summary"]["dead_letters"]["total"])

            await eventually(replayed, what="the replayed task's success and an empty DLQ")

        # Host check: a DNS-rebinding page reaches 127.0.0.1 under a name of its own.
        reader, writer = await asyncio.open_connection("127.0.0.1", dash.port)
        writer.write(b"GET /api/state HTTP/1.1\r\nHost: attacker.example:80\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 403")
        writer.close()
        await writer.wait_closed()

        # The event stream starts with the full state.
        reader, writer = await asyncio.open_connection("127.0.0.1", dash.port)
        writer.write(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{dash.port}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"text/event-stream" in head
        assert b"transfer-encoding: chunked" in head.lower()
        first = await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
        size, _, event = first.partition(b"\r\n")  # one chunk per event
        assert int(size, 16) == len(event)
        message = json.loads(event.removeprefix(b"data: "))
        assert message["full"] and {t["id"] for t in message["tasks"]} >= {result.id, lost.id}
        # ... and stays open through a stop (the dashboard ends it).
    assert await asyncio.wait_for(reader.read(), 10) is not None
    writer.close()
    await writer.wait_closed()


async def _true(value: bool) -> bool:
    return value


# -- the page in a real browser ------------------------------------------------------------------
class Browser:
    """Headless Chromium driven over the DevTools Protocol (one websocket, flattened sessions)."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.log: list[str] = []
        self.errors: list[str] = []
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0

    async def __aenter__(self) -> Browser:
        import websockets.asyncio.client

        self.proc = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
            "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
            "--disable-domain-reliability", "--disable-breakpad", "--no-pings", "--metrics-recording-only",
            # Nothing but loopback: any other host goes to a dead proxy and resolves nowhere.
            "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "--window-size=1400,1000",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        try:
            url = await asyncio.wait_for(self._devtools_url(), 60)
            self._drain = asyncio.create_task(self._drain_stderr())
            self.ws = await websockets.asyncio.client.connect(url, max_size=None, open_timeout=30)
        except BaseException:
            await self._kill()
            raise
        self._reader = asyncio.create_task(self._read())
        return self

    async def _devtools_url(self) -> str:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode(errors="replace"))
            found = re.search(rb"DevTools listening on (ws://\S+)", line)
            if found:
                return found.group(1).decode()
        raise RuntimeError("chromium exited before listening:\n" + "".join(self.log))

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode(errors="replace"))

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            future = self._calls.pop(msg["id"], None) if "id" in msg else None
            if future is not None and not future.done():
                future.set_result(msg)
            elif msg.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(msg["params"]["exceptionDetails"])[:2000])
            elif msg.get("method") == "Fetch.authRequired":  # as a user who dismisses the login prompt
                self._next += 1
                await self.ws.send(json.dumps({"id": self._next, "method": "Fetch.continueWithAuth",
                                               "sessionId": msg["sessionId"], "params": {
                                                   "requestId": msg["params"]["requestId"],
                                                   "authChallengeResponse": {"response": "CancelAuth"}}}))
            elif msg.get("method") == "Fetch.requestPaused":
                self._next += 1
                await self.ws.send(json.dumps({"id": self._next, "method": "Fetch.continueRequest",
                                               "sessionId": msg["sessionId"],
                                               "params": {"requestId": msg["params"]["requestId"]}}))

    async def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
                   ) -> dict[str, Any]:
        self._next += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[self._next] = future
        call: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            call["sessionId"] = session
        await self.ws.send(json.dumps(call))
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})  # type: ignore[no-any-return]

    async def open(self, url: str, headers: dict[str, str] | None = None, width: int = 1400,
                   dismiss_login: bool = False) -> Page:
        """A new tab on ``url``; ``headers`` sent with every request (credentials), ``width``: of the
        window in CSS pixels (a phone's is about 375, shown as mobile); ``dismiss_login``: cancel
        the browser's basic-auth prompt, which then shows the 401 page."""
        target = (await self.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        session = (await self.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
        page = Page(self, session)
        await page.send("Runtime.enable")
        await page.send("Page.enable")
        if dismiss_login:
            await page.send("Fetch.enable", {"handleAuthRequests": True})
        if headers:
            await page.send("Network.enable")
            await page.send("Network.setExtraHTTPHeaders", {"headers": headers})
        await page.send("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": 1000 if width > 700 else 800, "deviceScaleFactor": 1,
                         "mobile": width <= 700})
        await page.send("Page.navigate", {"url": url})
        return page

    async def __aexit__(self, *exc: object) -> None:
        try:
            await asyncio.wait_for(self.send("Browser.close"), 5)
        except Exception:
            pass
        await self.ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._kill()
        await asyncio.gather(self._drain, return_exceptions=True)

    async def _kill(self) -> None:
        if self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                self.proc.kill()
        await self.proc.wait()


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session)

    async def evaluate(self, expression: str) -> Any:
        reply = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                     "awaitPromise": True})
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = 20) -> Any:
        """Poll the DOM until ``expression`` is truthy."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                text = await self.evaluate("document.body.innerText")
                raise AssertionError(f"the page never showed {what}; it shows:\n{text[:3000]}")
            await asyncio.sleep(0.2)

    async def screenshot(self, path: Path) -> None:
        size = (await self.send("Page.getLayoutMetrics"))["cssContentSize"]
        shot = await self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1400, "height": min(size["height"], 4000), "scale": 1}})
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))


def state_of(task_id: str) -> str:
    return f"document.querySelector('#tasks tr[data-id=\"{task_id}\"] .state')?.textContent"


@pytest.mark.timeout(180)
@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason="needs headless Chromium at /usr/bin/chromium (apt-get install chromium; .ci/run does)")
async def test_page_in_headless_chromium(nats_server: NatsServer, tmp_path: Path) -> None:
    env = {**os.environ, "NATS_URL": nats_server.url, "NATASK_TEST_PREFIX": "page", "PYTHONPATH": str(ROOT)}
    app = Natask("itest", servers=[nats_server.url], subject_prefix="page")
    ran: list[str] = []

    @app.task(name="it.late")
    def late(order: str, password: str, note: str) -> str:
        ran.append(order)
        return order

    first = await WorkerProcess(nats_server.url, "page", tmp_path / "log", extra=["--unknown-grace", "0"]).ready()
    with await asyncio.to_thread(open, tmp_path / "dashboard.log", "w") as log:
        dash = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "natask", "dashboard", "-A", APP, "--port", "0", env=env, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=log)
    try:
        assert dash.stdout is not None
        url = (await asyncio.wait_for(dash.stdout.readline(), 30)).decode().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url), (url, (tmp_path / "dashboard.log").read_text())
        async with Browser(tmp_path / "chromium") as browser:
            page = await browser.open(url)
            await page.wait_for("document.getElementById('live-text')?.textContent === 'live'",
                                "the live event stream connected")

            # A queue and a task appear, the task reaching SUCCESS with a runtime.
            added = await app.asend_task("it.add", [2, 3])
            assert await added.aget(timeout=20) == 5
            await page.wait_for("!!document.querySelector('#queues tr[data-queue=\"default\"]')", "queue default")
            await page.wait_for(f"{state_of(added.id)} === 'SUCCESS'", f"task {added.id} as SUCCESS")
            cells = await page.evaluate(
                f"[...document.querySelector('#tasks tr[data-id=\"{added.id}\"]').cells].map(c => c.textContent)")
            assert cells[1] == "it.add" and cells[4] == "(2, 3)" and re.fullmatch(r"[\d.]+ (ms|s)", cells[7]), cells
            await page.wait_for("document.querySelector('#workers .state')?.textContent === 'online'",
                                "a worker online")

            # A dead letter: the first worker does not know it.late. Its secret never reaches the page,
            # its markup is shown as text.
            lost = await app.asend_task("it.late", ["order-7"],
                                        {"password": "hunter2", "note": "<b id=injected>bold</b>"})
            with pytest.raises(TaskFailed):
                await lost.aget(timeout=20)
            button = f"document.querySelector('#dlq tr[data-id=\"{lost.id}\"] button.replay')"
            await page.wait_for(f"!!{button}", "the dead letter with a Replay button")
            await page.wait_for(f"!!document.querySelector('#failed tr[data-id=\"{lost.id}\"]')",
                                "the failed task")
            row_text = await page.evaluate(f"document.querySelector('#dlq tr[data-id=\"{lost.id}\"]').innerText")
            assert "password='***'" in row_text and "<b id=injected>bold</b>" in row_text, row_text
            assert "hunter2" not in await page.evaluate("document.documentElement.outerHTML")
            assert await page.evaluate("document.getElementById('injected') === null")

            shot = Path(os.environ.get("NATASK_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
            await page.screenshot(shot.with_name(shot.stem + "-dead-letter.png"))

            # A worker that knows the task takes over; a real click on Replay runs it.
            first.signal(signal.SIGTERM)
            assert await first.wait() == 0
            async with worker(app):
                assert await page.evaluate(f"{button}.click(), true")
                await page.wait_for(f"{state_of(lost.id)} === 'SUCCESS'", f"replayed task {lost.id} as SUCCESS")
                await page.wait_for(f"!document.querySelector('#dlq tr[data-id=\"{lost.id}\"]')",
                                    "the dead letter gone")
                assert ran == ["order-7"]
                assert await page.evaluate("document.getElementById('c-dead').textContent") == "0"
                await page.wait_for(f"!document.querySelector('#failed tr[data-id=\"{lost.id}\"]')",
                                    "the task no longer failed")
                await page.screenshot(shot)
                assert (await asyncio.to_thread(shot.stat)).st_size > 10_000
            assert browser.errors == []
    finally:
        first.kill()
        if dash.returncode is None:
            dash.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(dash.wait(), 20) == 0, (tmp_path / "dashboard.log").read_text()
        await app.aclose()


def _events(kind: str, rows: list[list[Any]], worker: str = "w:1") -> bytes:
    return msgpack.packb({"worker": worker, "type": kind, "events": rows})  # type: ignore[no-any-return]


@pytest.mark.timeout(180)
@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason="needs headless Chromium at /usr/bin/chromium (apt-get install chromium; .ci/run does)")
async def test_page_renders_through_malformed_events_and_odd_values(nats_server: NatsServer, tmp_path: Path) -> None:
    app = Natask("itest", servers=[nats_server.url], subject_prefix="odd")
    app.task(name="o.add")(lambda x, y: x + y)
    nc = await nats.connect(nats_server.url)
    odd_online = _events("worker-online", [[1.0, None, None, {"queues": 5, "uptime": "long"}]], "odd:1")
    odd_started = _events("task-started", [[1.0, "t1", "o.add", {"retries": "abc"}]])

    async def keep_sending_odd_events() -> None:
        while True:  # whenever the dashboard subscribes, and while the page renders
            await nc.publish("natask.events.odd.worker-online", odd_online)
            await nc.publish("natask.events.odd.task-started", odd_started)
            await asyncio.sleep(0.2)

    sender = asyncio.create_task(keep_sending_odd_events())
    try:
        async with Dashboard(app, port=0, refresh=0.2) as dash, Browser(tmp_path / "chromium") as browser:
            page = await browser.open(dash.url)
            await page.wait_for("document.getElementById('live-text')?.textContent === 'live'",
                                "the live event stream connected")
            async with worker(app) as w:
                added = await app.asend_task("o.add", [2, 3])
                assert await added.aget(timeout=20) == 5
                # A worker-online event whose queues was a number blanked the page (TypeError in render).
                await page.wait_for(f"{state_of(added.id)} === 'SUCCESS'", f"task {added.id} as SUCCESS")
                await page.wait_for(f"!!document.querySelector('#workers tr[data-worker=\"{w.ident}\"]')",
                                    "the real worker's row")
            assert await page.evaluate("document.querySelector('#workers tr[data-worker=\"odd:1\"]') === null")
            assert dash.summary()["dropped"] > 0

            # Whatever the server sends, the page renders what it can: values of unexpected types are shown
            # as text (or a dash), never a TypeError that stops the rendering. Applied and rendered in one
            # evaluation, so no message from the server replaces the odd summary in between.
            shown = await page.evaluate("""apply({full: false, now: "x", tasks: [{id: 5}, null,
                {id: "z1", state: 7, name: {}, args: 3, sent: "x", runtime: "y", worker: ["w"]}],
                summary: {app: 1, prefix: null, queues: [{name: 5, pending: "x", in_rate: "a"}, null],
                          workers: [{worker: "weird", status: "online", queues: 5, uptime: "u", running: "r"}],
                          dead_letters: {total: "x", entries: [{id: 9, attempts: "n", time: "t"}, 4]}, seen: "s"}});
                render();
                ['#tasks tr[data-id="z1"]', '#workers tr[data-worker="weird"]', '#queues tr[data-queue="5"]',
                 '#dlq tr[data-id="9"]'].map((q) => !!document.querySelector(q))""")
            assert shown == [True, True, True, True]
            assert await page.evaluate(f"!!document.querySelector('#tasks tr[data-id=\"{added.id}\"]')")
            assert browser.errors == []
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        await nc.close()
        await app.aclose()
