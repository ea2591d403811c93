"""The Starlette dashboard against a real server: auth on every route, CSRF on top, history that
survives a restart, counts that agree beyond the index, the CLI's auth flags; then the pages in a
real headless Chromium: auth, search, a task's detail, a phone-width window, and the app mounted
under a prefix in someone else's FastAPI app."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import httpx
import nats
import pytest
import uvicorn
from fastapi import FastAPI

from natask import ConfigError, Natask, TaskFailed, TaskNotFound
from natask.beat import TICK_SEP, Beat
from natask.beat.schedules import open_bucket
from natask.cli import _json_arg
from natask.dashboard import Dashboard, History, asgi_app
from natask.server import NatsServer
from natask.testing import worker

from .test_dashboard import CHROMIUM, Browser
from .test_operator_surface import APP, Cli

USER, PASSWORD = "admin", "s3cret-pw"
TOKEN = "tok-0123456789abcdef"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason="needs headless Chromium at /usr/bin/chromium (apt-get install chromium)")


@pytest.fixture
async def app(nats_server: NatsServer) -> AsyncIterator[Natask]:
    app = Natask("web", servers=[nats_server.url], subject_prefix="web")

    @app.task(name="w.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="w.boom")
    def boom(order: str, api_key: str = "") -> None:
        raise ValueError(f"cannot ship {order}")

    try:
        yield app
    finally:
        await app.aclose()


async def until(check: Any, what: str, timeout: float = 20) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_every_route_needs_credentials_and_posts_also_need_the_csrf_header(
        app: Natask, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with Dashboard(app, port=0, basic_auth=[f"{USER}:{PASSWORD}"], auth_token=TOKEN,
                         auth_header="X-Forwarded-User") as dash:
        async with httpx.AsyncClient(base_url=dash.url, timeout=10) as http:
            for path in ("/", "/api/state", "/api/events", "/api/tasks", "/api/tasks/abc", "/api/workers",
                         "/api/broker", "/api/charts", "/api/schedules", "/static/app.js"):
                refused = await http.get(path)
                assert refused.status_code == 401, path
                assert refused.headers["www-authenticate"].startswith("Basic realm=")
            assert (await http.get("/", auth=(USER, "wrong"))).status_code == 401
            assert (await http.post("/api/dlq/x/replay", headers={"X-Natask-Dashboard": "1"})).status_code == 401

            page = await http.get("/", auth=(USER, PASSWORD))
            assert page.status_code == 200 and 'src="static/app.js"' in page.text
            assert page.headers["x-frame-options"] == "DENY"
            assert (await http.get("/api/state", headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 200
            assert (await http.get("/api/state", headers={"X-Forwarded-User": "alice"})).status_code == 200

            # A browser opens ?token= once: a cookie for the path, and the token leaves the address bar.
            opened = await http.get("/?token=" + TOKEN)
            assert opened.status_code == 303 and opened.headers["location"] == "/"
            assert "httponly" in opened.headers["set-cookie"].lower()
            assert (await http.get("/api/state")).status_code == 200  # the cookie
            http.cookies.clear()

            # Authenticated is not enough for a state change: a cross-site form has the user's credentials.
            auth = {"Authorization": BASIC}
            assert (await http.post("/api/tasks/abc/revoke", headers=auth)).status_code == 403
            assert (await http.post("/api/tasks/abc/revoke", headers={**auth, "X-Natask-Dashboard": "1",
                                                                      "Origin": "http://evil.test"})).status_code == 403
            ok = await http.post("/api/tasks/abc/revoke", headers={**auth, "X-Natask-Dashboard": "1"})
            assert ok.status_code == 200 and ok.json() == {"revoked": "abc", "terminate": False}
            assert (await http.get("/api/tasks/abc/revoke", headers=auth)).status_code == 405
        assert PASSWORD not in repr(dash) and TOKEN not in repr(dash)
    # The server's logs (the test's own HTTP client logs the URLs it asks for, ?token= included).
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("natask", "uvicorn")))
    assert PASSWORD not in logged and TOKEN not in logged


async def test_history_survives_a_restart_and_is_searchable(app: Natask) -> None:
    async with Dashboard(app, port=0, refresh=0.2) as dash, worker(app) as w:
        ok = await app.asend_task("w.add", [2, 3])
        bad = await app.asend_task("w.boom", ["order-77"], {"api_key": "sk_live_1"})
        assert await ok.aget(timeout=10) == 5
        with pytest.raises(TaskFailed):
            await bad.aget(timeout=10)

        async def both_final() -> bool:
            rows = [dash.model.task(ok.id), dash.model.task(bad.id)]
            # the dashboard's record of the publishes is in the history stream too
            return all(r is not None and r.finished is not None for r in rows) and not dash.feed._sent

        await until(both_final, "both outcomes in the model")
        before = dash.model.counts()
    await app.aclose()

    # A new dashboard (a new process, as far as the model goes) rebuilds from the history stream.
    async with Dashboard(app, port=0) as again, httpx.AsyncClient(base_url=again.url, timeout=10) as http:
        assert again.model.counts()["failed"] == before["failed"] == 1
        found = (await http.get("/api/tasks", params={"q": "order-77"})).json()
        assert [t["id"] for t in found["tasks"]] == [bad.id] and found["total"] == 1
        row = found["tasks"][0]
        assert row["args"] == "('order-77', api_key='***')" and row["state"] == "FAILURE"
        assert row["worker"] == w.ident and row["queue"] == "default"
        for params, expected in (({"name": "w.add"}, [ok.id]), ({"state": "SUCCESS"}, [ok.id]),
                                 ({"worker": w.ident, "limit": "1"}, [bad.id]),
                                 ({"since": str(row["sent"] + 3600)}, [])):
            assert [t["id"] for t in (await http.get("/api/tasks", params=params)).json()["tasks"]] == expected, params
        detail = (await http.get(f"/api/tasks/{bad.id}")).json()
        assert detail["exc_type"] == "ValueError" and "cannot ship order-77" in detail["traceback"]
        # "sent" is when the dashboard saw the publish: the worker may have started a moment before.
        assert sorted(e["what"] for e in detail["timeline"]) == ["failure", "sent", "started"]
        assert detail["timeline"][-1]["what"] == "failure"
        assert (await http.get(f"/api/tasks/{ok.id}")).json()["result"] == "5"
        broker = (await http.get("/api/broker")).json()
        assert "NATASK_EVENTS_WEB" in [s["name"] for s in broker["streams"]]


async def test_counts_agree_when_more_tasks_ran_than_the_index_holds(app: Natask) -> None:
    async with Dashboard(app, port=0, refresh=0.2, history_limit=10, history=History(enabled=False)) as dash:
        async with worker(app, concurrency=8):
            calls = [await app.asend_task("w.boom" if i % 3 == 0 else "w.add", [f"o{i}"] if i % 3 == 0 else [i, i])
                     for i in range(30)]
            for call in calls:
                with pytest.raises(TaskFailed) if call.task_name == "w.boom" else contextlib.nullcontext():
                    await call.aget(timeout=20)

            async def all_counted() -> bool:
                c = dash.model.counts()
                return c["failed"] == 10 and c["succeeded"] == 20

            await until(all_counted, "30 outcomes counted")
        async with httpx.AsyncClient(base_url=dash.url, timeout=10) as http:
            state = (await http.get("/api/state")).json()
        counts, workers = state["summary"]["counts"], state["summary"]["workers"]
        assert counts["seen"] == 30 and counts["indexed"] == 10
        assert sum(w["failed"] for w in workers) == counts["failed"] == 10
        assert sum(w["succeeded"] for w in workers) == counts["succeeded"] == 20


async def test_cli_serves_beyond_loopback_with_basic_auth(nats_server: NatsServer) -> None:
    cli = await Cli.start(nats_server.url, "dashboard", "-A", APP, "--host", "0.0.0.0", "-p", "0",
                          "--basic-auth", f"{USER}:{PASSWORD}", "--no-history")
    url = await cli.stdout_line()
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            assert (await http.get("/api/state")).status_code == 401
            assert (await http.get("/api/state", auth=(USER, PASSWORD))).status_code == 200
    finally:
        cli.proc.terminate()
        code, err = await cli.finish()
    assert code == 0 and PASSWORD not in err, err


# -- in a real browser -----------------------------------------------------------------------------
@pytest.mark.timeout(180)
@needs_chromium
async def test_auth_search_detail_and_a_narrow_window_in_chromium(app: Natask, tmp_path: Path) -> None:
    async with Dashboard(app, port=0, refresh=0.2, basic_auth=[f"{USER}:{PASSWORD}"]) as dash, \
            worker(app) as w, Browser(tmp_path / "chromium") as browser:
        refused = await browser.open(dash.url, dismiss_login=True)
        await refused.wait_for("document.body?.innerText.includes('authentication required')", "the 401 page")

        page = await browser.open(dash.url, headers={"Authorization": BASIC})
        await page.wait_for("document.getElementById('live-text')?.textContent === 'live'", "the live stream")
        ok = await app.asend_task("w.add", [20, 22])
        bad = await app.asend_task("w.boom", ["order-9"], {"api_key": "hunter2"})
        assert await ok.aget(timeout=10) == 42
        with pytest.raises(TaskFailed):
            await bad.aget(timeout=10)
        await page.wait_for("document.getElementById('c-failed').textContent === '1'", "the FAILED tile at 1")
        await page.wait_for(f"!!document.querySelector('#workers tr[data-worker=\"{w.ident}\"]')", "the worker")
        assert await page.evaluate(
            f"document.querySelector('#workers tr[data-worker=\"{w.ident}\"]').cells[5].textContent") == "1"

        # The tile shows the server's tally, not the failed rows the page holds (it stuck at 100 once).
        assert await page.evaluate("""apply({full: false, tasks: [], summary: {...S.summary,
            counts: {...S.summary.counts, failed: 779}}}); render(); $("c-failed").textContent""") == "779"

        # Search by argument text: server-side, one page.
        await page.evaluate("location.hash = '#/tasks'")
        await page.evaluate("document.querySelector('#search [name=q]').value = 'order-9';"
                            "document.querySelector('#search button').click(); true")
        await page.wait_for(f"document.querySelectorAll('#search-results tr[data-id]').length === 1 && "
                            f"!!document.querySelector('#search-results tr[data-id=\"{bad.id}\"]')", "one search hit")
        assert await page.evaluate("document.getElementById('search-count').textContent") == "1 matching"

        # The detail page: redacted arguments, traceback, timeline, the worker; a click revokes.
        await page.evaluate(f"document.querySelector('#search-results tr[data-id=\"{bad.id}\"] a').click(), true")
        await page.wait_for(f"document.getElementById('d-id').textContent === '{bad.id}'", "the detail page")
        await page.wait_for("document.getElementById('d-traceback').textContent.includes('cannot ship order-9')",
                            "the traceback")
        text = await page.evaluate("document.getElementById('page-task').innerText")
        assert "api_key='***'" in text and w.ident in text and "started" in text and "failure" in text, text
        assert "hunter2" not in await page.evaluate("document.documentElement.outerHTML")

        slow = await app.asend_task("w.add", [1, 1], countdown=3600)  # scheduled: still revocable
        await page.evaluate(f"location.hash = '#/task/{slow.id}'")
        await page.wait_for(f"document.getElementById('d-id').textContent === '{slow.id}'", "the scheduled task")
        await page.evaluate("window.confirm = () => true; document.getElementById('revoke').click(); true")
        revoked = await app.client.broker()

        async def recorded() -> bool:
            return await (await revoked.revoked()).get(slow.id) is not None

        await until(recorded, "the revoke recorded where workers read it")

        # A phone-width window: the main layout never scrolls sideways (wide tables scroll inside).
        phone = await browser.open(dash.url, headers={"Authorization": BASIC}, width=375)
        await phone.wait_for("document.getElementById('live-text')?.textContent === 'live'", "the live stream")
        for route in ("#/", "#/tasks", f"#/task/{bad.id}", "#/workers", "#/charts", "#/broker", "#/schedules"):
            await phone.evaluate(f"location.hash = '{route}'")
            await phone.wait_for(f"document.body.dataset.shown === '{route}'", f"the page of {route}")
            width = await phone.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1], (route, width)
        assert browser.errors == []


@pytest.mark.timeout(180)
@needs_chromium
async def test_mounted_under_a_prefix_in_a_fastapi_app(app: Natask, tmp_path: Path) -> None:
    dashboard = asgi_app(app, auth_header="X-Forwarded-User", history=False)
    web = FastAPI()
    web.mount("/ops/natask", dashboard)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(web, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    try:
        await until(lambda: _true(server.started), "uvicorn to listen")
        base = f"http://127.0.0.1:{port}/ops/natask/"
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(base + "api/state")).status_code == 401
            redirected = await http.get(base.rstrip("/"), headers={"X-Forwarded-User": "a"})
            assert redirected.status_code in (307, 308) and redirected.headers["location"].endswith("/ops/natask/")
        async with worker(app), Browser(tmp_path / "chromium") as browser:
            page = await browser.open(base, headers={"X-Forwarded-User": "alice"})
            await page.wait_for("document.getElementById('live-text')?.textContent === 'live'", "the live stream")
            done = await app.asend_task("w.add", [1, 2])
            assert await done.aget(timeout=10) == 3
            await page.wait_for(f"!!document.querySelector('#tasks tr[data-id=\"{done.id}\"]')", "the task")
            await page.evaluate("location.hash = '#/broker'")
            await page.wait_for("document.querySelectorAll('#streams tr').length > 1", "the broker page")
            urls = await page.evaluate("performance.getEntriesByType('resource').map((e) => e.name)")
            assert urls and all(u.startswith(base) for u in urls), urls
            assert browser.errors == []
    finally:
        server.should_exit = True
        await dashboard.stop()
        await asyncio.wait_for(serving, 20)


async def _true(value: bool) -> bool:
    return value




async def test_workers_charts_broker_and_schedules_pages_read_what_exists(app: Natask) -> None:
    from datetime import timedelta

    app.periodic(timedelta(hours=1), name="w.hourly")(lambda: None)
    async with Dashboard(app, port=0, refresh=0.2) as dash, worker(app, concurrency=3) as w, \
            httpx.AsyncClient(base_url=dash.url, timeout=10) as http:
        done = await app.asend_task("w.add", [1, 1])
        assert await done.aget(timeout=10) == 2

        async def counted() -> bool:
            return dash.model.counts()["succeeded"] == 1

        await until(counted, "the success counted")
        workers = (await http.get("/api/workers")).json()["workers"]
        [mine] = [x for x in workers if x["worker"] == w.ident]
        assert mine["concurrency"] == 3 and mine["succeeded"] == 1 and mine["active"] == []
        assert "w.add" in mine["registered"]  # as the worker reports them (natask inspect registered)
        charts = (await http.get("/api/charts", params={"task": "w.add"})).json()
        assert sum(p["succeeded"] for p in charts["points"]) == 1 and charts["tasks"] == ["w.add"]
        assert charts["queues"] == ["default"] and charts["points"][-1]["p50"] is not None
        broker = (await http.get("/api/broker")).json()
        assert {"NATASK_WEB", "NATASK_EVENTS_WEB"} <= {s["name"] for s in broker["streams"]}
        assert [c["name"] for c in broker["consumers"]] == ["default"]
        assert "natask_results_web" in {b["name"] for b in broker["buckets"]}
        schedules = (await http.get("/api/schedules")).json()
        [entry] = schedules["entries"]
        assert entry["name"] == "w.hourly" and entry["last"] is None and entry["source"] == "code"
        assert entry["editable"] is False and entry["enabled"] is True


# -- live schedules and the broker's sizes ---------------------------------------------------------
class Ticks:
    """Tick messages a beat publishes under the app's prefix, awaitable by entry name."""

    def __init__(self) -> None:
        self.entries: list[str] = []
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        self.entries.append(msg_id.rsplit(TICK_SEP, 1)[0].replace("/", "."))
        self._changed.set()

    async def first(self, entry: str, timeout: float = 20) -> None:
        async def seen() -> None:
            while entry not in self.entries:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(seen(), timeout)


