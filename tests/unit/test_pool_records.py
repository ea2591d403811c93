"""Exceptions cross the process pool's pipe as msgpack records (no pickle on any natask channel)."""

from __future__ import annotations

from natask.errors import MaxRetriesExceededError, Retry, StorageFull
from natask.message import dumps, loads
from natask.worker.processes import exception_from, exception_record


class Odd(Exception):
    def __init__(self, code: int, *, where: str) -> None:
        super().__init__(code)
        self.where = where
        self.handle = object()  # not carried: msgpack cannot encode it


def crossed(exc: BaseException) -> BaseException:
    return exception_from(loads(dumps(exception_record(exc))))


def test_a_retry_crosses_with_its_cause_countdown_and_limit() -> None:
    retry = Retry(exc=KeyError("k"), countdown=5)
    retry.max_retries = 2  # type: ignore[attr-defined]
    back = crossed(retry)
    assert isinstance(back, Retry) and back.countdown == 5 and back.max_retries == 2  # type: ignore[attr-defined]
    assert isinstance(back.exc, KeyError) and back.exc.args == ("k",)


def test_classes_with_their_own_init_keep_their_attributes() -> None:
    back = crossed(Odd(7, where="db"))
    assert type(back) is Odd and back.args == (7,) and back.where == "db"
    assert not hasattr(back, "handle")
    full = crossed(StorageFull("no room", 10047))
    assert isinstance(full, StorageFull) and full.err_code == 10047 and str(full) == "no room"
    assert crossed(MaxRetriesExceededError("done", "t1", 3)).retries == 3  # type: ignore[attr-defined]


def test_a_class_this_process_cannot_find_is_named_in_a_runtime_error() -> None:
    record = exception_record(ValueError("x"))
    record["module"] = "no_such_module_here"
    back = exception_from(record)
    assert type(back) is RuntimeError and "no_such_module_here.ValueError: x" in str(back)
    assert type(exception_from({"module": "builtins", "name": "print", "args": [], "attrs": {}})) is RuntimeError
