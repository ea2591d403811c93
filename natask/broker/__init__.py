"""The NATS layer: the only part of natask that imports nats-py. One ``Broker`` per event loop
(connection, provisioning, publishing, buckets, pull fetching); nats-py's errors come out as natask's.

    connection  one connection: connect, subscribe, request, the PubAck inbox, API retries, close
    publish     publish with PubAck (retried with the same message id), pipelined publishes, size check
    provision   streams, consumers and buckets natask owns, created and healed
    kv          bucket handles and watches
    fetch       the credit-based pull fetcher of a worker's queues
    translate   which nats-py errors are transient, "gone" or "full", and natask's errors for them
"""

from __future__ import annotations

from .connection import MIN_SERVER, ResultCallback
from .provision import Provisioning
from .publish import PIPELINE, Published
from .translate import SequenceConflict

__all__ = ["MIN_SERVER", "PIPELINE", "Broker", "Published", "ResultCallback", "SequenceConflict"]


class Broker(Provisioning):
    """One NATS connection bound to the event loop that created it, with everything natask does over
    it. natask keeps one broker per event loop (the app's I/O thread has its own), because nats-py
    connections cannot cross loops."""