def cli_json_error(text: str, what: str, kind: type) -> str:
    """What ``natask beat add --args/--kwargs TEXT`` says about TEXT, without the dashes."""
    with pytest.raises(click.UsageError) as e:
        _json_arg(text, f"--{what}", kind)
    return e.value.message.removeprefix("--")


async def beat_error(app: Natask, name: str, task: str, **kwargs: Any) -> str:
    """What ``app.beat.add`` (and so ``natask beat add``) says about an entry."""
    with pytest.raises((ConfigError, TaskNotFound)) as e:
        await app.beat.aadd(name, task, **kwargs)
    return str(e.value)


async def test_schedules_are_edited_through_app_beat_with_its_checks_and_a_running_beat_fires_them(
        app: Natask, nats_server: NatsServer) -> None:
    app.add_periodic_task(timedelta(hours=1), app.tasks["w.add"].s(1, 1), name="w.hourly")
    auth = {"Authorization": BASIC}
    csrf = {**auth, "X-Natask-Dashboard": "1"}
    good = {"name": "w.every", "task": "w.add", "every": "1", "args": "[1, 2]", "kwargs": "", "queue": "", "tz": ""}
    ticks = Ticks()
    nc = await nats.connect(nats_server.url)
    beat = Beat(app, lease_ttl=1)
    try:
        await nc.subscribe("web.>", cb=ticks.on_msg)
        await nc.flush()
        await beat.start()
        async with Dashboard(app, port=0, basic_auth=[f"{USER}:{PASSWORD}"]) as dash, \
                httpx.AsyncClient(base_url=dash.url, timeout=10) as http:
            # Auth on every route and method, then the CSRF defence of the other state changes.
            for method, path in (("GET", "/api/schedules"), ("POST", "/api/schedules"),
                                 ("DELETE", "/api/schedules/w.every"), ("POST", "/api/schedules/w.every/enable"),
                                 ("POST", "/api/schedules/w.every/disable")):
                assert (await http.request(method, path, json=good)).status_code == 401, (method, path)
                if method != "GET":
                    refused = await http.request(method, path, json=good, headers=auth)
                    assert refused.status_code == 403, (method, path)
                    foreign = await http.request(method, path, json=good,
                                                 headers={**csrf, "Origin": "http://evil.test"})
                    assert foreign.status_code == 403, (method, path)
            assert (await http.put("/api/schedules", json=good, headers=csrf)).status_code == 405

            # Every mistake is refused with natask beat add's words; none reaches the bucket.
            async def refused_with(body: dict[str, Any]) -> str:
                answer = await http.post("/api/schedules", json=body, headers=csrf)
                assert answer.status_code == 400, (body, answer.text)
                return str(answer.json()["error"])

            expected = {
                "w.ad": await beat_error(app, "x", "w.ad", every=5),
                "cron": await beat_error(app, "x", "w.add", cron="61 * * * *", args=[1, 2]),
                "both": await beat_error(app, "x", "w.add", every=5, cron="* * * * *", args=[1, 2]),
                "none": await beat_error(app, "x", "w.add", args=[1, 2]),
                "tz": await beat_error(app, "x", "w.add", cron="0 * * * *", tz="Mars/Base", args=[1, 2]),
                "tz-every": await beat_error(app, "x", "w.add", every=5, tz="UTC", args=[1, 2]),
                "queue": await beat_error(app, "x", "w.add", every=5, queue="no queue", args=[1, 2]),
                "arity": await beat_error(app, "x", "w.add", every=5, args=[1]),
                "code": await beat_error(app, "w.hourly", "w.add", every=5, args=[1, 2]),
                "name": await beat_error(app, "bad name", "w.add", every=5, args=[1, 2]),
                "fraction": await beat_error(app, "x", "w.add", every=1.5, args=[1, 2]),
            }
            assert "did you mean 'w.add'" in expected["w.ad"]
            x = {**good, "name": "x", "every": "5"}
            assert await refused_with({**x, "task": "w.ad"}) == expected["w.ad"]
            assert await refused_with({**x, "every": "", "cron": "61 * * * *"}) == expected["cron"]
            assert await refused_with({**x, "cron": "* * * * *"}) == expected["both"]
            assert await refused_with({**x, "every": ""}) == expected["none"]
            assert await refused_with({**x, "every": None, "cron": "0 * * * *", "tz": "Mars/Base"}) == expected["tz"]
            assert await refused_with({**x, "tz": "UTC"}) == expected["tz-every"]
            assert await refused_with({**x, "queue": "no queue"}) == expected["queue"]
            assert await refused_with({**x, "args": "[1]"}) == expected["arity"]
            assert await refused_with({**x, "name": "w.hourly"}) == expected["code"]
            assert await refused_with({**x, "name": "bad name"}) == expected["name"]
            assert await refused_with({**x, "every": 1.5}) == expected["fraction"]
            assert await refused_with({**x, "args": "[1, "}) == cli_json_error("[1, ", "args", list)
            assert await refused_with({**x, "kwargs": "[1]"}) == cli_json_error("[1]", "kwargs", dict)
            assert await refused_with({**x, "args": {"a": 1}}) == cli_json_error('{"a": 1}', "args", list)
            assert await refused_with({**x, "every": "soon"}) == "every must be a number of seconds, got 'soon'"
            assert await refused_with({**x, "when": "5"}) == ("unknown field(s) when: an entry has name, task, "
                                                              "every, cron, args, kwargs, queue, tz")
            assert await refused_with({**x, "task": 7}) == "task must be a text, got int"
            not_json = await http.post("/api/schedules", content=b"name=x", headers=csrf)
            assert not_json.status_code == 400 and not_json.json()["error"].startswith("the request body must be JSON")
            huge = await http.post("/api/schedules", content=b" " * (300 * 1024) + b"{}", headers=csrf)
            assert huge.status_code == 413
            assert [i.name for i in await app.beat.alist()] == ["w.hourly"]

            # A good entry is stored through app.beat, listed, and fired by the running beat.
            added = await http.post("/api/schedules", json=good, headers=csrf)
            assert added.status_code == 200, added.text
            assert added.json() == {"added": "w.every", "task": "w.add", "schedule": "every 1s"}
            stored = {i.name: i for i in await asyncio.to_thread(app.beat.list)}["w.every"]  # the sync twin
            assert (stored.source, stored.task, stored.args, stored.kwargs, stored.enabled) == \
                ("stored", "w.add", (1, 2), {}, True)
            await ticks.first("w.every")
            listed = (await http.get("/api/schedules", headers=auth)).json()
            rows = {e["name"]: e for e in listed["entries"]}
            assert listed["tasks"] == ["w.add", "w.boom"] and listed["bucket"] == "natask_schedules_web"
            assert (rows["w.hourly"]["source"], rows["w.hourly"]["editable"]) == ("code", False)
            assert (rows["w.every"]["source"], rows["w.every"]["editable"]) == ("stored", True)
            assert rows["w.every"]["args"] == "(1, 2)" and rows["w.every"]["schedule"] == "every 1s"

            async def recorded() -> bool:  # the beat records each entry's last tick after sending it
                entries = (await http.get("/api/schedules", headers=auth)).json()["entries"]
                return any(e["name"] == "w.every" and e["last_id"] for e in entries)

            await until(recorded, "the tick recorded and shown")
            assert (await http.get("/api/schedules", headers=auth)).json()["leader"] == beat.id

            # Disable, enable, remove: app.beat's state follows; its mistakes come back as 400s.
            assert (await http.post("/api/schedules/w.every/disable", headers=csrf)).json() == {"disabled": "w.every"}
            assert [i.enabled for i in await app.beat.alist() if i.name == "w.every"] == [False]
            assert (await http.post("/api/schedules/w.every/enable", headers=csrf)).json() == {"enabled": "w.every"}
            assert [i.enabled for i in await app.beat.alist() if i.name == "w.every"] == [True]
            with pytest.raises(ConfigError) as code_entry:
                await app.beat.aremove("w.hourly")
            kept = await http.delete("/api/schedules/w.hourly", headers=csrf)
            assert kept.status_code == 400 and kept.json()["error"] == str(code_entry.value)
            assert (await http.delete("/api/schedules/w.every", headers=csrf)).json() == {"removed": "w.every"}
            assert [i.name for i in await app.beat.alist()] == ["w.hourly"]
            unknown = await http.delete("/api/schedules/w.evry", headers=csrf)
            assert unknown.status_code == 400 and "no stored periodic entry named 'w.evry'" in unknown.json()["error"]
            odd = await http.post("/api/schedules/a%20b/disable", headers=csrf)
            assert odd.status_code == 400 and odd.json()["error"].startswith("invalid periodic entry name 'a b'")

            # A value beats skip (written by anyone who may write the bucket) is shown with why, removable.
            await (await open_bucket(app)).put("w.broken", b"junk")
            [broken] = [e for e in (await http.get("/api/schedules", headers=auth)).json()["entries"]
                        if e["name"] == "w.broken"]
            assert broken["error"].startswith("not a stored entry") and broken["enabled"] is False
            assert broken["editable"] is True and broken["args"] == ""
            assert (await http.delete("/api/schedules/w.broken", headers=csrf)).json() == {"removed": "w.broken"}
            assert [i.name for i in await app.beat.alist()] == ["w.hourly"]
    finally:
        await beat.stop()
        await nc.close()


