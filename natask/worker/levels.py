"""Priority levels a worker fetches: the consumers of its queues' levels 1..9 found at start, and
those producers create later (the server's consumer-created advisory says so)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from ..broker import Broker, Message
from ..broker.fetch import Fetcher
from ..errors import PermissionDenied

log = logging.getLogger("natask.worker")


class Levels:
    """Adds each priority level of the worker's queues to its fetcher, once it has a consumer.
    A queue nobody sent a priority to has none: it costs nothing."""

    def __init__(self, broker: Broker, fetcher: Fetcher, queues: Sequence[str]) -> None:
        self.broker = broker
        self.fetcher = fetcher
        self.queues = set(queues)
        """The worker's queues (``add_consumer``/``cancel_consumer`` change them)."""
        self._live = False  # between start and stop: advisories are acted on
        self._sub: Any = None
        self._subs: dict[str, Any] = {}  # with stream_per_queue: queue -> its stream's advisory subscription
        self._known: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Fetch the levels that exist, and watch for new ones (subscribed first: none is missed)."""
        broker = self.broker
        self._live = True
        if broker.per_queue:  # each queue's stream has its own advisories
            for queue in sorted(self.queues):
                await self._follow(queue)
        else:
            await self._advisories(broker.names.consumer_created)
        for queue, priority in await broker.levels(sorted(self.queues)):
            await self.add(queue, priority)

    async def _advisories(self, subject: str, queue: str | None = None) -> None:
        broker = self.broker
        try:
            sub = await broker.subscribe(subject, cb=self._created)
        except PermissionDenied as e:
            log.warning("%s: priority levels producers create after this worker started are fetched once it "
                        "restarts", e)
            return
        if queue is None:
            self._sub = sub
        else:
            self._subs[queue] = sub

    async def _follow(self, queue: str) -> None:
        """Watch the consumer-created advisories of ``queue``'s own stream (``stream_per_queue``)."""
        if queue not in self._subs:
            await self._advisories(self.broker.names.consumers_created(self.broker.stream_of(queue)), queue)

    async def add(self, queue: str, priority: int) -> None:
        """Fetch one level: its consumer gets this worker's settings (as the queue's does)."""
        level = (queue, priority)
        if level in self._known:
            return  # creating it again (ours or another worker's update) announces it again
        self._known.add(level)  # before the first await: an advisory may announce it meanwhile
        try:
            await self.broker.ensure_consumer(queue, priority)
            await self.fetcher.add(self.broker, queue, priority)
        except BaseException:
            self._known.discard(level)
            raise
        log.info("fetching priority %d of queue %s", priority, queue)

    async def watch(self, queue: str) -> None:
        """A queue the worker consumes from now on: fetch its levels that exist and any created later."""
        self.queues.add(queue)
        if self.broker.per_queue:
            await self._follow(queue)
        for level in await self.broker.levels([queue]):
            await self.add(*level)

    def forget(self, queue: str) -> None:
        """A queue the worker no longer consumes (the fetcher drops its levels itself)."""
        self.queues.discard(queue)
        self._known = {level for level in self._known if level[0] != queue}

    async def _created(self, msg: Message) -> None:
        level = self.broker.names.level_of_consumer(msg.subject.rpartition(".")[2])
        if level is None or level[0] not in self.queues or not self._live:
            return
        task = asyncio.get_running_loop().create_task(self._add_later(*level))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add_later(self, queue: str, priority: int) -> None:
        try:
            await self.add(queue, priority)
        except Exception as e:  # the level's tasks wait in the stream: a restart finds them
            log.warning("cannot fetch priority %d of queue %s (%s): its tasks wait until this worker restarts",
                        priority, queue, e)

    async def stop(self) -> None:
        subs = [self._sub, *self._subs.values()]
        self._live, self._sub, self._subs = False, None, {}
        for sub in subs:
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception as e:
                    log.debug("advisory unsubscribe failed: %s", e)
        for task in list(self._tasks):
            task.cancel()
