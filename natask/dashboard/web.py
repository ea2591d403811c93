"""The dashboard's web side, a Starlette ASGI app: the page and its static files, a JSON API, a
Server-Sent Events stream of changes; auth, Host checks and CSRF defence in front of all of it.
Every URL the page uses is relative, so the app works mounted under any prefix."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..beat.schedule import schedule_text
from ..dlq import DeadLetterNotFound
from ..errors import ConfigError, NataskError, TaskNotFound
from ..naming import TASK_ID_RE, check_kv_key
from . import schedules
from .auth import TOKEN_COOKIE, Auth, HostCheck
from .feed import Feed, History
from .model import MAX_PAGE, Model, Query
from .previews import DETAIL_CHARS, redact

if TYPE_CHECKING:
    from ..app import Natask

log = logging.getLogger("natask.dashboard")

KEEPALIVE: Final = 15.0
"""Seconds between comment lines on an idle event stream (proxies close silent connections)."""
COALESCE: Final = 0.2
"""Seconds an event stream waits after a change, so a burst of changes goes as one message."""
CSRF_HEADER: Final = "x-natask-dashboard"
"""Header every state-changing call must carry: a cross-site form or fetch cannot send it without a
CORS preflight, which the dashboard never allows."""
HEALTH_PATH: Final = "/healthz"
"""The probe endpoint: answered without auth or Host check, it says only ok or not and whether NATS is
connected (200 / 503)."""
STATIC: Final = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
_DONE: Final = {"remove": "removed", "enable": "enabled", "disable": "disabled"}
_SECURITY_HEADERS: Final = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
                            (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]


def dumps(value: Any) -> bytes:
    """JSON for the page; NaN and infinities become null (JSON.parse would refuse the message)."""
    try:
        return json.dumps(value, default=str, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        return json.dumps(_finite(value), default=str, separators=(",", ":")).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json(value: Any, status: int = 200) -> Response:
    return Response(dumps(value), status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


class _Guard:
    """In front of every route: Host check (DNS rebinding), auth (401), the feed started on first
    use (a mounted app gets no lifespan of its own), security headers on every answer."""

    def __init__(self, inner: ASGIApp, feed: Feed, auth: Auth, hosts: HostCheck) -> None:
        self.inner, self.feed, self.auth, self.hosts = inner, feed, auth, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_SECURITY_HEADERS]}
            await send(message)

        if _route_path(scope) == HEALTH_PATH:
            # Probes (kubelet, Docker) send the pod's address as Host and no credentials; the answer
            # reveals nothing else.
            await (await self._health(scope["method"]))(scope, receive, secured)
            return
        if not self.hosts.allows(headers.get("host", "")):
            await Response("unknown Host header\n", 403, media_type="text/plain")(scope, receive, secured)
            return
        cookies = _cookies(headers.get("cookie", ""))
        token = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        if token and self.auth.token_matches(token):
            # A browser cannot send a bearer token on its own (EventSource has no headers): keep it
            # in a cookie for this path, then drop it from the address bar (and from history).
            root = scope.get("root_path", "") + "/"
            response: Response = RedirectResponse(root, 303)
            response.set_cookie(TOKEN_COOKIE, token, path=root, httponly=True, samesite="strict",
                                secure=scope.get("scheme") == "https")
            await response(scope, receive, secured)
            return
        if self.auth.user(headers, cookies) is None:
            await Response("authentication required\n", 401, self.auth.challenge(),
                           media_type="text/plain")(scope, receive, secured)
            return
        if not self.feed.started:
            try:
                await self.feed.start()
            except Exception as e:
                log.warning("dashboard: cannot start: %s", e)
                await _error(503, f"cannot read from NATS: {e}")(scope, receive, secured)
                return
        await self.inner(scope, receive, secured)


    async def _health(self, method: str) -> Response:
        if method not in ("GET", "HEAD"):
            return Response("GET only\n", 405, {"allow": "GET, HEAD"}, media_type="text/plain")
        if not self.feed.started:  # mounted and not asked yet: connect as the first page would
            with contextlib.suppress(Exception):
                await self.feed.start()
        broker = self.feed.app.client.connected(asyncio.get_running_loop())
        connected = broker is not None and not broker.closed and broker.nc.is_connected
        ok = connected and self.feed.started and not self.feed.closing
        return _json({"ok": ok, "nats_connected": connected}, 200 if ok else 503)


def _route_path(scope: Scope) -> str:
    """The path below the mount point (Starlette keeps the full path and sets ``root_path``)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):]
    return path


