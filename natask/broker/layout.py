"""Where each queue's tasks live: the app's one task stream (``NATASK_<PREFIX>``), or with
``stream_per_queue`` a stream of the queue's own, in the JetStream domain and placement its
``queue_options`` give; and the errors for a subject prefix whose two layouts meet on one account."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import Placement, RetentionPolicy, StorageType, StreamConfig

from ..config import Config
from ..errors import BrokerError, ConfigError
from .connection import ResultCallback, api_prefix
from .publish import Publishing
from .translate import describe


def placement(place: Mapping[str, Any] | None) -> Placement | None:
    """JetStream's placement for ``{"cluster": ..., "tags": [...]}`` (validated by ``config.check_placement``)."""
    if not place:
        return None
    return Placement(cluster=place.get("cluster"), tags=list(place.get("tags") or ()) or None)

_LIST_PAGE: Final = 256
"""Streams the server lists per request."""


class Layout(Publishing):
    """The stream, JetStream domain and API prefix of each queue (see the module docstring)."""

    def __init__(self, config: Config, on_result: ResultCallback | None = None,
                 on_reconnect: Callable[[], None] | None = None,
                 on_closed: Callable[[BrokerError], None] | None = None) -> None:
        super().__init__(config, on_result, on_reconnect, on_closed)
        self.msg_ttl = False
        """The task stream removes messages at their ``Nats-TTL`` (``allow_msg_ttl``): tasks with
        ``expires`` carry one, so an expired task never reaches a worker."""
        self.per_queue = config.stream_per_queue
        """Every queue has its own stream (``stream_per_queue``)."""
        self._queue_streams: dict[str, str] = {}  # queue -> its stream, once ensured on this connection
        self._stream_queues: dict[str, str] = {}  # a queue stream -> its queue (healing, API prefix)
        self._queue_ttl: set[str] = set()  # queues whose stream removes messages at their Nats-TTL
        self._domains: dict[str, JetStreamContext] = {}

    def queue_option(self, queue: str, key: str) -> Any:
        """``queue_options[queue][key]``, None if not set."""
        return self.config.queue_options.get(queue, {}).get(key)

    def domain_of(self, queue: str) -> str | None:
        """The JetStream domain of ``queue``'s stream when it is not the app's (``queue_options``)."""
        return self.queue_option(queue, "jetstream_domain") if self.per_queue else None

    def jetstream(self, domain: str | None = None) -> JetStreamContext:
        """nats-py's JetStream context for ``domain`` (None: the app's)."""
        if domain is None:
            return self.js
        js = self._domains.get(domain)
        if js is None:
            js = self._domains[domain] = self.nc.jetstream(domain=domain)
        return js

    def api_for(self, domain: str | None = None) -> str:
        """The JetStream API prefix of ``domain`` (None: the app's)."""
        return self.api_prefix if domain is None else api_prefix(domain)

    def stream_of(self, queue: str) -> str:
        """The stream holding ``queue``'s tasks: the app's task stream, or with ``stream_per_queue``
        the queue's own (the stream found holding its subjects, e.g. a promoted mirror, once ensured)."""
        if not self.per_queue:
            return self.names.stream
        return self._queue_streams.get(queue) or self.names.queue_stream(queue)

    def api_of_stream(self, stream: str) -> str:
        """The API prefix of a stream natask owns (a queue's own may live in another domain)."""
        queue = self._stream_queues.get(stream)
        return self.api_prefix if queue is None else self.api_for(self.domain_of(queue))

    def next_subject(self, queue: str, durable: str) -> str:
        """Where pull requests for a consumer of ``queue`` go."""
        return f"{self.api_for(self.domain_of(queue))}.CONSUMER.MSG.NEXT.{self.stream_of(queue)}.{durable}"

    def ttl_for(self, queue: str) -> bool:
        """Whether ``queue``'s stream removes a message at its ``Nats-TTL`` (``allow_msg_ttl``)."""
        return queue in self._queue_ttl if self.per_queue else self.msg_ttl

    def replicas_of(self, queue: str) -> int:
        """Replicas of ``queue``'s stream (and consumers)."""
        replicas = self.queue_option(queue, "replicas") if self.per_queue else None
        return int(replicas) if replicas is not None else self.config.stream_replicas

    def queue_stream_config(self, queue: str) -> StreamConfig:
        """The configuration natask gives a queue's own stream."""
        return StreamConfig(
            name=self.names.queue_stream(queue),
            subjects=self.names.queue_stream_subjects(queue),
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=self.replicas_of(queue),
            placement=placement(self.queue_option(queue, "placement")),
            allow_msg_schedules=True,
            allow_msg_ttl=True,
            allow_direct=True,
            duplicate_window=self.config.duplicate_window,
        )

    async def find_queue_stream(self, queue: str) -> StreamConfig | None:
        """The stream on the server holding ``queue``'s tasks: its own by name, else one that took
        over exactly its subjects (a promoted mirror, ``natask.failover``); None if there is none.
        ``ConfigError`` if another stream holds some of its subjects (the one-stream layout)."""
        domain = self.domain_of(queue)
        js, wanted = self.jetstream(domain), self.queue_stream_config(queue)
        assert wanted.name is not None
        try:
            info = await self.api(lambda: js.stream_info(wanted.name))  # type: ignore[arg-type]
        except nats.js.errors.NotFoundError:
            info = None
        except Exception as e:
            raise self._translate(e, f"{self.api_for(domain)}.STREAM.INFO.{wanted.name}") from e
        if info is None:
            holders = await self.stream_names(self.names.queue_filter(queue), domain)
            if not holders:
                return None
            if len(holders) > 1 or holders[0] == self.names.stream:
                raise self.layout_conflict(queue, holders)
            try:
                info = await self.api(lambda: js.stream_info(holders[0]))
            except Exception as e:
                raise self._translate(e, f"{self.api_for(domain)}.STREAM.INFO.{holders[0]}") from e
        have = info.config
        if have.retention != wanted.retention or set(have.subjects or ()) != set(wanted.subjects or ()):
            if info.config.name != wanted.name:
                raise self.layout_conflict(queue, [str(info.config.name)])
            raise ConfigError(
                f"stream {have.name} exists with retention={have.retention} subjects={have.subjects}, "
                f"natask needs retention={wanted.retention} subjects={wanted.subjects} for queue {queue!r}: "
                "delete it or use another subject_prefix")
        return have

    async def stream_names(self, subject: str, domain: str | None = None) -> list[str]:
        """The streams of the account whose subjects overlap ``subject``."""
        answer = await self._api_json(f"{self.api_for(domain)}.STREAM.NAMES", {"subject": subject},
                                      f"list the streams holding {subject}")
        return sorted(answer.get("streams") or [])

    async def _api_json(self, subject: str, request: dict[str, Any], what: str) -> dict[str, Any]:
        """A raw JetStream API request and its JSON answer; ``BrokerError`` saying ``what`` failed."""
        body = json.dumps(request).encode()
        try:
            msg = await self.api(lambda: self.nc.request(subject, body, timeout=5))
            answer = json.loads(msg.data)
        except (nats.errors.Error, TimeoutError, ValueError) as e:
            raise BrokerError(f"cannot {what}: {describe(e)}") from e
        if not isinstance(answer, dict) or answer.get("error"):
            error = answer.get("error") if isinstance(answer, dict) else None
            raise BrokerError(f"cannot {what}: {(error or {}).get('description')}")
        return answer

    async def queue_streams(self) -> dict[str, tuple[str, str | None]]:
        """Every queue's own stream on the server (``stream_per_queue``): queue -> (stream, domain),
        found in the app's domain and in each domain ``queue_options`` names."""
        found: dict[str, tuple[str, str | None]] = {}
        for domain in (None, *self.config.queue_domains):
            for config in await self._stream_configs(f"{self.names.prefix}.>", domain):
                subjects = config.get("subjects") or []
                queue = self.names.queue_of_subject(subjects[0]) if subjects else None
                if queue is not None and set(subjects) == set(self.names.queue_stream_subjects(queue)) \
                        and self.domain_of(queue) == domain:
                    found[queue] = (str(config.get("name")), domain)
        return found

    async def task_streams(self) -> list[tuple[str, str | None]]:
        """Every stream holding the app's tasks, with its domain: the app's one stream, or each
        queue's own (``stream_per_queue``)."""
        if not self.per_queue:
            return [(self.names.stream, None)]
        return sorted((await self.queue_streams()).values(), key=str)

    async def _stream_configs(self, subject: str, domain: str | None) -> list[dict[str, Any]]:
        api = self.api_for(domain)
        configs: list[dict[str, Any]] = []
        while True:  # the server answers a page at a time
            answer = await self._api_json(f"{api}.STREAM.LIST", {"subject": subject, "offset": len(configs)},
                                          f"list the streams in {api}")
            page = [s.get("config") or {} for s in answer.get("streams") or []]
            configs.extend(page)
            if len(page) < _LIST_PAGE or len(configs) >= int(answer.get("total") or 0):
                return configs

    def layout_conflict(self, queue: str | None, holders: list[str]) -> ConfigError:
        """The error for subjects the other layout holds already (the server refuses overlaps)."""
        prefix, app_stream = self.names.prefix, self.names.stream
        if queue is None:
            return ConfigError(
                f"stream {app_stream} (one stream for every queue, stream_per_queue=False) cannot be created: "
                f"subject prefix {prefix!r} has streams of its own per queue on this account ({', '.join(holders)}, "
                "stream_per_queue=True), and the server refuses overlapping subjects. Use one layout per subject "
                "prefix: set stream_per_queue=True (NATASK_STREAM_PER_QUEUE=1) on every producer and worker of "
                "this prefix, or drain and delete those streams (nats stream rm NAME) to go back")
        mine = self.names.queue_stream(queue)
        if app_stream in holders:
            return ConfigError(
                f"the stream of queue {queue!r} ({mine}, stream_per_queue=True) cannot be created: its subjects "
                f"overlap stream {app_stream}, the one stream for every queue of subject prefix {prefix!r} "
                "(stream_per_queue=False), and the server refuses overlapping subjects. Use one layout per subject "
                "prefix: keep stream_per_queue=False everywhere, or switch: stop the producers, let the workers "
                f"drain {app_stream}, delete it (nats stream rm {app_stream}) and start everything with "
                "stream_per_queue=True")
        return ConfigError(
            f"the stream of queue {queue!r} ({mine}) cannot be created: stream(s) {', '.join(holders)} hold some of "
            f"its subjects ({self.names.queue_filter(queue)}) and the server refuses overlapping subjects: delete "
            "them or use another subject_prefix")
