"""The NATS layer: the only part of natask that imports nats-py. One ``Broker`` per event loop
(connection, provisioning, publishing, buckets, operator reads); nats-py's errors come out as
natask's.

    connection  one connection: connect, subscribe, request, gather, the PubAck inbox, API retries, close
    publish     publish with PubAck (retried with the same message id), pipelined publishes
    layout      where each queue's tasks live: the app's stream, or its own (domain, placement)
    provision   streams, consumers and buckets natask owns, created and healed
    objects     the Object Store bucket of payloads over max_payload (claim checks)
    kv          bucket handles and watches
    streams     operator reads: consumer and stream state, stored messages, purges
    mirrors     a queue stream's mirror in another cluster, and its promotion (disaster recovery)
    fetch       the credit-based pull fetcher of a worker's queues
    delivery    the Message protocol handed up, and what a delivery's ack subject says
    translate   which nats-py errors are transient, "gone" or "full", and natask's errors for them
"""

from __future__ import annotations

from .connection import MIN_SERVER, ResultCallback
from .delivery import Message, attempt, stream_sequence
from .kv import Bucket, Entry
from .mirrors import Mirrors
from .publish import PIPELINE, Published
from .streams import ConsumerState, Stored, StreamState
from .translate import NoResponders, SequenceConflict

__all__ = ["MIN_SERVER", "PIPELINE", "Broker", "Bucket", "ConsumerState", "Entry", "Message", "NoResponders",
           "Published", "ResultCallback", "SequenceConflict", "Stored", "StreamState", "attempt", "stream_sequence"]


class Broker(Mirrors):
    """One NATS connection bound to the event loop that created it, with everything natask does over
    it. natask keeps one broker per event loop (the app's I/O thread has its own), because nats-py
    connections cannot cross loops."""
