"""Mirrors of a queue's own stream (``stream_per_queue``) for disaster recovery: one created in
another cluster, and turned into the queue's stream when the primary is lost (``natask.failover``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.js.api import RetentionPolicy, StorageType, StreamConfig, StreamSource, SubjectTransform

from ..errors import BrokerError, NataskError
from .layout import placement as stream_placement
from .streams import Streams
from .translate import STREAM_NOT_FOUND, describe

log = logging.getLogger("natask.broker")

STREAM_OFFLINE: Final = 10118
"""JetStream's err_code for a stream whose servers are all unreachable ("stream is offline")."""
_ORIGIN_CHECK: Final = 3.0
"""Seconds the primary stream gets to answer before a promotion counts it as lost."""


class Mirrors(Streams):
    """Create a queue stream's mirror; promote it (see the module docstring)."""

    async def add_mirror(self, queue: str, name: str, placement: Mapping[str, Any] | None = None,
                         replicas: int | None = None) -> str:
        """Create ``name`` as a mirror of ``queue``'s stream (nothing if it exists and mirrors it),
        placed by ``placement`` (``{"cluster": ..., "tags": [...]}``) with ``replicas``.

        A mirror of a WorkQueue stream reads it through a consumer of its own: it copies the task
        subjects only, never the schedules (``_sched``): the server would remove a schedule from
        the primary once the mirror had copied it (nothing else consumes schedule subjects), and
        it would never fire. A delayed call reaches the mirror when it fires."""
        domain = self.domain_of(queue)
        js, origin = self.jetstream(domain), self.stream_of(queue)
        copied = self.names.queue_stream_subjects(queue)[:-1]  # not the schedules
        config = StreamConfig(
            name=name,
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas or self.replicas_of(queue),
            placement=stream_placement(placement),
            mirror=StreamSource(name=origin, subject_transforms=[SubjectTransform(src=s, dest=s) for s in copied]),
        )
        try:
            have = (await self.api(lambda: js.stream_info(name))).config
        except nats.js.errors.NotFoundError:
            try:
                await self.api(lambda: js.add_stream(config))
            except Exception as e:
                raise BrokerError(f"cannot create mirror {name} of stream {origin}: {describe(e)}") from e
            log.info("created stream %s, a mirror of %s (queue %s)", name, origin, queue)
            return name
        except Exception as e:
            raise self._translate(e, f"{self.api_for(domain)}.STREAM.INFO.{name}") from e
        if have.mirror is None or have.mirror.name != origin:
            raise NataskError(f"stream {name} exists and is not a mirror of {origin}: pick another name")
        return name

    async def promote_mirror(self, queue: str, name: str, force: bool = False) -> str:
        """Make the mirror ``name`` ``queue``'s stream: delete the lost primary (a request the
        JetStream meta leader answers while the primary's servers are down), then drop the mirror
        setting and give it the queue's subjects. Refused while the primary still answers, unless
        ``force``. Nothing to do for a mirror promoted already."""
        domain = self.domain_of(queue)
        js, api = self.jetstream(domain), self.api_for(domain)
        try:
            have = (await self.api(lambda: js.stream_info(name))).config
        except nats.js.errors.NotFoundError:
            raise NataskError(f"there is no stream {name} to promote (natask failover mirror {queue} makes one)") \
                from None
        except Exception as e:
            raise self._translate(e, f"{api}.STREAM.INFO.{name}") from e
        subjects = self.names.queue_stream_subjects(queue)
        if have.mirror is None:
            if set(have.subjects or ()) != set(subjects):
                raise NataskError(f"stream {name} is not a mirror and does not hold queue {queue!r}'s subjects")
            return name  # promoted before
        origin = str(have.mirror.name)
        alive = await self._answers(f"{api}.STREAM.INFO.{origin}")
        if alive and not force:
            raise NataskError(
                f"stream {origin}, the primary of queue {queue!r}, still answers: fail over only once it is lost "
                "(its cluster down), or pass force=True (--force) to delete it and promote the mirror anyway; tasks "
                "the mirror has not copied yet are lost then")
        if alive is not None:  # it exists (alive, or offline): its subjects must be free for the mirror
            await self._delete_stream(api, origin)
            log.warning("deleted stream %s, the lost primary of queue %s", origin, queue)
        promoted = replace(have, mirror=None, subjects=subjects, allow_msg_schedules=True, allow_msg_ttl=True,
                           allow_direct=True, duplicate_window=self.config.duplicate_window)
        try:
            await self.api(lambda: js.update_stream(promoted))
        except Exception as e:
            raise BrokerError(f"cannot promote mirror {name}: {describe(e)}") from e
        log.warning("promoted stream %s: it holds queue %s's tasks from now on", name, queue)
        await self._recreate_queue_stream(queue)  # this connection finds it by the queue's subjects
        return name

    async def _answers(self, subject: str) -> bool | None:
        """Whether a stream answers its info request: True (alive), False (exists, but offline or
        silent), None (it does not exist)."""
        try:
            msg = await self.nc.request(subject, b"", timeout=_ORIGIN_CHECK)
            error = json.loads(msg.data).get("error")
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError):
            return False
        except (nats.errors.Error, ValueError) as e:
            raise BrokerError(f"cannot look up {subject}: {describe(e)}") from e
        if not error:
            return True
        if error.get("err_code") == STREAM_NOT_FOUND:
            return None
        return False

    async def _delete_stream(self, api: str, stream: str) -> None:
        try:
            msg = await self.api(lambda: self.nc.request(f"{api}.STREAM.DELETE.{stream}", b"", timeout=5))
            answer: Any = json.loads(msg.data)
        except (nats.errors.Error, TimeoutError, ValueError) as e:
            raise BrokerError(f"cannot delete stream {stream}: {describe(e)}") from e
        error = answer.get("error") if isinstance(answer, dict) else {"description": "no answer"}
        if error and error.get("err_code") != STREAM_NOT_FOUND:
            raise BrokerError(f"cannot delete stream {stream}: {error.get('description')} (the JetStream meta leader "
                              "must answer: the cluster that survives needs a majority of the meta group's servers)")
