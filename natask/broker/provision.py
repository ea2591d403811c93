"""What natask owns on the server: the task and dead-letter streams, queue consumers and buckets,
created when missing and recreated when an operator deleted them (``heal``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Final, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from ..config import Config
from ..errors import BrokerError, ConfigError
from ..naming import DLQ_STREAM
from .connection import ResultCallback
from .kv import Bucket, Entry, _Watch
from .layout import Layout
from .translate import (
    CONSUMER_NOT_FOUND,
    STREAM_NAME_IN_USE,
    STREAM_NOT_FOUND,
    SUBJECTS_OVERLAP,
    describe,
    full_error,
    gone,
    storage_full,
)

log = logging.getLogger("natask.broker")

_CHECK_TIMEOUT: Final = 2.0
"""Seconds a check whether a stream or consumer exists may take (an election answers slowly or not)."""
_LIST_PAGE: Final = 256
"""Consumers the server lists per request."""
_PRESENT_FOR: Final = 1.0
"""Seconds a stream seen to exist is not asked about again (no-responders during an election repeat)."""
T = TypeVar("T")


class Provisioning(Layout):
    """Streams, consumers and buckets natask owns: created when missing, recreated when gone."""

    def __init__(self, config: Config, on_result: ResultCallback | None = None,
                 on_reconnect: Callable[[], None] | None = None,
                 on_closed: Callable[[BrokerError], None] | None = None) -> None:
        super().__init__(config, on_result, on_reconnect, on_closed)
        self._stream_ready = False
        self._configured: set[str] = set()  # queues whose own stream a worker has configured (placement, replicas)
        self._levels: set[tuple[str, int]] = set()  # priority levels whose consumer exists (this connection)
        self._dlq_ready = False
        self._kv: Bucket | None = None
        self._revoked: Bucket | None = None
        # What natask owns on the server, by stream name, and how to recreate it when it is gone.
        self._owned: dict[str, Callable[[], Awaitable[Any]]] = {
            self.names.stream: self.ensure_stream, DLQ_STREAM: self.ensure_dlq}
        self._healing: dict[str, asyncio.Task[bool]] = {}
        self._present: dict[str, float] = {}  # stream -> when it was last seen to exist (monotonic)

    async def ensure_stream(self, queue: str | None = None) -> None:
        """Create the task stream if missing (producers and workers both call this); with
        ``stream_per_queue``, ``queue``'s own stream (nothing without a queue)."""
        if self._stream_ready:
            return
        if self.per_queue:
            if queue is not None and queue not in self._queue_streams:
                await self._ensure_queue_stream(queue)
            return
        names = self.names
        config = StreamConfig(
            name=names.stream,
            subjects=names.stream_subjects,
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=self.config.stream_replicas,
            allow_msg_schedules=True,
            allow_msg_ttl=True,
            allow_direct=True,
            duplicate_window=self.config.duplicate_window,
        )
        have = await self._ensure(config)
        self.msg_ttl = bool(have.allow_msg_ttl) or await self._allow_msg_ttl(have)
        self._stream_ready = True

    async def _ensure_queue_stream(self, queue: str, *, configure: bool = False) -> None:
        """Find or create ``queue``'s own stream (``stream_per_queue``); ``configure`` (workers):
        also give an existing one the placement and replicas ``queue_options`` ask for."""
        domain = self.domain_of(queue)
        js, wanted = self.jetstream(domain), self.queue_stream_config(queue)
        have = await self.find_queue_stream(queue)
        if have is None:

            async def conflict() -> ConfigError:
                return self.layout_conflict(queue, await self.stream_names(self.names.queue_filter(queue), domain))

            created = await self._create_stream(wanted, js, self.api_for(domain), conflict)
            have = wanted if created else await self.find_queue_stream(queue) or wanted
            log.info("created stream %s for queue %s", have.name, queue)
        elif configure and queue not in self._configured:
            have = await self._configure(queue, have, wanted, js)
        if configure:
            self._configured.add(queue)
        stream = str(have.name)
        if have.allow_msg_ttl or await self._allow_msg_ttl(have, js):
            self._queue_ttl.add(queue)
        self._queue_streams[queue] = stream
        self._stream_queues[stream] = queue
        self._owned[stream] = lambda: self._recreate_queue_stream(queue)

    async def _configure(self, queue: str, have: StreamConfig, wanted: StreamConfig, js: Any) -> StreamConfig:
        """An existing queue stream given the placement and replicas its ``queue_options`` ask for:
        the server moves a stream whose placement changed (copies it to the new peers, then drops
        the old ones; tasks keep flowing) and adds or removes replicas."""
        changes: dict[str, Any] = {}
        place = wanted.placement
        if place is not None and (have.placement is None or have.placement.cluster != place.cluster
                                  or set(have.placement.tags or ()) != set(place.tags or ())):
            changes["placement"] = place
        if self.queue_option(queue, "replicas") is not None and have.num_replicas != wanted.num_replicas:
            changes["num_replicas"] = wanted.num_replicas
        if not changes:
            return have
        shown = {k: (v.as_dict() if hasattr(v, "as_dict") else v) for k, v in changes.items()}
        try:
            await self.api(lambda: js.update_stream(replace(have, **changes)))
        except Exception as e:  # e.g. no servers where it should go: it keeps serving where it is
            log.warning("cannot update stream %s to %s (%s): it stays as it is", have.name, shown, describe(e))
            return have
        log.warning("stream %s updated to %s: the server moves or rescales it in the background", have.name, shown)
        return replace(have, **changes)

    async def _recreate_queue_stream(self, queue: str) -> None:
        """``queue``'s stream is gone: find the one holding its subjects now (a promoted mirror) or
        create it again."""
        old = self._queue_streams.pop(queue, None)
        self._queue_ttl.discard(queue)
        self._configured.discard(queue)
        self._levels = {level for level in self._levels if level[0] != queue}
        await self._ensure_queue_stream(queue)
        new = self._queue_streams[queue]
        if old is not None and new != old:
            log.warning("queue %s: its tasks are in stream %s now (it holds the queue's subjects)", queue, new)

    async def _allow_msg_ttl(self, have: StreamConfig, js: Any = None) -> bool:
        """Turn on per-message TTL on a task stream created before natask used it (a stream
        update, which nats-server >= 2.11 accepts); without the right to, expiry stays the
        worker's check."""
        js = js or self.js
        try:
            await self.api(lambda: js.update_stream(replace(have, allow_msg_ttl=True)))
        except Exception as e:
            log.warning("cannot enable per-message TTL on stream %s (%s): expired tasks are dropped by the "
                        "worker that receives them, not by the server", have.name, describe(e))
            return False
        log.info("enabled per-message TTL on stream %s: expired tasks are removed by the server", have.name)
        return True

    async def ensure_dlq(self) -> None:
        """Create the dead-letter stream if missing (workers and the dlq CLI call this)."""
        if self._dlq_ready:
            return
        config = StreamConfig(
            name=DLQ_STREAM,
            subjects=["natask.dlq.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=self.config.stream_replicas,
            allow_direct=True,
        )
        await self._ensure(config)
        self._dlq_ready = True

    async def ensure_events_stream(self, max_age: float, max_bytes: int) -> None:
        """Create the lifecycle-event history stream if missing (the dashboard calls this: apps
        without a dashboard pay nothing). Limits retention: events age out or make room, oldest first."""
        await self._ensure(StreamConfig(
            name=self.names.events_stream,
            subjects=[self.names.events_filter],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=self.config.stream_replicas,
            max_age=max_age,
            max_bytes=max_bytes,
            allow_direct=True,
        ))

    async def _ensure(self, config: StreamConfig) -> StreamConfig:
        """Create the stream if missing; the configuration it has on the server."""
        assert config.name is not None
        try:
            info = await self.api(lambda: self.js.stream_info(config.name))  # type: ignore[arg-type]
        except nats.js.errors.NotFoundError:

            async def conflict() -> ConfigError:
                return self.layout_conflict(None, await self.stream_names(f"{self.names.prefix}.>"))

            await self._create_stream(config, self.js, self.api_prefix,
                                      conflict if config.name == self.names.stream else None)
            return config
        except Exception as e:
            raise self._translate(e, f"{self.api_prefix}.STREAM.INFO.{config.name}") from e
        have = info.config
        if have.retention != config.retention or list(have.subjects or []) != list(config.subjects or []):
            raise ConfigError(
                f"stream {config.name} exists with retention={have.retention} subjects={have.subjects}, "
                f"natask needs retention={config.retention} subjects={config.subjects}: "
                "delete it or use another subject_prefix"
            )
        wanted, kept = config.duplicate_window, have.duplicate_window
        if wanted and kept and abs(kept - wanted) > 0.5:
            log.warning("stream %s keeps message ids for %gs, not the duplicate_window of %gs this app asks for: "
                        "natask does not change an existing stream (nats stream edit %s --dupe-window %gs)",
                        config.name, kept, wanted, config.name, wanted)
        return have

    async def _create_stream(self, config: StreamConfig, js: Any, api: str,
                             conflict: Callable[[], Awaitable[ConfigError]] | None) -> bool:
        """Create a stream natask owns: True, or False if another process created it meanwhile.
        Subjects another stream holds: ``conflict()``'s error (the two layouts), else BrokerError."""
        try:
            await self.api(lambda: js.add_stream(config))
            return True
        except nats.js.errors.BadRequestError as e:
            if e.err_code == SUBJECTS_OVERLAP and conflict is not None:
                raise await conflict() from e
            if e.err_code != STREAM_NAME_IN_USE:
                raise BrokerError(f"cannot create stream {config.name}: {e.description}") from e
            return False
        except Exception as e:
            raise self._translate(e, f"{api}.STREAM.CREATE.{config.name}") from e

    async def ensure_level(self, queue: str, priority: int) -> None:
        """Make sure the consumer of a priority level (1..9) of ``queue`` exists, once per connection
        (producers call this before their first publish to the level). An existing one is left as
        it is: workers set its configuration, and find it when it is created (``levels``)."""
        if (queue, priority) in self._levels:
            return
        try:
            await self.ensure_consumer(queue, priority, update=False)
        except BrokerError as e:
            raise BrokerError(f"cannot create the consumer of priority {priority} of queue {queue!r}: {e}") from e
        self._levels.add((queue, priority))

    async def levels(self, queues: Sequence[str]) -> list[tuple[str, int]]:
        """The priority levels (queue, 1..9) of ``queues`` that have a consumer on the server."""
        queues_set = set(queues)
        streams = {(self.stream_of(q), self.domain_of(q)) for q in queues_set} if self.per_queue \
            else {(self.names.stream, None)}
        found = [self.names.level_of_consumer(name) for stream, domain in sorted(streams, key=str)
                 for name in await self._consumer_names(stream, domain)]
        return sorted(level for level in found if level is not None and level[0] in queues_set)

    async def _consumer_names(self, stream: str, domain: str | None) -> list[str]:
        """The consumers of ``stream`` (none if it does not exist)."""
        js = self.jetstream(domain)
        infos: list[Any] = []
        while True:  # the server answers a page (256) at a time
            try:
                page = await self.api(lambda: js.consumers_info(stream, offset=len(infos)))
            except nats.js.errors.NotFoundError:
                return []  # a queue stream not created yet: no levels
            except Exception as e:
                raise self._translate(e, f"{self.api_for(domain)}.CONSUMER.LIST.{stream}") from e
            infos.extend(page)
            if len(page) < _LIST_PAGE:
                return [info.name for info in infos]

    async def ensure_consumer(self, queue: str, priority: int = 0, *, update: bool = True) -> str:
        """Create or update the durable pull consumer of a queue (workers only), or of one of its
        priority levels."""
        if not self.per_queue:
            await self.ensure_stream()
        elif queue not in self._queue_streams or (update and queue not in self._configured):
            await self._ensure_queue_stream(queue, configure=update)
        names, stream, domain = self.names, self.stream_of(queue), self.domain_of(queue)
        js = self.jetstream(domain)
        durable = names.priority_consumer(queue, priority)
        config = ConsumerConfig(
            durable_name=durable,
            name=durable,
            filter_subject=names.priority_filter(queue, priority) if priority else names.queue_filter(queue),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.config.ack_wait,
            max_ack_pending=self.config.queue_options.get(queue, {}).get("max_ack_pending",
                                                                         self.config.max_ack_pending),
            max_deliver=-1,  # retry limits are per task, enforced by the worker
            max_waiting=512,
            num_replicas=self.replicas_of(queue),
        )
        try:
            await self.api(lambda: js.add_consumer(stream, config))
        except nats.js.errors.BadRequestError as e:
            if e.err_code not in (10148, 10013):  # 10148: exists with another config
                raise BrokerError(f"cannot create consumer {durable}: {e.description}") from e
            if not update:
                return durable
            await self.api(lambda: self._update_consumer(config, stream, self.api_for(domain)))
        except Exception as e:
            raise self._translate(e, f"{self.api_for(domain)}.CONSUMER.CREATE.{stream}.{durable}") from e
        return durable

    async def _update_consumer(self, config: ConsumerConfig, stream: str, api: str) -> None:
        req = {"stream_name": stream, "config": config.as_dict(), "action": "update"}
        subject = f"{api}.CONSUMER.CREATE.{stream}.{config.name}.{config.filter_subject}"
        msg = await self.nc.request(subject, json.dumps(req).encode(), timeout=5)
        resp = json.loads(msg.data)
        if "error" in resp:
            raise BrokerError(f"cannot update consumer {config.name}: {resp['error'].get('description')}")

    async def results(self) -> Bucket:
        """The results KV bucket, created on first use."""
        if self._kv is None:
            self._kv = await self._bucket(self.names.results_bucket)
        return self._kv

    async def revoked(self) -> Bucket:
        """The revoked task ids (kept as long as results), created on first use."""
        if self._revoked is None:
            self._revoked = await self._bucket(self.names.revoked_bucket)
        return self._revoked

    async def claims(self) -> Bucket:
        """Idempotency claims (``Natask.claim``), kept as long as results."""
        return await self._bucket(self.names.claims_bucket)

    async def dlq_index(self) -> Bucket:
        """Dead-letter id -> ``NATASK_DLQ`` sequence (``natask.dlq``): kept until purged, no TTL."""
        return await self.bucket(self.names.dlq_index_bucket, ttl=None)

    async def bucket(self, name: str, *, ttl: float | None, direct: bool = True, description: str = "") -> Bucket:
        """A bucket natask owns, one revision per key, created if missing, healed if deleted later:
        ``ttl`` in seconds (None: kept), ``direct=False`` makes reads come from the stream leader
        (no stale value from a lagging replica)."""
        return await self._bucket(name, KeyValueConfig(bucket=name, description=description or None, history=1,
                                                       ttl=ttl, storage=StorageType.FILE,
                                                       replicas=self.config.stream_replicas, direct=direct))

    async def existing_bucket(self, name: str) -> Bucket | None:
        """A bucket if it exists (never creates it)."""
        try:
            kv = await self.api(lambda: self.js.key_value(name))
        except nats.js.errors.BucketNotFoundError:
            return None
        except Exception as e:
            raise self._translate(e, f"$KV.{name}") from e
        return Bucket(self, kv)

    async def _bucket(self, bucket: str, config: KeyValueConfig | None = None) -> Bucket:
        """A bucket natask owns, created if missing (``config``: by default one revision per key,
        kept ``result_ttl``). Its handle heals: a call that finds the bucket deleted on the server
        recreates it and is made again."""
        stream = f"KV_{bucket}"
        if config is not None or stream not in self._owned:  # a watch keeps the settings given by `bucket`
            if config is None:
                config = KeyValueConfig(bucket=bucket, history=1, ttl=self.config.result_ttl, storage=StorageType.FILE,
                                        replicas=self.config.stream_replicas, direct=True)
            self._owned[stream] = lambda: self._create_bucket(config)
        create = self._owned[stream]
        try:
            kv = await self.api(lambda: self.js.key_value(bucket))
        except nats.js.errors.BucketNotFoundError:
            kv = await create()
        except Exception as e:
            raise self._translate(e, f"$KV.{bucket}") from e
        return Bucket(self, kv)

    async def _create_bucket(self, config: KeyValueConfig) -> KeyValue:
        bucket = config.bucket
        try:
            return await self.api(lambda: self.js.create_key_value(config))
        except nats.js.errors.BadRequestError as e:
            if getattr(e, "err_code", None) != STREAM_NAME_IN_USE:  # created meanwhile, with other settings
                raise self._translate(e, f"$KV.{bucket}") from e
        except Exception as e:
            raise self._translate(e, f"$KV.{bucket}") from e
        try:
            return await self.api(lambda: self.js.key_value(bucket))
        except Exception as e:
            raise self._translate(e, f"$KV.{bucket}") from e

    # -- healing what natask owns -----------------------------------------------------------
    async def heal(self, stream: str) -> bool:
        """Recreate ``stream`` (natask's task stream, DLQ or a bucket's stream) if the server lost
        it. True: recreated, make the failed call again. False: it exists (a leader election or a
        reconnect: retry as before), cannot be checked now, or is not natask's."""
        recreate, seen = self._owned.get(stream), self._present.get(stream)
        if recreate is None or self.closed or (seen is not None and time.monotonic() - seen < _PRESENT_FOR):
            return False
        healing = self._healing.get(stream)
        if healing is None:  # callers failing at once share one check (and one log line)
            healing = self._healing[stream] = self.loop.create_task(self._heal(stream, recreate))
            healing.add_done_callback(lambda _: self._healing.pop(stream, None))
        return await asyncio.shield(healing)

    async def _heal(self, stream: str, recreate: Callable[[], Awaitable[Any]]) -> bool:
        exists = await self._stream_exists(stream)
        if exists is not False:
            return False
        if stream == self.names.stream:
            self._stream_ready = False
        elif stream == DLQ_STREAM:
            self._dlq_ready = False
        elif stream == f"KV_{self.names.results_bucket}":
            self._kv = None
        elif stream == f"KV_{self.names.revoked_bucket}":
            self._revoked = None
        what = f"bucket {stream[3:]}" if stream.startswith("KV_") else f"stream {stream}"
        try:
            await recreate()
        except Exception as e:
            log.warning("%s was deleted on the server and cannot be recreated: %s", what, e)
            raise
        log.warning("%s was deleted on the server: recreated it", what)
        self._present[stream] = time.monotonic()
        return True

    async def _stream_info(self, stream: str) -> dict[str, Any] | None:
        """The stream's info (raw JSON), None if it does not exist; BrokerError if unknown now."""
        try:
            msg = await self.nc.request(f"{self.api_of_stream(stream)}.STREAM.INFO.{stream}", b"",
                                        timeout=_CHECK_TIMEOUT)
            info = json.loads(msg.data)
        except (nats.errors.Error, asyncio.TimeoutError, ValueError) as e:
            raise BrokerError(f"cannot look up stream {stream}: {describe(e)}") from e
        error = info.get("error") if isinstance(info, dict) else {"code": 0}
        if error is None:
            self._present[stream] = time.monotonic()
            return info  # type: ignore[no-any-return]
        if error.get("err_code") == STREAM_NOT_FOUND:
            return None
        raise BrokerError(f"cannot look up stream {stream}: {error.get('description')}")

    async def _stream_exists(self, stream: str) -> bool | None:
        try:
            return await self._stream_info(stream) is not None
        except BrokerError:
            return None

    def _owner(self, subject: str) -> str | None:
        """The stream natask owns that stores ``subject``, if any."""
        if subject.startswith("$KV."):
            stream = "KV_" + subject[4:].split(".", 1)[0]
            return stream if stream in self._owned else None
        if subject.startswith("natask.dlq."):
            return DLQ_STREAM
        if subject.startswith(self.names.prefix) and subject[len(self.names.prefix):].startswith("."):
            if not self.per_queue:
                return self.names.stream
            queue = self.names.queue_of_subject(subject)
            if queue is None:
                return None
            stream = self.stream_of(queue)  # known to heal from now on, even before its first ensure
            self._stream_queues.setdefault(stream, queue)
            self._owned.setdefault(stream, lambda: self._recreate_queue_stream(queue))
            return stream
        return None

    async def heal_consumer(self, queue: str, priority: int = 0) -> bool:
        """Recreate a queue's consumer, or its priority level's (and the task stream), if the server
        lost it: True if it was recreated, False if it exists or cannot be checked now."""
        stream, durable = self.stream_of(queue), self.names.priority_consumer(queue, priority)
        api = self.api_for(self.domain_of(queue))
        try:
            msg = await self.nc.request(f"{api}.CONSUMER.INFO.{stream}.{durable}", b"", timeout=_CHECK_TIMEOUT)
            error = json.loads(msg.data).get("error")
        except (nats.errors.Error, asyncio.TimeoutError, ValueError, AttributeError):
            return False
        if error is None:
            return False
        if error.get("err_code") == STREAM_NOT_FOUND:
            self._present.pop(stream, None)
            if self.per_queue:
                self._owner(self.names.queue_filter(queue))  # known to heal, if it never was
            await self.heal(stream)
        elif error.get("err_code") != CONSUMER_NOT_FOUND:
            return False
        await self.ensure_consumer(queue, priority)
        log.warning("consumer %s of stream %s was deleted on the server: recreated it", durable, stream)
        return True

    async def _healed(self, stream: str, call: Callable[[], Awaitable[T]], what: str) -> T:
        """``call``, made once more if its stream was gone and is recreated; a full store is
        ``StorageFull`` at once."""
        for attempt in (1, 2):
            try:
                return await call()
            except nats.errors.Error as e:
                if storage_full(e):
                    raise full_error(e, what) from e
                if attempt == 2 or not gone(e) or not await self.heal(stream):
                    raise
        raise AssertionError("unreachable")

    def watch(self, bucket: str, keys: str | Sequence[str] = ">") -> AsyncGenerator[Entry | None, None]:
        """The entries of a bucket natask owns, as they are stored: the latest of each key first,
        then every change; ``None`` each time the watch has caught up (after its start and after
        each restart). Creates the bucket if missing; when the server-side consumer ends or goes
        silent (bucket deleted, server restarted) it recreates what is gone and carries on from
        the last entry seen, logging why. Runs until the caller stops iterating. ``keys``: a key, a
        wildcard, or several keys (one consumer filtering them all)."""
        return _Watch(self, bucket, keys).entries()