def _cookies(value: str) -> dict[str, str]:
    out = {}
    for part in value.split(";"):
        name, _, v = part.strip().partition("=")
        if name:
            out[name] = v
    return out


def _csrf_ok(request: Request) -> bool:
    origin = request.headers.get("origin", "")
    if request.headers.get(CSRF_HEADER) != "1":
        return False
    return not origin or origin.partition("://")[2] == request.headers.get("host")


class Web:
    """The routes, over one ``Model`` and its ``Feed``."""

    def __init__(self, app: Natask, model: Model, feed: Feed) -> None:
        self.app, self.model, self.feed = app, model, feed
        files = resources.files("natask.dashboard").joinpath("static")
        self.page = files.joinpath("index.html").read_bytes()
        self.static = {name: files.joinpath(name).read_bytes() for name in STATIC}

    def routes(self) -> list[Route]:
        return [
            Route("/", self.index),
            Route("/static/{name}", self.file),
            Route("/favicon.ico", lambda _: Response(b"", 204)),
            Route("/api/state", self.state),
            Route("/api/events", self.events),
            Route("/api/tasks", self.tasks),
            Route("/api/tasks/{task_id}", self.task),
            Route("/api/tasks/{task_id}/revoke", self.revoke, methods=["POST"]),
            Route("/api/tasks/{task_id}/terminate", self.revoke, methods=["POST"]),
            Route("/api/dlq/{entry_id:path}/replay", self.replay, methods=["POST"]),
            Route("/api/workers", self.workers),
            Route("/api/broker", self.broker),
            Route("/api/charts", self.charts),
            Route("/api/schedules", self.schedules, methods=["GET", "POST"]),
            Route("/api/schedules/{name}", self.remove_schedule, methods=["DELETE"]),
            Route("/api/schedules/{name}/enable", self.toggle_schedule, methods=["POST"]),
            Route("/api/schedules/{name}/disable", self.toggle_schedule, methods=["POST"]),
        ]

    async def index(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8")

    async def file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.static:
            return Response(b"not found\n", 404, media_type="text/plain")
        return Response(self.static[name], media_type=STATIC[name])

    def summary(self) -> dict[str, Any]:
        return self.model.summary(self.app.name, self.app.config.subject_prefix)

    def snapshot(self) -> dict[str, Any]:
        return {"version": self.model.version, "now": time.time(), "full": True, "tasks": self.model.recent(),
                "summary": self.summary()}

    async def state(self, request: Request) -> Response:
        """The whole picture (the first event of a stream too)."""
        return _json(self.snapshot())

    async def events(self, request: Request) -> Response:
        return StreamingResponse(self._stream(), media_type="text/event-stream",
                                 headers={"X-Accel-Buffering": "no"})

    async def _stream(self) -> AsyncIterator[bytes]:
        """The full state first, then the rows changed since, coalesced; ends when the dashboard stops."""
        changed = asyncio.Event()
        self.feed.listeners.add(changed)
        try:
            message = self.snapshot()
            last, last_summary = message["version"], dumps(message["summary"])
            yield b"data: " + dumps(message) + b"\n\n"
            while not self.feed.closing:
                try:
                    await asyncio.wait_for(changed.wait(), KEEPALIVE)
                except asyncio.TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if self.feed.closing:
                    break
                await asyncio.sleep(COALESCE)
                changed.clear()
                tasks = self.model.changes(last)
                update: dict[str, Any] = {"version": self.model.version, "now": time.time(), "full": False,
                                          "tasks": tasks}
                last = self.model.version
                summary = self.summary()
                blob = dumps(summary)
                if blob != last_summary:
                    update["summary"], last_summary = summary, blob
                if tasks or "summary" in update:
                    yield b"data: " + dumps(update) + b"\n\n"
        finally:
            self.feed.listeners.discard(changed)

    async def tasks(self, request: Request) -> Response:
        """Search: ``q`` (id, name, arguments, worker, error), ``name``, ``state``, ``worker``,
        ``queue``, ``since``/``until`` (unix seconds), ``offset``, ``limit``."""
        p = request.query_params
        try:
            query = Query(text=p.get("q", "")[:200].strip(), name=p.get("name", "").strip(),
                          state=p.get("state", "").strip(), worker=p.get("worker", "").strip(),
                          queue=p.get("queue", "").strip(), since=_float(p.get("since")), until=_float(p.get("until")),
                          offset=int(p.get("offset") or 0), limit=min(MAX_PAGE, int(p.get("limit") or 50)))
        except ValueError as e:
            return _error(400, f"bad search parameter: {e}")
        rows, total = self.model.search(query)
        return _json({"tasks": rows, "total": total, "offset": query.offset, "limit": query.limit,
                      "indexed": len(self.model.rows), "limit_of_index": self.model.limit,
                      "history_from": self.model.history_from})

    async def task(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        if not TASK_ID_RE.match(task_id):
            return _error(400, "not a task id")
        row = self.model.task(task_id)
        try:
            record = await self.feed.result_record(task_id)
        except NataskError as e:
            record, error = None, str(e)
        else:
            error = ""
        if row is None and record is None:
            return _error(404, f"task {task_id} is neither in the dashboard's history nor in the results bucket")
        out: dict[str, Any] = row.as_dict() if row else {"id": task_id, "name": str(record.get("task") or "?")
                                                         if record else "?", "state": ""}
        timeline = row.timeline if row else []
        out["timeline"] = [{"ts": ts, "what": what, "detail": detail} for ts, what, detail in timeline]
        out["read_error"] = error
        if record is not None:
            out["state"] = out.get("state") or str(record.get("state", ""))
            if "result" in record:
                out["result"] = repr(redact(record["result"]))[:DETAIL_CHARS]
            for key in ("exc_type", "message", "traceback"):
                if isinstance(record.get(key), str):
                    out[key] = record[key][:20_000 if key == "traceback" else DETAIL_CHARS]
        out["children"] = self.model.children(task_id)
        root = (row.root_id if row else "") or ""
        out["workflow"] = self.model.workflow(root) if root else []
        return _json(out)

    async def revoke(self, request: Request) -> Response:
        if not _csrf_ok(request):
            return _error(403, "cross-origin request refused")
        task_id = request.path_params["task_id"]
        terminate = request.url.path.endswith("/terminate")
        try:
            await self.feed.revoke(task_id, terminate)
        except NataskError as e:
            return _error(400, str(e))
        return _json({"revoked": task_id, "terminate": terminate})

    async def replay(self, request: Request) -> Response:
        if not _csrf_ok(request):
            return _error(403, "cross-origin request refused")
        entry_id = request.path_params["entry_id"]
        try:
            entry = await self.feed.replay(entry_id)
        except DeadLetterNotFound as e:
            return _error(404, str(e))
        except NataskError as e:
            return _error(409, str(e))
        except Exception as e:  # an answer, not a closed connection: the page shows it
            log.exception("dashboard: replay of %r failed", entry_id[:100])
            return _error(500, f"replay failed: {type(e).__name__}")
        return _json({"replayed": entry.id, "subject": entry.subject})

    async def workers(self, request: Request) -> Response:
        try:
            active, registered = await asyncio.gather(self.feed.active(), self.feed.registered())
        except NataskError as e:
            active, registered, error = [], [], str(e)
        else:
            error = ""
        by_worker = {str(a.get("worker")): a.get("active") for a in active}
        names = {str(r.get("worker")): r.get("registered") for r in registered}
        rows = self.model.worker_rows()
        for row in rows:
            tasks = by_worker.get(str(row.get("worker")))
            row["active"] = [redact(t) for t in tasks[:100]] if isinstance(tasks, list) else []
            listed = names.get(str(row.get("worker")))
            items = listed.get("items") if isinstance(listed, dict) else None
            row["registered"] = [str(n)[:200] for n in items[:1000]] if isinstance(items, list) else []
        return _json({"workers": rows, "error": error})

    async def broker(self, request: Request) -> Response:
        try:
            return _json(await self.feed.broker_info())
        except NataskError as e:
            return _error(503, str(e))

    async def charts(self, request: Request) -> Response:
        p = request.query_params
        try:
            minutes = max(5, min(120, int(p.get("minutes") or 60)))
        except ValueError:
            return _error(400, "minutes must be a number")
        series = self.model.series
        return _json({"points": series.points(p.get("task", ""), p.get("queue", ""), minutes=minutes),
                      **series.keys()})

    async def schedules(self, request: Request) -> Response:
        """GET: every periodic entry; POST: store one (``natask beat add``, the same checks)."""
        if request.method == "POST":
            return await self._edit(request, "add", "")
        try:
            return _json(await schedules.read(self.app))
        except NataskError as e:
            return _error(503, str(e))

    async def remove_schedule(self, request: Request) -> Response:
        return await self._edit(request, "remove", request.path_params["name"])

    async def toggle_schedule(self, request: Request) -> Response:
        verb = request.url.path.rsplit("/", 1)[-1]
        return await self._edit(request, verb, request.path_params["name"])

    async def _edit(self, request: Request, verb: str, name: str) -> Response:
        """A change of the stored entries through ``app.beat``: a mistake is a 400 with
        ``natask beat``'s message, which the page shows."""
        if not _csrf_ok(request):
            return _error(403, "cross-origin request refused")
        beat = self.app.beat
        try:
            if verb == "add":
                added = await schedules.add(self.app, await _json_body(request, schedules.MAX_BODY))
                return _json({"added": added.name, "task": added.signature.task,
                              "schedule": schedule_text(added)})
            check_kv_key(name, "periodic entry name")
            await {"remove": beat.aremove, "enable": beat.aenable, "disable": beat.adisable}[verb](name)
        except _BadBody as e:
            return _error(e.status, str(e))
        except (ConfigError, TaskNotFound) as e:
            return _error(400, str(e))
        except NataskError as e:
            return _error(503, str(e))
        return _json({_DONE[verb]: name})


class _BadBody(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _json_body(request: Request, limit: int) -> Any:
    """The request's JSON body; reading stops once it exceeds ``limit`` bytes (413)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _BadBody(413, f"request body over {limit} bytes")
    try:
        return json.loads(body)
    except ValueError as e:
        raise _BadBody(400, f"the request body must be JSON: {e}") from None


def _float(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


class DashboardApp:
    """The ASGI app ``asgi_app`` returns: call it, mount it; ``start``/``stop`` (or a lifespan, when
    served on its own) run the feed. Mounted in another app, the feed starts on the first request."""

    def __init__(self, app: Natask, *, basic_auth: Iterable[str | tuple[str, str]] = (),
                 auth_token: str | None = None, auth_header: str | None = None, history: History | None = None,
                 history_limit: int | None = None, refresh: float | None = None, hosts: HostCheck | None = None,
                 ) -> None:
        from .feed import REFRESH
        from .model import DEFAULT_HISTORY_LIMIT

        self.app = app
        self.auth = Auth.of(basic_auth, auth_token, auth_header)
        self.model = Model(history_limit or DEFAULT_HISTORY_LIMIT)
        self.feed = Feed(app, self.model, refresh or REFRESH, history)
        self.web = Web(app, self.model, self.feed)
        self.hosts = hosts or HostCheck()

        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            await self.start()
            try:
                yield
            finally:
                await self.stop()

        self.starlette = Starlette(routes=self.web.routes(), lifespan=lifespan)
        self._guarded = _Guard(self.starlette, self.feed, self.auth, self.hosts)

    def __repr__(self) -> str:
        return f"DashboardApp({self.app.name!r}, auth={self.auth!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.starlette(scope, receive, send)
        else:
            await self._guarded(scope, receive, send)

    async def start(self) -> None:
        await self.feed.start()

    async def stop(self) -> None:
        await self.feed.stop()


__all__ = ["DashboardApp", "Web", "dumps"]
