"""Ids that become KV keys are checked where a handle is made: no wildcard ever reaches the results,
claims or revoked buckets (a ``>`` key would read, or delete, every stored result)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from natask import AsyncResult, ConfigError, GroupResult, Natask, chain, group
from natask.naming import check_kv_key, check_task_id


@pytest.fixture
def app() -> Iterator[Natask]:
    a = Natask("unit", servers=["nats://127.0.0.1:1"])  # never connects: every check fails before I/O
    try:
        yield a
    finally:
        a.close()


BAD_IDS = [">", "*", "a.>", "a.b", "a b", "", "x" * 201, "a\x1b[31m", "a:1"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_async_result_refuses_what_is_not_a_task_id(app: Natask, bad: str) -> None:
    with pytest.raises(ConfigError, match=r"invalid task id .*letters, digits"):
        app.AsyncResult(bad)
    with pytest.raises(ConfigError, match="invalid task id"):
        AsyncResult(app, bad)


def test_the_error_quotes_a_long_id_cut_to_100_characters(app: Natask) -> None:
    with pytest.raises(ConfigError) as caught:
        app.AsyncResult("a" * 150 + ">")
    assert repr("a" * 100) in str(caught.value) and "a" * 101 not in str(caught.value)
    with pytest.raises(ConfigError, match="invalid task id a NoneType"):
        app.AsyncResult(None)  # type: ignore[arg-type]


def test_good_ids_make_handles(app: Natask) -> None:
    for good in ("abc", "0f" * 16, "order-7_x=/y", "a" * 200):
        assert app.AsyncResult(good).id == good
        assert check_task_id(good) == good


@pytest.mark.parametrize("bad", [">", "a.*", "a..b", ".a", "a.", "", "a b", "k" * 1025])
def test_claim_keys_follow_kv_key_rules_without_wildcards(app: Natask, bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid claim key"):
        app.claim(bad)
    with pytest.raises(ConfigError):
        check_kv_key(bad)


def test_claim_keys_may_have_dots(app: Natask) -> None:
    assert check_kv_key("charge.order-7/eu=1") == "charge.order-7/eu=1"


def test_group_ids_are_checked_before_anything_is_published(app: Natask) -> None:
    add = app.task(name="t.add")(lambda x, y: x + y)
    with pytest.raises(ConfigError, match="invalid task id '>'"):
        GroupResult(app, ">", [])
    with pytest.raises(ConfigError, match=r"invalid task id 'g\.>'"):
        group(add.s(1, 2), add.s(3, 4)).apply_async(task_id="g.>")
    with pytest.raises(ConfigError, match=r"invalid task id '\*'"):
        chain(add.s(1, 2), add.s(3).set(task_id="*")).apply_async()


def test_revoke_checks_the_id(app: Natask) -> None:
    with pytest.raises(ConfigError, match="invalid task id"):
        app.client.portal.run(app.client.revoke(">", False))
