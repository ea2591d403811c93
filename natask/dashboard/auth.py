"""Who may use the dashboard: basic auth, a bearer token, an authenticating proxy's header; and
where it may listen (loopback unless one of them is on) and which Host names it answers to."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import ipaddress
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from ..errors import ConfigError

TOKEN_COOKIE: Final = "natask_dashboard_token"
"""Cookie holding the bearer token once a browser opened ``?token=…`` (EventSource cannot send headers)."""
REALM: Final = "natask dashboard"
"""The basic-auth realm browsers show in their login prompt."""
_LOOPBACK: Final = ("127.0.0.1", "localhost", "::1")
_ANY_ADDRESS: Final = ("0.0.0.0", "::", "")
_SIOCGIFADDR: Final = 0x8915
"""Linux ioctl: an interface's IPv4 address."""


def parse_basic(value: str) -> tuple[str, str]:
    """``user:password`` (``--basic-auth``) as a pair."""
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--basic-auth/basic_auth takes USER:PASSWORD with both parts non-empty "
                          "(e.g. --basic-auth admin:$DASHBOARD_PASSWORD)")
    return user, password


@dataclass(frozen=True)
class Auth:
    """The credentials the dashboard accepts; any one of them lets a request in. Secrets never show
    in ``repr`` (logs, tracebacks)."""

    basic: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    token: str | None = field(default=None, repr=False)
    header: str | None = None
    """A header an authenticating proxy sets (and strips from clients' requests)."""

    @classmethod
    def of(cls, basic_auth: Iterable[str | tuple[str, str]] = (), auth_token: str | None = None,
           auth_header: str | None = None) -> Auth:
        pairs = tuple(parse_basic(b) if isinstance(b, str) else (str(b[0]), str(b[1])) for b in basic_auth)
        if auth_token is not None and len(auth_token) < 16:
            raise ConfigError("--auth-token/auth_token must have at least 16 characters "
                              "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
        if auth_header is not None and not auth_header.strip():
            raise ConfigError("--auth-header/auth_header must name a header, e.g. X-Forwarded-User")
        return cls(pairs, auth_token, auth_header.strip().lower() if auth_header else None)

    @property
    def enabled(self) -> bool:
        return bool(self.basic or self.token or self.header)

    def __repr__(self) -> str:
        return (f"Auth(basic=<{len(self.basic)} user(s)>, token={'<set>' if self.token else None}, "
                f"header={self.header!r})")

    def user(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
        """Who the request comes from (a user name, ``token``, the proxy header's value), or None
        when no accepted credential came with it. ``headers`` with lower-case names."""
        if not self.enabled:
            return "anonymous"
        if self.header:
            value = headers.get(self.header, "").strip()
            if value:
                return value[:200]
        authorization = headers.get("authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if self.token:
            offered = credentials.strip() if scheme.lower() == "bearer" else cookies.get(TOKEN_COOKIE, "")
            if offered and self.token_matches(offered):
                return "token"
        if self.basic and scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            found = None
            for known_user, known_password in self.basic:  # every pair compared: no timing hint of a user
                same_user = hmac.compare_digest(user.encode(), known_user.encode())
                same_password = hmac.compare_digest(password.encode(), known_password.encode())
                if same_user and same_password:
                    found = known_user
            return found
        return None

    def token_matches(self, offered: str) -> bool:
        return self.token is not None and hmac.compare_digest(offered.encode(), self.token.encode())

    def challenge(self) -> dict[str, str]:
        """Headers of a 401: a login prompt in browsers when basic auth is on."""
        if self.basic:
            return {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'}
        if self.token:
            return {"WWW-Authenticate": f'Bearer realm="{REALM}"'}
        return {}


# -- binding -----------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts connections from this machine."""
    if host in _LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, allow_insecure: bool, opt_out: str = "allow_insecure=True",
                  authenticated: bool = False) -> None:
    """Refuse to serve the dashboard beyond loopback without authentication unless the caller opted
    out (``opt_out`` names how, for the message)."""
    if not authenticated and not allow_insecure and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve the dashboard on {host} without authentication: anyone who reaches it can read "
            "tasks and replay dead letters. Pass --basic-auth USER:PASSWORD, --auth-token TOKEN or "
            "--auth-header X-Forwarded-User (basic_auth=, auth_token=, auth_header=), bind 127.0.0.1, "
            f"or pass {opt_out}"
        )


def split_host(value: str) -> tuple[str, int | None]:
    """A Host header as (lower-cased name or address, port or None): ``[::1]:80`` -> ``('::1', 80)``."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":")
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:
        name, port = value, ""
    try:
        return name.rstrip("."), int(port) if port else None
    except ValueError:
        return name, -1  # never matches


def local_names(host: str) -> frozenset[str]:
    """The names a browser may use to reach a dashboard bound to ``host``: that address, this
    machine's host names and their addresses, and (bound to every interface) every interface's
    address."""
    names = {host.strip("[]").lower(), *_LOOPBACK, socket.gethostname().lower(), socket.getfqdn().lower()}
    with contextlib.suppress(OSError):
        names.update(str(info[4][0]).lower() for info in socket.getaddrinfo(socket.gethostname(), None))
    if host in _ANY_ADDRESS:
        names.update(_interface_addresses())
    return frozenset(names)


def _interface_addresses() -> set[str]:
    addresses: set[str] = set()
    if not sys.platform.startswith("linux"):
        return addresses
    import fcntl
    import struct

    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                addresses.add(socket.inet_ntoa(packed[20:24]))
    with contextlib.suppress(OSError), open("/proc/net/if_inet6") as f:
        for line in f:
            addresses.add(str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))))
    return addresses


@dataclass(frozen=True)
class HostCheck:
    """Which Host headers are answered: a DNS-rebinding page reaches the dashboard under a name of
    its own. ``bound`` is the listening address (None: mounted in another app, which owns its hosts)."""

    bound: str | None = None
    port: int = 0
    allowed: frozenset[str] = frozenset()
    """Extra names (``--allowed-host``) the dashboard may be reached by, on any port."""
    names: frozenset[str] = frozenset()

    @classmethod
    def listening(cls, host: str, port: int, allowed: Iterable[str] = ()) -> HostCheck:
        names = frozenset() if is_loopback(host) else local_names(host)
        return cls(host, port, frozenset(split_host(h)[0] for h in allowed), names)

    def allows(self, host: str) -> bool:
        if self.bound is None:
            return True
        name, port = split_host(host)
        if name in self.allowed:
            return True  # e.g. a reverse proxy's name, on its own port
        if is_loopback(self.bound):
            bound = self.bound.strip("[]").lower()
            return name in {"127.0.0.1", "localhost", "::1", bound} and port == self.port
        return name in self.names and (port or 80) == self.port
