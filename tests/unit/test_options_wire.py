"""JSON bodies, compressed bodies and the retry decisions of Celery's task options (issue 18)."""

from __future__ import annotations

import zlib

import pytest

from natask import ConfigError, DecodeError, Retry, WorkerLostError
from natask.message import MAX_MESSAGE_BYTES, Envelope, compress, decompress
from natask.options import TaskOptions
from natask.retry import Action, decide


def test_json_body_is_told_by_its_first_byte() -> None:
    env = Envelope(id="abc", task="t.x", args=[1, "two"], kwargs={"k": [3]}, expires=5.0)
    data = env.encode_json()
    assert data.startswith(b"{") and b'"v":1' in data
    back = Envelope.decode(data)
    assert (back.id, back.task, back.args, back.kwargs, back.expires) == ("abc", "t.x", [1, "two"], {"k": [3]}, 5.0)
    with pytest.raises(DecodeError, match="JSON"):
        Envelope.decode(b"{not json")


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_compressed_bodies_round_trip(method: str) -> None:
    env = Envelope(id="abc", task="t.x", args=["a" * 10_000])
    data = compress(env.encode(), method)
    assert len(data) < 1000
    assert Envelope.decode(data).args == ["a" * 10_000]
    assert Envelope.decode(compress(env.encode_json(), method)).args == ["a" * 10_000]


def test_decompression_is_bounded_and_single() -> None:
    bomb = zlib.compress(b"\0" * (MAX_MESSAGE_BYTES + 10))
    with pytest.raises(DecodeError, match="limit"):
        decompress(bomb)
    twice = compress(compress(Envelope(id="abc", task="t.x").encode(), "zlib"), "zlib")
    with pytest.raises(DecodeError, match="twice"):
        Envelope.decode(twice)
    with pytest.raises(ConfigError, match="compression"):
        compress(b"x", "lzma")


def test_default_retry_delay_dont_autoretry_for_retry_kwargs_and_worker_lost() -> None:
    options = TaskOptions(default_retry_delay=7.0, autoretry_for=(OSError,), dont_autoretry_for=(FileNotFoundError,),
                          retry_kwargs={"max_retries": 5})
    assert decide(Retry(), options, 0).countdown == 7.0
    assert decide(Retry(countdown=1), options, 0).countdown == 1.0
    assert decide(ConnectionError(), options, 0).action is Action.RETRY
    assert decide(ConnectionError(), options, 4).action is Action.RETRY  # retry_kwargs max_retries over 3
    assert decide(ConnectionError(), options, 5).reason == "max retries (5) exceeded"
    assert decide(FileNotFoundError(), options, 0).action is Action.FAIL
    assert decide(WorkerLostError("died"), TaskOptions(), 0).action is Action.FAIL
    assert decide(WorkerLostError("died"), TaskOptions(reject_on_worker_lost=True), 0).action is Action.RETRY


def test_task_option_validation() -> None:
    with pytest.raises(ConfigError, match="retry_kwargs takes"):
        TaskOptions(retry_kwargs={"interval": 1})
    with pytest.raises(ConfigError, match="throws"):
        TaskOptions(throws=("ValueError",))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="default_retry_delay"):
        TaskOptions(default_retry_delay=-1)
    with pytest.raises(ConfigError, match="shadow"):
        TaskOptions(shadow="")


def test_celery_retry_policy_maps_to_publish_attempts_and_pauses() -> None:
    from natask.message import PublishRetry
    from natask.task import publish_retry

    assert publish_retry(False, None) == PublishRetry(1)
    assert publish_retry(True, {"max_retries": None}) is None  # natask's own: until publish_timeout
    policy = publish_retry(True, {"max_retries": 4, "interval_start": 0.5, "interval_step": 1, "interval_max": 2})
    assert policy is not None and policy.attempts == 5
    assert [policy.pause(n) for n in range(1, 5)] == [0.5, 1.5, 2.0, 2.0]
    defaults = publish_retry(True, {})
    assert defaults == PublishRetry(4, 0.0, 0.2, 0.2)  # Celery's defaults
    for bad, match in (({"max_retries": -1}, "max_retries"), ({"max_retries": True}, "max_retries"),
                       ({"interval_step": "1"}, "interval_step"), ({"interval_max": 1e9}, "interval_max"),
                       ({"errback": 1}, "retry_policy takes")):
        with pytest.raises(ConfigError, match=match):
            publish_retry(True, bad)
    with pytest.raises(ConfigError, match="retry must be True or False"):
        publish_retry(1, None)
