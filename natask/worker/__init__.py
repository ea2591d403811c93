"""The worker: consume queues, run tasks with bounded concurrency, store results, ack, drain on stop.

One module per role, wired together by the ``Worker`` (``consume``):

    consume   the Worker: lifecycle, dispatch over the fetcher's slots, leases and heartbeats
    delivery  one message being worked on (``Delivery``) and the wire helpers the roles share
    gate      decode and gate: the subject decides; forged, malformed, revoked, expired, eta, unknown
    execute   running an admitted task: async or on threads, time limits, ``bind``
    threads   the threads that run plain-function tasks
    outcome   settling: workflow follow-ups, reply, store, retry, dead letter, ack
    store     the results bucket as workers write it: the first final outcome wins
    flow      workflow follow-ups of a finished task: chain steps, chords, links, errbacks
    rpc       answering RPC calls in the worker's slots
    revokes   the revoked ids mirrored from their bucket; terminating revoked tasks
    events    lifecycle events, batched for the listeners (event publisher, metrics)
    control   answering ping, stats and active
"""

from .consume import DEFAULT_CONCURRENCY, DEFAULT_GRACE, HEARTBEAT_INTERVAL, UNKNOWN_GRACE, Worker

__all__ = ["DEFAULT_CONCURRENCY", "DEFAULT_GRACE", "HEARTBEAT_INTERVAL", "UNKNOWN_GRACE", "Worker"]
