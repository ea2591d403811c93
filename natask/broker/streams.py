"""Reading and trimming streams for operators: consumer and stream state, sizes and limits, stored
messages read by sequence or in batches (the dead-letter queue), purges and deletions."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any, Final, NamedTuple

import nats.errors
import nats.js.errors

from ..errors import BrokerError
from .objects import Objects

REPLY_WAIT: Final = 5.0
"""Seconds to wait for each message of a direct get."""
DIRECT_HEADERS: Final = frozenset({"Nats-Stream", "Nats-Sequence", "Nats-Subject", "Nats-Time-Stamp",
                                   "Nats-Num-Pending", "Nats-Last-Sequence"})
"""Headers a direct get adds to the stored message's own."""
_COUNT_RE: Final = re.compile(r"^[0-9]{1,18}$")


class ConsumerState(NamedTuple):
    """A durable consumer (a queue) as the server counts it."""

    name: str
    pending: int
    """Messages waiting to be delivered."""
    in_flight: int
    """Delivered and not yet acked (all workers)."""
    redelivered: int
    waiting_pulls: int
    delivered: int
    """Consumer sequence of the last delivery (how many deliveries so far)."""


class StreamState(NamedTuple):
    """A stream's sequence range and message counts (per subject when a filter was given)."""

    first_seq: int
    last_seq: int
    messages: int
    subjects: dict[str, int]


class StreamSizes(NamedTuple):
    """A stream's (or a KV bucket's, stream ``KV_<bucket>``) size and limits as the server reports
    them. A limit of -1 (``max_age``: 0) is no limit."""

    name: str
    messages: int
    bytes: int
    consumers: int
    max_msgs: int
    max_bytes: int
    max_age: float
    """Seconds a message is kept (a bucket's ttl)."""
    max_msgs_per_subject: int
    """Messages kept per subject (a bucket's history per key)."""
    replicas: int
    storage: str
    """``file`` or ``memory``."""
    discard: str
    """What a full stream does: ``old`` (drops its oldest messages) or ``new`` (refuses new ones)."""


