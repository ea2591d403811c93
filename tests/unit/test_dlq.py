"""Dead-letter headers are read defensively, and wire text is escaped before it reaches a terminal."""

from __future__ import annotations

import pytest

from natask.cli import printable
from natask.dlq import DeadLetter
from natask.naming import (
    HDR_DLQ_ATTEMPTS,
    HDR_DLQ_ERROR,
    HDR_DLQ_ID,
    HDR_DLQ_REASON,
    HDR_DLQ_SUBJECT,
    HDR_DLQ_TIME,
    HDR_REPLAYS,
    HDR_TASK,
)


def entry(**headers: str) -> DeadLetter:
    return DeadLetter.from_msg(42, b"body", headers)


def test_well_formed_headers() -> None:
    e = entry(**{HDR_DLQ_ID: "abc", HDR_TASK: "t.add", HDR_DLQ_REASON: "rejected", HDR_DLQ_ERROR: "no",
                 HDR_DLQ_ATTEMPTS: "3", HDR_DLQ_TIME: "1700000000.5", HDR_DLQ_SUBJECT: "tasks.default.t.add",
                 HDR_REPLAYS: "2"})
    assert (e.id, e.task, e.reason, e.error, e.attempts, e.time, e.subject, e.replays) == (
        "abc", "t.add", "rejected", "no", 3, 1700000000.5, "tasks.default.t.add", 2)


@pytest.mark.parametrize("value", ["abc", "-1", "1e3", "1_000", " 2", "9" * 30, "", "0x10"])
def test_counts_that_do_not_parse_are_zero(value: str) -> None:
    e = entry(**{HDR_DLQ_ATTEMPTS: value, HDR_REPLAYS: value})
    assert e.attempts == 0 and e.replays == 0


@pytest.mark.parametrize("value", ["soon", "nan", "inf", "-5", "1e400", "1" * 50])
def test_times_that_do_not_parse_are_zero(value: str) -> None:
    assert entry(**{HDR_DLQ_TIME: value}).time == 0.0


@pytest.mark.parametrize("value", [">", "a.b", "a b", "x" * 201, "\x1b[31m"])
def test_an_id_that_is_not_a_task_id_becomes_the_placeholder(value: str) -> None:
    assert entry(**{HDR_DLQ_ID: value}).id == "seq-42"


def test_a_workers_placeholder_names_the_dlq_sequence() -> None:
    # The worker's seq-N counted in the task stream, where the message is gone: the entry's own
    # NATASK_DLQ sequence is what `dlq show seq-N` reads directly.
    assert entry(**{HDR_DLQ_ID: "seq-7"}).id == "seq-42"
    assert entry().id == "seq-42"


def test_texts_are_bounded_and_an_overlong_subject_is_dropped_not_cut() -> None:
    e = entry(**{HDR_DLQ_REASON: "r" * 5000, HDR_DLQ_ERROR: "e" * 5000, HDR_TASK: "t" * 5000,
                 HDR_DLQ_SUBJECT: "tasks.default." + "t" * 5000})
    assert (len(e.reason), len(e.error), len(e.task), e.subject) == (200, 1000, 200, "")


def test_printable_escapes_control_characters() -> None:
    assert printable("a\x1b[31mred\x1b[0m\nnext\r\tx\x00\x7f\x9b") == (
        "a\\x1b[31mred\\x1b[0m\\nnext\\r\\tx\\x00\\x7f\\x9b")
    assert printable("spoof\u202eevil\u2028") == "spoof\\u202eevil\\u2028"
    assert printable("plain text, ünïcode ✓") == "plain text, ünïcode ✓"
    assert printable(5) == "5"
    assert printable("two\nlines\t\x1b[2J\r", lines=True) == "two\nlines\t\\x1b[2J\\r"