async def test_broker_api_gives_sizes_and_limits_of_streams_consumers_and_buckets(app: Natask) -> None:
    history = History(max_age=3600, max_bytes=8 * 1024 * 1024)
    async with Dashboard(app, port=0, history=history) as dash, worker(app), \
            httpx.AsyncClient(base_url=dash.url, timeout=10) as http:
        assert await (await app.asend_task("w.add", [1, 2])).aget(timeout=10) == 3
        broker = (await http.get("/api/broker")).json()
        streams = {s["name"]: s for s in broker["streams"]}
        events = streams["NATASK_EVENTS_WEB"]
        assert (events["max_age"], events["max_bytes"], events["max_msgs"]) == (3600, 8 * 1024 * 1024, -1)
        assert (events["replicas"], events["storage"], events["discard"], events["role"]) == \
            (1, "file", "old", "dashboard history")
        tasks = streams["NATASK_WEB"]
        assert tasks["consumers"] == 1 and tasks["role"] == "tasks" and tasks["bytes"] >= 0
        [consumer] = [c for c in broker["consumers"] if c["stream"] == "NATASK_WEB"]
        assert consumer["name"] == "default" and consumer["delivered"] >= 1
        assert {"pending", "ack_pending", "redelivered", "waiting"} <= set(consumer)
        results = {b["name"]: b for b in broker["buckets"]}["natask_results_web"]
        assert results["values"] >= 1 and results["bytes"] > 0 and results["ttl"] == app.config.result_ttl
        assert results["history"] == 1 and results["role"] == "results"
        assert "natask_schedules_web" not in {b["name"] for b in broker["buckets"]}  # none created by reading


