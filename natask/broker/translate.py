"""The NATS layer's error vocabulary: which nats-py failures are transient, which mean "gone" or
"full", and how they read as natask errors."""

from __future__ import annotations

import asyncio
import re
from typing import Final, TypeGuard

import nats
import nats.errors
import nats.js.errors

from ..errors import BrokerError, StorageFull

WRONG_LAST_SEQUENCE: Final = 10071
STREAM_NOT_FOUND: Final = 10059
CONSUMER_NOT_FOUND: Final = 10014
STREAM_NAME_IN_USE: Final = 10058
"""A stream (or bucket) of that name exists already with another configuration: created meanwhile."""
SUBJECTS_OVERLAP: Final = 10065
"""A stream's subjects overlap another stream's of the account."""
_STORAGE_FULL: Final = frozenset({10002, 10023, 10028, 10047})
"""JetStream err_codes of a full store: account limits exceeded (10002), insufficient resources
(10023: the server's max_file_store/max_memory_store), memory and storage reservations (10028, 10047)."""
_STORE_FAILED: Final = 10077
"""A stream refused a message: its description says which limit ("maximum bytes exceeded"...)."""

TRANSIENT_API: Final = (
    nats.errors.TimeoutError,
    asyncio.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.ServiceUnavailableError,
)
"""JetStream API failures that a leader election or a reconnect causes: worth asking again."""


class NoResponders(BrokerError):
    """A core request nobody listens to (no subscriber, or none in the queue group)."""


class SequenceConflict(BrokerError):
    """A compare-and-set publish (``Nats-Expected-Last-Subject-Sequence``) found another last
    sequence on its subject: someone wrote the key in between."""


def gone(e: BaseException) -> bool:
    """Whether an error may mean that the stream is gone (no responders, stream not found)."""
    if isinstance(e, (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError)):
        return True
    code = getattr(e, "err_code", None)
    if isinstance(e, nats.js.errors.ServiceUnavailableError) and code is None:
        return True  # nats-py's JetStream manager reports no responders this way
    return isinstance(e, nats.js.errors.NotFoundError) and code == STREAM_NOT_FOUND


def storage_full(e: BaseException) -> TypeGuard[nats.js.errors.APIError]:
    """Whether JetStream refused for want of storage: no retry helps until an operator acts."""
    if not isinstance(e, nats.js.errors.APIError):
        return False
    # nats-py's KV errors (KeyNotFoundError...) are APIErrors that never set these attributes.
    code = getattr(e, "err_code", None)
    return code in _STORAGE_FULL or (code == _STORE_FAILED and "exceeded" in (getattr(e, "description", "") or ""))


def full_error(e: nats.js.errors.APIError, what: str) -> StorageFull:
    return StorageFull(
        f"JetStream refused {what}: {e.description} (err_code {e.err_code}): the server, the account or the "
        "stream is out of storage. Free disk space, raise the server's jetstream max_file_store or the "
        "account's JetStream limits (or the stream's max_bytes/max_msgs), purge old messages, or start "
        "workers to drain the queues",
        e.err_code or 0,
    )


def describe(e: BaseException | None) -> str:
    """An exception as text with any URL credentials removed."""
    if e is None:
        return "unknown error"
    text = str(e) or type(e).__name__
    return re.sub(r"(\w+://)[^@/\s]+@", r"\1***@", text)
