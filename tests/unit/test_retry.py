"""Retry policy: the pure backoff function and ``decide`` (no server, no sleeps)."""

from __future__ import annotations

import random

from natask import Reject, Retry, TimeLimitExceeded
from natask.retry import Decision, backoff, decide
from natask.task import TaskOptions


def test_backoff_grows_exponentially_without_jitter() -> None:
    assert [backoff(n, 1.0, 1000.0, False) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert [backoff(n, 0.5, 1000.0, False) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]


def test_backoff_is_capped_at_maximum() -> None:
    assert backoff(3, 2.0, 10.0, False) == 10.0
    assert backoff(10, 2.0, 300.0, False) == 300.0
    assert backoff(10_000, 2.0, 300.0, False) == 300.0  # no overflow for huge retry counts


def test_backoff_zero_base_is_zero() -> None:
    assert backoff(5, 0.0, 100.0, False) == 0.0
    assert backoff(5, 0.0, 100.0, True, random.Random(1)) == 0.0


def test_backoff_jitter_stays_within_zero_and_cap() -> None:
    rng = random.Random(1234)
    for retries in range(12):
        cap = min(60.0, 1.5 * 2**retries)
        draws = [backoff(retries, 1.5, 60.0, True, rng) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in draws)
        # full jitter spreads over the range rather than sitting at the cap
        assert min(draws) < cap * 0.25 and max(draws) > cap * 0.75


def test_backoff_jitter_is_reproducible_with_a_seeded_rng() -> None:
    a = [backoff(n, 1.0, 100.0, True, random.Random(7)) for n in range(5)]
    b = [backoff(n, 1.0, 100.0, True, random.Random(7)) for n in range(5)]
    assert a == b
    assert a != [backoff(n, 1.0, 100.0, False) for n in range(5)]


def opts(**kw: object) -> TaskOptions:
    base: dict[str, object] = {"retry_jitter": False, "retry_backoff": 2.0, "retry_backoff_max": 100.0}
    base.update(kw)
    return TaskOptions(**base)  # type: ignore[arg-type]


def test_reject_rejects_with_reason() -> None:
    d = decide(Reject("bad input"), opts(autoretry_for=(Exception,)), 0)
    assert d == Decision("reject", reason="bad input")


def test_retry_honours_countdown() -> None:
    assert decide(Retry(countdown=5), opts(), 0) == Decision("retry", countdown=5.0)
    assert decide(Retry(countdown=0), opts(), 2) == Decision("retry", countdown=0.0)


def test_retry_negative_countdown_is_clamped() -> None:
    assert decide(Retry(countdown=-3), opts(), 0).countdown == 0.0


def test_retry_without_countdown_uses_backoff() -> None:
    assert decide(Retry(), opts(), 0) == Decision("retry", countdown=2.0)
    assert decide(Retry(), opts(), 2) == Decision("retry", countdown=8.0)
    assert decide(Retry(), opts(max_retries=10), 9) == Decision("retry", countdown=100.0)


def test_retry_works_without_autoretry_for() -> None:
    assert opts().autoretry_for == ()
    assert decide(Retry(exc=ValueError("x")), opts(), 0).action == "retry"


def test_autoretry_for_matches_subclasses() -> None:
    o = opts(autoretry_for=(OSError,))
    assert decide(ConnectionResetError(), o, 0) == Decision("retry", countdown=2.0)
    assert decide(TimeoutError(), o, 1) == Decision("retry", countdown=4.0)
    assert decide(OSError(), o, 0).action == "retry"


def test_autoretry_for_several_types() -> None:
    o = opts(autoretry_for=(KeyError, ValueError))
    assert decide(KeyError("k"), o, 0).action == "retry"
    assert decide(UnicodeDecodeError("utf-8", b"", 0, 1, "x"), o, 0).action == "retry"  # a ValueError
    assert decide(TypeError(), o, 0) == Decision("fail")


def test_non_matching_exception_fails_without_reason() -> None:
    d = decide(ZeroDivisionError(), opts(autoretry_for=(OSError,)), 0)
    assert d == Decision("fail")
    assert d.reason == ""
    assert decide(RuntimeError(), opts(), 0) == Decision("fail")


def test_time_limit_is_not_autoretried() -> None:
    assert decide(TimeLimitExceeded("slow"), opts(autoretry_for=(Exception,)), 0).action == "fail"


def test_max_retries_exhaustion_fails_with_reason() -> None:
    o = opts(autoretry_for=(OSError,), max_retries=3)
    assert [decide(OSError(), o, n).action for n in range(3)] == ["retry"] * 3
    d = decide(OSError(), o, 3)
    assert d.action == "fail"
    assert "max retries (3) exceeded" in d.reason
    assert decide(Retry(countdown=1), o, 3).action == "fail"
    assert decide(Retry(countdown=1), o, 7).action == "fail"


def test_max_retries_zero_never_retries() -> None:
    o = opts(autoretry_for=(OSError,), max_retries=0)
    assert decide(OSError(), o, 0).action == "fail"


def test_max_retries_none_retries_forever() -> None:
    o = opts(autoretry_for=(OSError,), max_retries=None)
    for n in (0, 3, 100, 10_000):
        d = decide(OSError(), o, n)
        assert d.action == "retry"
        assert d.countdown == min(100.0, 2.0 * 2 ** min(n, 62))
    assert decide(Retry(countdown=1), o, 10_000) == Decision("retry", countdown=1.0)


def test_retry_max_retries_override_from_task_retry() -> None:
    retry = Retry(countdown=1)
    retry.max_retries = 10  # type: ignore[attr-defined]  # what Task.retry(max_retries=10) builds
    assert decide(retry, opts(max_retries=3), 5).action == "retry"
    assert decide(retry, opts(max_retries=3), 10).action == "fail"


def test_retry_max_retries_zero_override_is_honoured() -> None:
    retry = Retry(countdown=1)
    retry.max_retries = 0  # type: ignore[attr-defined]
    assert decide(retry, opts(max_retries=3), 0).action == "fail"


def test_default_options() -> None:
    o = TaskOptions()
    assert o.max_retries == 3
    assert o.retry_jitter is True
    assert o.autoretry_for == ()
