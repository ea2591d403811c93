"""Publishing to JetStream: one message with its PubAck (retried with the same message id), many
pipelined, and the size check that keeps the connection alive."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from typing import Final, NamedTuple

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from ..errors import BrokerError, PermissionDenied
from ..message import PublishRetry
from ..naming import HDR_CHECK_STORED
from .connection import RETRY_PAUSE, Connection, _expire
from .translate import WRONG_LAST_SEQUENCE, SequenceConflict, describe, full_error, storage_full

PIPELINE: Final = 4096
"""Most publishes of one ``publish_many`` waiting for their PubAck at a time."""
_BATCH_ACK_WAIT: Final = 5.0
"""Seconds ``publish_many`` waits without any PubAck before publishing the rest one by one."""
_SEQ_RE: Final = re.compile(rb'"seq":(\d+)')
ACK_WAIT: Final = 2.0
"""Most seconds one publish attempt waits for its PubAck (a call's retry policy counts attempts)."""


class Published(NamedTuple):
    """What the server's PubAck said of a publish."""

    seq: int
    """The message's stream sequence (the original's, for a duplicate)."""
    duplicate: bool
    """The stream had this ``Nats-Msg-Id`` already within its duplicate window: stored once."""


class Publishing(Connection):
    async def publish(self, subject: str, payload: bytes, headers: dict[str, str],  # noqa: C901 - the hot path, inlined
                      retry: PublishRetry | None = None) -> Published:
        """Publish to JetStream and await the PubAck, retrying with the same message id on
        reconnects and leader elections until ``publish_timeout`` (or as ``retry`` says); never
        reports success without the server's ack. ``PayloadTooLarge`` (payload + headers over
        ``max_payload``) before sending: the server would otherwise drop the whole connection."""
        self.check_size(subject, payload, headers)
        wire = subject
        if self.kv_prefix and subject.startswith("$KV."):
            wire = self.kv_prefix + subject  # a key of another domain's bucket: see DomainContext
        # A call's own retry policy counts attempts, within the dedupe window (a later retry could enqueue twice).
        deadline = time.monotonic() + (self.config.publish_timeout if retry is None else self.config.duplicate_window)
        attempt = 0
        while True:
            attempt += 1
            if attempt == 2 and subject.startswith(self._task_subjects):
                # The first attempt may be stored, and a server restart since makes JetStream forget
                # its id: the worker checks for a stored outcome before it runs this one.
                headers[HDR_CHECK_STORED] = "1"
                self.check_size(subject, payload, headers)
            remaining = deadline - time.monotonic()
            try:
                data = await self._request(wire, payload, headers, max(0.05, min(remaining, ACK_WAIT)))
                if b'"error"' in data:
                    raise nats.js.errors.APIError.from_error(json.loads(data)["error"])
                seq = _SEQ_RE.search(data)
                return Published(int(seq.group(1)) if seq else 0, b'"duplicate":true' in data)
            except nats.js.errors.APIError as e:
                if storage_full(e):  # a 503 too, but no election ends it
                    raise full_error(e, f"the publish to {subject}") from e
                if e.code == 503 or e.err_code == 10008:  # no leader / stream offline: election
                    error: BaseException = e
                elif e.err_code == WRONG_LAST_SEQUENCE:
                    raise SequenceConflict(f"publish to {subject}: {e.description}") from e
                else:
                    raise BrokerError(f"publish to {subject} refused: {e.description}") from e
            except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError) as e:
                error = e  # no stream answers: its leader is moving, or it is gone (then recreate it)
                stream = self._owner(subject)
                if stream is not None and await self.heal(stream):
                    continue
            except (nats.errors.TimeoutError, asyncio.TimeoutError) as e:
                error = e
                if wire.lower() in self._denied:
                    raise PermissionDenied(
                        f"NATS permissions deny publishing to {wire}: grant it to this user", wire
                    ) from None
            except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError,
                    nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError) as e:
                error = e
                if self.nc.is_closed:
                    raise BrokerError(f"publish to {subject} failed: the connection is closed") from e
            if retry is not None:
                if attempt >= retry.attempts or time.monotonic() >= deadline:
                    raise BrokerError(
                        f"publish to {subject} not acknowledged after {attempt} attempt(s) ({describe(error)}; "
                        f"the call's retry={'False' if retry.attempts == 1 else 'policy'}): is the stream "
                        f"{self._owner(subject) or self.names.stream} available?")
                await asyncio.sleep(retry.pause(attempt))
                continue
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"publish to {subject} not acknowledged within {self.config.publish_timeout:g}s "
                    f"({describe(error)}); is the stream {self._owner(subject) or self.names.stream} available?"
                )
            if not isinstance(error, (nats.errors.TimeoutError, asyncio.TimeoutError)):
                await asyncio.sleep(RETRY_PAUSE)

    async def _request(self, subject: str, payload: bytes, headers: dict[str, str], timeout: float) -> bytes:
        """Publish with a reply on this connection's ack inbox and return the reply's body.

        Leaner than ``js.publish`` (``nc.request``): the ack wakes the caller one loop turn
        sooner (no ``wait_for`` in between), its token is a counter (no random bytes), and only
        a refusal is parsed as JSON (no ``PubAck`` dataclass per message).
        """
        self._ack_count += 1
        token = str(self._ack_count)
        fut: asyncio.Future[Msg] = self.loop.create_future()
        self._acks[token] = fut
        timer = self.loop.call_later(timeout, _expire, fut)
        try:
            await self.nc.publish(subject, payload, f"{self._ack_prefix}.{token}", headers)
            msg = await fut
        finally:
            timer.cancel()
            del self._acks[token]
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            raise nats.errors.NoRespondersError
        return msg.data

    async def publish_many(  # noqa: C901 - the bulk hot path, inlined
            self, subjects: Sequence[str], payloads: Sequence[bytes], headers: Sequence[dict[str, str]],
            seqs: list[int] | None = None) -> None:
        """Pipelined publishes (the i-th subject, payload and headers each): up to ``PIPELINE``
        unacknowledged at a time; a message without a PubAck after all goes through ``publish``.

        Leaner than ``js.publish_async``: one inbox subscription for the batch and the message's
        index as reply token; an ack is checked for an error without being parsed, and no future
        is made per message. A republish keeps its ``Nats-Msg-Id``, so it never enqueues twice.
        ``seqs``, if given, receives each message's stream sequence.
        """
        n = len(subjects)
        if n == 0:
            return
        inbox = self.nc.new_inbox()
        cut = len(inbox) + 1
        acked = bytearray(n)  # 1: acknowledged, 2: refused (published again below)
        state = {"acks": 0, "need": n}
        progress = asyncio.Event()

        async def on_ack(msg: Msg) -> None:
            i = int(msg.subject[cut:])
            if acked[i]:
                return
            # A PubAck is {"stream", "seq"...}; a refusal {"error"...}, or a 503 status with no body.
            acked[i] = 2 if not msg.data or b'"error"' in msg.data else 1
            if seqs is not None and acked[i] == 1:
                seq = _SEQ_RE.search(msg.data)
                seqs[i] = int(seq.group(1)) if seq else 0
            state["acks"] += 1
            if state["acks"] >= state["need"]:
                progress.set()

        async def until(need: int) -> bool:
            state["need"] = need
            while state["acks"] < need:
                progress.clear()
                try:
                    await asyncio.wait_for(progress.wait(), _BATCH_ACK_WAIT)
                except asyncio.TimeoutError:
                    return False
            return True

        sub = await self.nc.subscribe(f"{inbox}.*", cb=on_ack)
        try:
            publish = self.nc.publish
            for i in range(n):
                if i - state["acks"] >= PIPELINE and not await until(i - PIPELINE // 2):
                    break  # no PubAck for a while: the rest goes one by one below
                try:
                    await publish(subjects[i], payloads[i], f"{inbox}.{i}", headers[i])
                except nats.errors.Error:
                    break  # reconnecting, closed...: likewise
            else:
                await until(n)
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        for i in range(n):
            if acked[i] != 1:
                if subjects[i].startswith(self._task_subjects):
                    headers[i][HDR_CHECK_STORED] = "1"  # as in publish: the first try may be stored
                published = await self.publish(subjects[i], payloads[i], headers[i])
                if seqs is not None:
                    seqs[i] = published.seq

    async def publish_core(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Fire-and-forget core publish (replies, events); ``PayloadTooLarge`` as ``publish``."""
        self.check_size(subject, payload, headers or {})
        await self.nc.publish(subject, payload, headers=headers)
