"""The dashboard's auth and Host checks, without a server: who gets in, what a 401 says, what
``repr`` never shows; and that ``natask dashboard`` without the extra names the pip command."""

from __future__ import annotations

import base64
import sys

import pytest

from natask.dashboard import Auth, check_binding, require_web
from natask.dashboard.auth import TOKEN_COOKIE, HostCheck
from natask.errors import ConfigError

TOKEN = "t0k3n-0123456789abcdef"


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_lets_in_each_configured_user_and_no_one_else() -> None:
    auth = Auth.of(["admin:s3cret", "ops:hunter2:with:colons"])
    assert auth.user(basic("admin", "s3cret"), {}) == "admin"
    assert auth.user(basic("ops", "hunter2:with:colons"), {}) == "ops"
    for headers in (basic("admin", "hunter2:with:colons"), basic("admin", "s3cre"), basic("", ""), {},
                    {"authorization": "Basic !!!not-base64"}, {"authorization": "Bearer s3cret"}):
        assert auth.user(headers, {}) is None, headers
    assert auth.challenge()["WWW-Authenticate"].startswith("Basic realm=")


def test_a_bearer_token_in_the_header_or_the_cookie() -> None:
    auth = Auth.of(auth_token=TOKEN)
    assert auth.user({"authorization": f"Bearer {TOKEN}"}, {}) == "token"
    assert auth.user({}, {TOKEN_COOKIE: TOKEN}) == "token"
    assert auth.user({"authorization": f"Bearer {TOKEN}x"}, {}) is None
    assert auth.user({}, {TOKEN_COOKIE: "nope"}) is None
    with pytest.raises(ConfigError, match="at least 16 characters"):
        Auth.of(auth_token="short")


def test_a_proxy_header_is_trusted_when_configured_only() -> None:
    auth = Auth.of(auth_header="X-Forwarded-User")
    assert auth.user({"x-forwarded-user": "alice"}, {}) == "alice"
    assert auth.user({"x-forwarded-user": "  "}, {}) is None
    assert auth.user({}, {}) is None
    assert Auth.of(["a:b"]).user({"x-forwarded-user": "alice"}, {}) is None
    assert Auth().user({}, {}) == "anonymous" and not Auth().enabled


def test_bad_credentials_options_are_refused_with_the_fix() -> None:
    for bad in ("admin", "admin:", ":pw"):
        with pytest.raises(ConfigError, match="USER:PASSWORD"):
            Auth.of([bad])
    with pytest.raises(ConfigError, match="X-Forwarded-User"):
        Auth.of(auth_header=" ")


def test_secrets_never_show_in_repr() -> None:
    auth = Auth.of(["admin:s3cret-pw"], auth_token=TOKEN, auth_header="X-User")
    text = repr(auth) + str(auth)
    assert "s3cret-pw" not in text and TOKEN not in text and "admin" not in text
    assert "1 user(s)" in text and "x-user" in text


def test_binding_beyond_loopback_needs_auth_or_the_opt_out() -> None:
    with pytest.raises(ConfigError, match="--basic-auth USER:PASSWORD"):
        check_binding("0.0.0.0", False)
    check_binding("0.0.0.0", False, authenticated=True)
    check_binding("0.0.0.0", True)
    check_binding("127.0.0.1", False)


def test_host_check() -> None:
    loop = HostCheck.listening("127.0.0.1", 5555)
    assert loop.allows("127.0.0.1:5555") and loop.allows("localhost:5555") and loop.allows("[::1]:5555")
    assert not loop.allows("evil.example:5555") and not loop.allows("127.0.0.1:5556")
    proxied = HostCheck.listening("127.0.0.1", 5555, ["dash.example"])
    assert proxied.allows("DASH.example:443") and proxied.allows("dash.example")
    assert HostCheck().allows("anything")  # mounted: the host app checks its hosts


def test_without_the_extra_the_error_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what a missing package looks like to import
    with pytest.raises(ConfigError, match=r'pip install "natask\[dashboard\]"'):
        require_web()


def test_importing_natask_imports_no_web_framework() -> None:
    import subprocess

    code = ("import sys, natask, natask.dashboard; "
            "assert not {'starlette', 'uvicorn'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