@pytest.mark.timeout(180)
@needs_chromium
async def test_schedules_edited_and_broker_sizes_shown_in_chromium(app: Natask, tmp_path: Path) -> None:
    app.add_periodic_task(timedelta(hours=1), app.tasks["w.add"].s(1, 1), name="w.hourly")
    async with Dashboard(app, port=0, basic_auth=[f"{USER}:{PASSWORD}"]) as dash, \
            Browser(tmp_path / "chromium") as browser:
        page = await browser.open(dash.url + "#/schedules", headers={"Authorization": BASIC})
        await page.wait_for("document.body?.dataset.shown === '#/schedules'", "the schedules page")
        code = "document.querySelector('#schedules tr[data-entry=\"w.hourly\"]')"
        assert await page.evaluate(f"{code}.cells[1].textContent") == "code"
        # A code entry: switched off and on at run time, never removed.
        assert await page.evaluate(f"[...{code}.querySelectorAll('button')].map((b) => b.textContent)") == ["Disable"]
        await page.evaluate(f"{code}.querySelector('button.disable').click()")
        await page.wait_for(f"{code}?.querySelector('button.enable') !== null", "the code entry disabled")
        assert [i.enabled for i in await app.beat.alist() if i.name == "w.hourly"] == [False]
        await page.evaluate(f"{code}.querySelector('button.enable').click()")
        await page.wait_for(f"{code}?.querySelector('button.disable') !== null", "the code entry enabled again")
        assert await page.evaluate("[...document.querySelectorAll('#entry-form [name=task] option')]"
                                   ".map((o) => o.value)") == ["w.add", "w.boom"]

        async def submit(**fields: str) -> None:
            script = "".join(f"$('entry-form').elements[{k!r}].value = {v!r};" for k, v in fields.items())
            await page.evaluate(script + "$('entry-form').elements.kind.dispatchEvent(new Event('change'));"
                                "$('entry-form').querySelector('button[type=submit]').click(); true")

        # A mistake: the page shows app.beat's own words, and nothing is stored.
        expected = await beat_error(app, "w.browser", "w.add", cron="61 * * * *", args=[1, 2])
        await submit(name="w.browser", task="w.add", kind="cron", when="61 * * * *", args="[1, 2]")
        await page.wait_for(f"document.getElementById('entry-error').textContent === {expected!r}", "the error")
        assert [i.name for i in await app.beat.alist()] == ["w.hourly"]

        row = "document.querySelector('#schedules tr[data-entry=\"w.browser\"]')"
        await submit(name="w.browser", task="w.add", kind="every", when="30", args="[1, 2]", tz="")
        await page.wait_for(f"!!{row}", "the new entry listed")
        assert await page.evaluate("document.getElementById('entry-error').textContent") == ""
        assert await page.evaluate(f"[...{row}.cells].slice(1, 7).map((c) => c.textContent)") == \
            ["stored", "w.add", "every 30s", "(1, 2)", "", "enabled"]
        [stored] = [i for i in await app.beat.alist() if i.name == "w.browser"]
        assert (stored.source, stored.args, stored.schedule, stored.enabled) == ("stored", (1, 2), "every 30s", True)

        await page.evaluate(f"{row}.querySelector('button.disable').click(); true")
        await page.wait_for(f"{row}?.cells[6].textContent === 'disabled' && !!{row}.querySelector('button.enable')",
                            "the entry disabled")
        assert [i.enabled for i in await app.beat.alist() if i.name == "w.browser"] == [False]

        await page.evaluate(f"window.confirm = () => true; {row}.querySelector('button.remove').click(); true")
        await page.wait_for(f"!{row}", "the entry gone")
        assert [i.name for i in await app.beat.alist()] == ["w.hourly"]

        # The broker page: a stream's limits, readable with exact numbers in titles, and a bucket.
        await page.evaluate("location.hash = '#/broker'")
        await page.wait_for("document.body.dataset.shown === '#/broker'", "the broker page")
        events = "document.querySelector('#streams tr[data-stream=\"NATASK_EVENTS_WEB\"]')"
        cells = await page.evaluate(f"[...{events}.cells].map((c) => [c.textContent, c.title])")
        assert [c[0] for c in cells[5:]] == ["unlimited", "1.0 GiB", "7 days", "1", "file", "drop oldest"], cells
        assert cells[6][1] == "1,073,741,824 bytes" and cells[7][1] == "604,800 seconds"
        bucket = "document.querySelector('#buckets tr[data-bucket=\"natask_schedules_web\"]')"
        cells = await page.evaluate(f"[...{bucket}.cells].map((c) => c.textContent)")
        assert cells[:2] == ["natask_schedules_web", "stored schedules"] and cells[4:7] == ["1", "unlimited",
                                                                                           "unlimited"], cells
        assert browser.errors == []
