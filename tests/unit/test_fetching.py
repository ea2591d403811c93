"""Pure parts of fetching: the pending count of a delivery, the byte-size option."""

from __future__ import annotations

import click
import pytest

from natask.broker.fetch import Fetcher, pending_of
from natask.cli import ByteSize


@pytest.mark.parametrize(("reply", "pending"), [
    ("$JS.ACK.NATASK_T.default.1.12.7.1795960401994694504.4", 4),  # v1: the last token
    ("$JS.ACK.hub.ACCHASH.NATASK_T.default.1.12.7.1795960401994694504.0.rnd", 0),  # v2: before the random token
    ("$JS.ACK.NATASK_T.default.1.12.7", -1),
    ("_INBOX.abc.1", -1),
    (None, -1),
    ("$JS.ACK.S.c.1.2.3.4.x", -1),
])
def test_the_pending_count_comes_from_the_ack_subject(reply: str | None, pending: int) -> None:
    assert pending_of(reply) == pending


@pytest.mark.parametrize(("text", "size"), [
    ("16777216", 16 * 1024 * 1024), ("16MiB", 16 * 1024 * 1024), ("16MB", 16_000_000), ("16M", 16 * 1024 * 1024),
    ("512k", 512 * 1024), ("1 GiB", 1024**3),
])
def test_prefetch_bytes_accepts_sizes_with_units(text: str, size: int) -> None:
    assert ByteSize().convert(text, None, None) == size


@pytest.mark.parametrize("text", ["", "abc", "0", "-5MB", "16 parsecs", "1.5MB"])
def test_prefetch_bytes_rejects_what_is_not_a_size(text: str) -> None:
    with pytest.raises(click.BadParameter, match="not a size"):
        ByteSize().convert(text, None, None)


def test_a_fetcher_needs_a_slot_and_a_byte() -> None:
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        Fetcher(0, lambda msg: None)
    with pytest.raises(ValueError, match="prefetch_bytes must be >= 1"):
        Fetcher(1, lambda msg: None, prefetch_bytes=0)