class Stored(NamedTuple):
    """A stored message read back: its stream sequence, subject, body and own headers."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]


class Streams(Objects):
    """Operator reads and deletions on any stream (the task stream, the dead letters)."""

    async def consumer_states(self, stream: str, domain: str | None = None) -> list[ConsumerState]:
        """Every consumer of ``stream`` (none if the stream does not exist); ``domain``: the
        JetStream domain it lives in, when not the app's."""
        js = self.jetstream(domain)
        try:
            infos = await self.api(lambda: js._jsm.consumers_info(stream))
        except nats.js.errors.NotFoundError:
            return []
        except (nats.errors.Error, TimeoutError) as e:
            raise self._translate(e, f"{self.api_for(domain)}.CONSUMER.LIST.{stream}") from e
        return [ConsumerState(i.name, i.num_pending or 0, i.num_ack_pending or 0, i.num_redelivered or 0,
                              i.num_waiting or 0, i.delivered.consumer_seq if i.delivered else 0) for i in infos]

    async def stream_state(self, stream: str, subjects: str | None = None,
                           domain: str | None = None) -> StreamState | None:
        """``stream``'s state (None if it does not exist); ``subjects``: count messages per subject
        matching this filter."""
        js = self.jetstream(domain)
        try:
            info = await self.api(lambda: js.stream_info(stream, subjects_filter=subjects))
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as e:
            raise self._translate(e, f"{self.api_for(domain)}.STREAM.INFO.{stream}") from e
        state = info.state
        return StreamState(state.first_seq, state.last_seq, state.messages, dict(state.subjects or {}))

    async def stream_sizes(self, stream: str, domain: str | None = None) -> StreamSizes | None:
        """``stream``'s size and limits (None if it does not exist)."""
        try:
            js = self.jetstream(domain)
            info = await self.api(lambda: js.stream_info(stream))
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as e:
            raise self._translate(e, f"{self.api_for(domain)}.STREAM.INFO.{stream}") from e
        c, state = info.config, info.state
        return StreamSizes(stream, state.messages, state.bytes, state.consumer_count,
                           -1 if c.max_msgs is None else c.max_msgs, -1 if c.max_bytes is None else c.max_bytes,
                           c.max_age or 0.0, c.max_msgs_per_subject, c.num_replicas or 1,
                           _word(c.storage, "file"), _word(c.discard, "old"))

    async def purge(self, stream: str, subject: str | None = None, domain: str | None = None) -> None:
        """Delete every message of ``stream`` (matching ``subject``); nothing if it does not exist."""
        js = self.jetstream(domain)
        try:
            await self.api(lambda: js.purge_stream(stream, subject=subject))
        except nats.js.errors.NotFoundError:
            pass
        except (nats.errors.Error, TimeoutError) as e:
            raise self._translate(e, f"{self.api_for(domain)}.STREAM.PURGE.{stream}") from e

    async def delete_message(self, stream: str, seq: int, domain: str | None = None) -> None:
        js = self.jetstream(domain)
        try:
            await self.api(lambda: js.delete_msg(stream, seq))
        except (nats.errors.Error, TimeoutError) as e:
            raise self._translate(e, f"{self.api_for(domain)}.STREAM.MSG.DELETE.{stream}") from e

    async def read_at(self, stream: str, seq: int, domain: str | None = None) -> Stored | None:
        """The message stored at ``seq`` (a direct get), or None."""
        subject = f"{self.api_for(domain)}.DIRECT.GET.{stream}"
        try:
            msg = await self.api(lambda: self.nc.request(subject, json.dumps({"seq": seq}).encode(),
                                                         timeout=REPLY_WAIT))
        except nats.errors.Error as e:
            raise BrokerError(f"reading {stream} failed: {e}") from e
        stored = _stored(msg)
        return stored if stored is not None and stored.seq == seq else None

    async def read_forward(self, stream: str, subjects: str, low: int, high: int, *, batch: int,
                           max_bytes: int, domain: str | None = None) -> list[Stored]:
        """The messages matching ``subjects`` with a sequence in ``[low, high)``, oldest first.

        Batched direct gets (nats-server >= 2.11): one request returns up to ``batch`` messages
        matching the filter, then an end-of-batch status (204); 404 when nothing matches anymore.
        A batch does not stop at ``high`` (the server has no such bound for it), so batches start
        at one message and grow only while they stay inside the range: what is read past it is
        at most about what the range held.
        """
        nc = self.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        out: list[Stored] = []
        seq, size = low, 1
        try:
            while seq < high:
                request = {"seq": seq, "next_by_subj": subjects, "batch": min(size, high - seq), "max_bytes": max_bytes}
                size = min(size * 8, batch)
                await nc.publish(f"{self.api_for(domain)}.DIRECT.GET.{stream}", json.dumps(request).encode(),
                                 reply=inbox)
                while True:
                    try:
                        msg = await sub.next_msg(timeout=REPLY_WAIT)
                    except nats.errors.TimeoutError:
                        raise BrokerError(f"no answer reading {stream} within {REPLY_WAIT:g}s") from None
                    stored = _stored(msg)
                    if stored is None:
                        status = (msg.headers or {}).get("Status")
                        if status == "204":
                            break  # end of this batch: ask for the next from where it stopped
                        if status == "404":
                            return out
                        raise BrokerError(f"reading {stream} failed: status {status} "
                                          f"{(msg.headers or {}).get('Description', '')}".rstrip())
                    if stored.seq >= high:
                        return out
                    if stored.seq >= seq:  # sequences only grow within a read: anything else is not news
                        out.append(stored)
                        seq = stored.seq + 1
        except nats.errors.Error as e:
            raise BrokerError(f"reading {stream} failed: {e}") from e
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        return out


def _word(value: Any, default: str) -> str:
    """An enum field of a server answer: nats-py leaves the server's string (or None) in it."""
    return str(getattr(value, "value", value) or default)


def _stored(msg: Any) -> Stored | None:
    """A direct get's answer as a stored message; None for a status (404, end of batch)."""
    headers = msg.headers or {}
    value = headers.get("Nats-Sequence")
    # The server sets Nats-Sequence itself; a status reply has none (even if the stored message's
    # own headers said "Status: 404", which fools nats-py's get_msg).
    if value is None or not _COUNT_RE.match(value):
        return None
    own = {k: v for k, v in headers.items() if k not in DIRECT_HEADERS}
    return Stored(int(value), headers.get("Nats-Subject", ""), msg.data or b"", own)
