"""Sending a workflow (its first messages, with reply routes for its results) and ``GroupResult``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ResultError, ResultTimeout
from ..message import Call, dumps, loads
from ..naming import HDR_REPLY, check_task_id
from ..portal import Portal, blocking
from ..result import AsyncResult
from ..states import FINAL_STATES, State
from .plan import Node, expand, leaves

if TYPE_CHECKING:
    from ..broker import Broker
    from ..client import App, Client


# -- sending ------------------------------------------------------------------------------------
async def launch(app: App, node: Node, args: Sequence[Any] = (),
                 kwargs: Mapping[str, Any] | None = None) -> AsyncResult[Any] | GroupResult:
    """Register reply routes for the result tasks of the frozen workflow ``node``, then publish its
    first messages."""
    client = app.client
    steps = expand(node, tuple(args), kwargs)
    for step in steps:
        task = app.tasks.get(step.sig["task"])
        if task is not None:
            task.check_args(step.args, step.kwargs)
    handles: dict[str, AsyncResult[Any]] = {}
    if not steps:
        return result_of(app, node, handles)
    first = {step.sig["id"] for step in steps}
    later = [leaf for leaf in leaves(node) if leaf["id"] not in first]
    if later:
        broker = await client.broker()
        for leaf in later:
            # Its message is published later by a worker: carry our reply inbox along with it.
            handles[leaf["id"]] = _register(client, broker, leaf)
    calls = []
    for step in steps:
        sig = step.sig
        calls.append(client.prepare(sig["task"], step.args, step.kwargs, task_id=sig["id"], links=sig.get("link"),
                                     meta=step.meta, **sig["options"]))
    if len(calls) == 1:
        published = [await client.publish(calls[0])]
    else:
        published = await client.publish_many(calls)
    for result in published:
        handles.setdefault(result.id, result)
    return result_of(app, node, handles)


def _register(client: Client[Any], broker: Broker, leaf: Node) -> AsyncResult[Any]:
    opts = leaf["options"]
    call = Call(leaf["id"], leaf["task"], opts["queue"], b"", {}, None, bool(opts.get("ignore_result")))
    result, _ = client.route(broker, call)
    reply = call.headers.get(HDR_REPLY)
    if reply:
        leaf["reply"] = reply
    return result  # type: ignore[no-any-return]


def result_of(app: App, node: Node, handles: Mapping[str, AsyncResult[Any]]) -> AsyncResult[Any] | GroupResult:
    """The result handle of a frozen node (a chain's is its last step's, a chord's its body's)."""
    kind = node.get("kind")
    if kind is None:
        return handles.get(node["id"]) or AsyncResult(app, node["id"], node["task"])
    if kind == "chain":
        return result_of(app, node["tasks"][-1], handles)
    if kind == "group":
        return GroupResult(app, node["id"], [result_of(app, t, handles) for t in node["tasks"]])
    return result_of(app, node["body"], handles)


# -- results ------------------------------------------------------------------------------------
class ResultSet:
    """Result handles waited for together, in order (Celery's ``ResultSet``); ``GroupResult`` is one
    with an id."""

    def __init__(self, results: Sequence[AsyncResult[Any] | ResultSet], app: App | None = None) -> None:
        self.results: list[AsyncResult[Any] | ResultSet] = list(results)
        if app is None:
            if not self.results:
                raise ValueError("an empty ResultSet needs its app: ResultSet([], app=app)")
            app = self.results[0].app
        self.app: App = app

    @property
    def _portal(self) -> Portal:
        return self.app.client.portal

    def __repr__(self) -> str:
        return f"<ResultSet [{len(self.results)} results]>"

    def add(self, result: AsyncResult[Any] | ResultSet) -> None:
        """Add a member (unless it is one already)."""
        if result not in self.results:
            self.results.append(result)

    def remove(self, result: AsyncResult[Any] | ResultSet) -> None:
        """Remove a member (``KeyError`` if it is none)."""
        if result not in self.results:
            raise KeyError(result)
        self.results.remove(result)

    def discard(self, result: AsyncResult[Any] | ResultSet) -> None:
        """Remove a member if it is one."""
        if result in self.results:
            self.results.remove(result)

    def update(self, results: Sequence[AsyncResult[Any] | ResultSet]) -> None:
        """Add several members."""
        for r in results:
            self.add(r)

    def clear(self) -> None:
        """Remove every member."""
        self.results.clear()

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[AsyncResult[Any] | ResultSet]:
        return iter(self.results)

    def __getitem__(self, index: int) -> AsyncResult[Any] | ResultSet:
        return self.results[index]

    async def aget(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        """Async ``get``."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        values = []
        for result in self.results:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                values.append(await result.aget(timeout=remaining, propagate=propagate))
            except ResultTimeout:
                what = f"group {self.id}" if isinstance(self, GroupResult) else "result set"
                raise ResultTimeout(f"{what}: {len(values)} of {len(self.results)} results "
                                    f"arrived within {timeout:g}s") from None
        return values

    async def ajoin(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        """Async ``join``."""
        return await self.aget(timeout, propagate)

    get = blocking(aget, "Every member's result in order; the first failure (in order) raises unless ``propagate``\n"
                         "is false, then failures stand in the list as ``TaskFailed``/``TaskRevoked``. ``timeout``\n"
                         "bounds the whole wait (``ResultTimeout``).")

    join = blocking(ajoin, "Alias of ``get`` (Celery's name).")

    def _flat(self) -> list[AsyncResult[Any]]:
        out: list[AsyncResult[Any]] = []
        for r in self.results:
            out.extend(r._flat() if isinstance(r, ResultSet) else [r])
        return out

    async def _states(self) -> list[str]:
        flat = self._flat()
        pending = [r for r in flat if not r._final]
        if pending:
            await asyncio.gather(*(r._fetch() for r in pending))
        return [str(r._record["state"]) if r._record else State.PENDING.value for r in flat]

    async def acompleted_count(self) -> int:
        """Async ``completed_count``."""
        return sum(state == State.SUCCESS for state in await self._states())

    completed_count = blocking(acompleted_count, "How many member tasks succeeded.")

    async def aready(self) -> bool:
        """Async ``ready``."""
        return all(state in FINAL_STATES for state in await self._states())

    ready = blocking(aready, "True once every member succeeded, failed or was revoked.")

    async def asuccessful(self) -> bool:
        """Async ``successful``."""
        return all(state == State.SUCCESS for state in await self._states())

    successful = blocking(asuccessful, "True once every member succeeded.")

    async def afailed(self) -> bool:
        """Async ``failed``."""
        return any(state == State.FAILURE for state in await self._states())

    failed = blocking(afailed, "True if any member failed.")

    def waiting(self) -> bool:
        """True while some member has not finished."""
        return not self.ready()

    async def arevoke(self, terminate: bool = False) -> None:
        """Async ``revoke``."""
        await asyncio.gather(*(r.arevoke(terminate) for r in self._flat()))

    revoke = blocking(arevoke, "Revoke every member (``terminate`` cancels running async ones).")

    async def aforget(self) -> None:
        """Async ``forget``."""
        await asyncio.gather(*(r.aforget() for r in self._flat()))

    forget = blocking(aforget, "Delete every member's stored result.")


class GroupResult(ResultSet):
    """The results of a group's members, in order (a member that is a chain counts with its last
    step's result; nested groups are unrolled, as in Celery)."""

    def __init__(self, app: App, group_id: str, results: Sequence[AsyncResult[Any] | ResultSet]) -> None:
        check_task_id(group_id)
        super().__init__(results, app)
        self.id = group_id

    def __repr__(self) -> str:
        return f"<GroupResult {self.id} [{len(self.results)} results]>"

    # -- saving -----------------------------------------------------------------------------
    def _ids(self) -> list[Any]:
        return [r._ids() if isinstance(r, GroupResult) else r.id for r in self.results
                if isinstance(r, (GroupResult, AsyncResult))]

    async def asave(self) -> None:
        """Async ``save``."""
        broker = await self.app.client.broker()
        kv = await broker._bucket(self.app.names.groups_bucket)
        await kv.put(self.id, dumps({"id": self.id, "results": self._ids()}))

    save = blocking(asave, "Store the member ids under the group's id (for ``result_ttl``), so any process can\n"
                           "rebuild this handle with ``app.GroupResult(id)`` / ``GroupResult.restore``.")

    @classmethod
    async def arestore(cls, app: App, group_id: str) -> GroupResult:
        """Async ``restore``."""
        check_task_id(group_id)
        broker = await app.client.broker()
        kv = await broker._bucket(app.names.groups_bucket)
        entry = await kv.get(group_id)
        if entry is None or not entry.value:
            raise ResultError(f"no saved group {group_id}: call GroupResult.save() first (saved groups are kept "
                              "result_ttl)")
        return _rebuild(app, group_id, loads(entry.value)["results"])

    @classmethod
    def restore(cls, app: App, group_id: str) -> GroupResult:
        """The ``GroupResult`` that ``save()`` stored under ``group_id``; ``ResultError`` if none is."""
        return app.client.portal.run(cls.arestore(app, group_id))

    async def adelete(self) -> None:
        """Async ``delete``."""
        broker = await self.app.client.broker()
        kv = await broker._bucket(self.app.names.groups_bucket)
        await kv.purge(self.id)

    delete = blocking(adelete, "Remove the saved group (its members' results stay).")


def _rebuild(app: App, group_id: str, ids: list[Any]) -> GroupResult:
    results: list[AsyncResult[Any] | ResultSet] = []
    for item in ids:
        if isinstance(item, list):
            results.append(_rebuild(app, group_id, item))
        else:
            results.append(AsyncResult(app, item))
    return GroupResult(app, group_id, results)
