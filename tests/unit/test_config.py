"""Config: constructor arguments over NATASK_* / NATS_* variables, validation and URL redaction."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest

from natask import ConfigError, Natask
from natask.config import DEFAULT_SERVER, Config, check_queue_name, redact_url, seconds

ENV_VARS = [
    "NATS_URL",
    "NATS_USER",
    "NATS_PASSWORD",
    "NATS_TOKEN",
    "NATS_CREDS",
    "NATS_NKEY_SEED",
    "NATS_INBOX_PREFIX",
    *[k for k in os.environ if k.startswith("NATASK_")],
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def test_defaults() -> None:
    cfg = Config.build("shop")
    assert cfg.name == "shop"
    assert cfg.servers == (DEFAULT_SERVER,) == ("nats://127.0.0.1:4222",)
    assert cfg.subject_prefix == "tasks"
    assert cfg.default_queue == "default"
    assert cfg.result_ttl == 86400.0
    assert cfg.ack_wait == 30.0
    assert cfg.max_ack_pending == 1000
    assert cfg.stream_replicas == 1
    assert dict(cfg.connect_options) == {}


def test_nats_url_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://a:4222, nats://b:4223 ,,nats://c:4224")
    assert Config.build("shop").servers == ("nats://a:4222", "nats://b:4223", "nats://c:4224")


def test_servers_argument_str_or_sequence_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://env:4222")
    assert Config.build("shop", "nats://x:1,nats://y:2").servers == ("nats://x:1", "nats://y:2")
    assert Config.build("shop", ["nats://x:1"]).servers == ("nats://x:1",)
    assert Config.build("shop", ("nats://x:1", "nats://z:3")).servers == ("nats://x:1", "nats://z:3")


def test_natask_env_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATASK_SUBJECT_PREFIX", "jobs")
    monkeypatch.setenv("NATASK_DEFAULT_QUEUE", "bulk")
    monkeypatch.setenv("NATASK_RESULT_TTL", "60")
    monkeypatch.setenv("NATASK_ACK_WAIT", "2.5")
    monkeypatch.setenv("NATASK_MAX_ACK_PENDING", "17")
    monkeypatch.setenv("NATASK_STREAM_REPLICAS", "3")
    monkeypatch.setenv("NATASK_PUBLISH_TIMEOUT", "4")
    cfg = Config.build("shop")
    assert cfg.subject_prefix == "jobs"
    assert cfg.default_queue == "bulk"
    assert cfg.result_ttl == 60.0
    assert cfg.ack_wait == 2.5
    assert cfg.max_ack_pending == 17
    assert cfg.stream_replicas == 3
    assert cfg.publish_timeout == 4.0


def test_empty_env_values_mean_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NATS_URL", "NATASK_SUBJECT_PREFIX", "NATASK_ACK_WAIT", "NATASK_STREAM_REPLICAS"):
        monkeypatch.setenv(var, "")
    cfg = Config.build("shop")
    assert cfg.servers == (DEFAULT_SERVER,)
    assert cfg.subject_prefix == "tasks"
    assert cfg.ack_wait == 30.0
    assert cfg.stream_replicas == 1


def test_explicit_arguments_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATASK_SUBJECT_PREFIX", "jobs")
    monkeypatch.setenv("NATASK_DEFAULT_QUEUE", "bulk")
    monkeypatch.setenv("NATASK_RESULT_TTL", "60")
    monkeypatch.setenv("NATASK_ACK_WAIT", "2.5")
    monkeypatch.setenv("NATASK_MAX_ACK_PENDING", "17")
    monkeypatch.setenv("NATASK_STREAM_REPLICAS", "3")
    monkeypatch.setenv("NATASK_PUBLISH_TIMEOUT", "4")
    monkeypatch.setenv("NATS_USER", "envuser")
    cfg = Config.build(
        "shop",
        "nats://h:1",
        subject_prefix="mine",
        default_queue="orders",
        result_ttl=timedelta(minutes=2),
        ack_wait=10,
        max_ack_pending=5,
        stream_replicas=1,
        publish_timeout=timedelta(seconds=7),
        connect_options={"user": "argsuser", "password": "pw"},
    )
    assert cfg.subject_prefix == "mine"
    assert cfg.default_queue == "orders"
    assert cfg.result_ttl == 120.0
    assert cfg.ack_wait == 10.0
    assert cfg.max_ack_pending == 5
    assert cfg.stream_replicas == 1
    assert cfg.publish_timeout == 7.0
    assert dict(cfg.connect_options) == {"user": "argsuser", "password": "pw"}


def test_nats_credential_env_feeds_connect_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_USER", "u")
    monkeypatch.setenv("NATS_PASSWORD", "p")
    monkeypatch.setenv("NATS_CREDS", "/path/x.creds")
    cfg = Config.build("shop", connect_options={"token": "t"})
    assert dict(cfg.connect_options) == {
        "user": "u",
        "password": "p",
        "user_credentials": "/path/x.creds",
        "token": "t",
    }


@pytest.mark.parametrize(
    "var,value",
    [
        ("NATASK_ACK_WAIT", "thirty"),
        ("NATASK_RESULT_TTL", "1d"),
        ("NATASK_MAX_ACK_PENDING", "many"),
        ("NATASK_STREAM_REPLICAS", "three"),
        ("NATASK_PUBLISH_TIMEOUT", "5s"),
    ],
)
def test_invalid_env_number_names_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        Config.build("shop")
    assert var in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    "var,value,words",
    [
        ("NATASK_STREAM_REPLICAS", "7", "stream_replicas"),
        ("NATASK_STREAM_REPLICAS", "0", "stream_replicas"),
        ("NATASK_MAX_ACK_PENDING", "0", "max_ack_pending"),
        ("NATASK_ACK_WAIT", "0.5", "ack_wait"),
        ("NATASK_RESULT_TTL", "0", "result_ttl"),
        ("NATASK_SUBJECT_PREFIX", "a.b", "subject_prefix"),
        ("NATASK_SUBJECT_PREFIX", "_hidden", "subject_prefix"),
        ("NATASK_DEFAULT_QUEUE", "_sched", "queue"),
        ("NATASK_DEFAULT_QUEUE", "a b", "queue"),
    ],
)
def test_out_of_range_env_values(monkeypatch: pytest.MonkeyPatch, var: str, value: str, words: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=words):
        Config.build("shop")


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"name": ""}, "name"),
        ({"servers": []}, "servers"),
        ({"servers": " , "}, "servers"),
        ({"subject_prefix": "tasks.>"}, "subject_prefix"),
        ({"subject_prefix": "a b"}, "subject_prefix"),
        ({"default_queue": "or.ders"}, "queue"),
        ({"default_queue": "_x"}, "queue"),
        ({"stream_replicas": 6}, "stream_replicas"),
        ({"stream_replicas": 0}, "stream_replicas"),
        ({"max_ack_pending": 0}, "max_ack_pending"),
        ({"ack_wait": -1}, "ack_wait"),
        ({"ack_wait": 0.2}, "ack_wait"),
        ({"result_ttl": timedelta(seconds=-5)}, "result_ttl"),
        ({"publish_timeout": 0.01}, "publish_timeout"),
    ],
)
def test_invalid_arguments_raise_config_error(kwargs: dict[str, object], words: str) -> None:
    args: dict[str, object] = {"name": "shop", **kwargs}
    with pytest.raises(ConfigError, match=words):
        Config.build(**args)  # type: ignore[arg-type]


def test_natask_constructor_uses_config_and_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="stream_replicas"):
        Natask("shop", servers="nats://127.0.0.1:1", stream_replicas=9)
    app = Natask("shop", servers="nats://127.0.0.1:1", subject_prefix="p1", ack_wait=timedelta(seconds=5))
    try:
        assert app.config.subject_prefix == "p1"
        assert app.config.ack_wait == 5.0
        assert app.names.stream == "NATASK_P1"
    finally:
        app.close()


@pytest.mark.parametrize("source", ["env", "arg"])
def test_nan_duration_is_rejected(monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    if source == "env":
        monkeypatch.setenv("NATASK_ACK_WAIT", "nan")
        with pytest.raises(ConfigError, match="ack_wait"):
            Config.build("shop")
    else:
        with pytest.raises(ConfigError, match="ack_wait"):
            Config.build("shop", ack_wait=float("nan"))


def test_seconds_converts_and_rejects_negatives() -> None:
    assert seconds(timedelta(minutes=1, milliseconds=500), "x") == 60.5
    assert seconds(3, "x") == 3.0
    with pytest.raises(ConfigError, match="countdown"):
        seconds(-0.001, "countdown")


@pytest.mark.parametrize("name", ["default", "orders", "Q-1_b", "0"])
def test_check_queue_name_accepts(name: str) -> None:
    assert check_queue_name(name) == name


@pytest.mark.parametrize("name", ["", "_sched", "_", "a.b", "a b", "a*", ">", "ä", 5])
def test_check_queue_name_rejects(name: object) -> None:
    with pytest.raises(ConfigError, match="queue"):
        check_queue_name(name)  # type: ignore[arg-type]


# -- redaction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,expected",
    [
        ("nats://alice:s3cret@nats.example.com:4222", "nats://***@nats.example.com:4222"),
        ("tls://alice:s3cret@h:4443/path", "tls://***@h:4443/path"),
        ("nats://tokenvalue@h:4222", "nats://***@h:4222"),
        ("nats://h:4222", "nats://h:4222"),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://u:p@h", "nats://***@h"),
        ("alice:s3cret@h:4222", "***@h:4222"),  # nats-py adds the scheme itself
        ("h:4222", "h:4222"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_hides_user_and_password() -> None:
    out = redact_url("nats://alice:s3cret@h:4222")
    assert "alice" not in out and "s3cret" not in out


def test_redact_url_with_bad_port_still_redacts() -> None:
    out = redact_url("nats://alice:s3cret@h:notaport")
    assert "s3cret" not in out and "alice" not in out


def test_safe_servers_redacts_every_server() -> None:
    cfg = Config.build("shop", ["nats://alice:pw1@a:4222", "nats://b:4222", "nats://tok@c:4222"])
    assert cfg.safe_servers == "nats://***@a:4222, nats://b:4222, nats://***@c:4222"
    assert "pw1" not in cfg.safe_servers and "alice" not in cfg.safe_servers and "tok" not in cfg.safe_servers


def test_app_repr_hides_credentials() -> None:
    app = Natask("shop", servers="nats://alice:s3cret@127.0.0.1:1")
    try:
        assert "s3cret" not in repr(app) and "alice" not in repr(app)
        assert "127.0.0.1:1" in repr(app)
    finally:
        app.close()


def test_config_repr_hides_url_credentials_and_connect_option_values() -> None:
    import ssl

    ctx = ssl.create_default_context()
    cfg = Config.build("shop", ["nats://alice:pw-in-url@a:4222", "nats://tok-in-url@b:4222"],
                       connect_options={"user": "bob", "password": "opt-pass", "token": "opt-token",
                                        "user_credentials": "/secret/path.creds", "nkeys_seed": "SUAEXAMPLESEED",
                                        "signature_cb": lambda nonce: b"sig", "tls": ctx})
    app = Natask("shop", servers=list(cfg.servers))
    try:
        for text in (repr(cfg), str(cfg), repr(app.config), str(app.config), repr(app)):
            for secret in ("alice", "pw-in-url", "tok-in-url"):
                assert secret not in text
    finally:
        app.close()
    text = repr(cfg)
    for secret in ("bob", "opt-pass", "opt-token", "/secret/path", "SUAEXAMPLESEED", "lambda", "SSLContext"):
        assert secret not in text
    assert "servers=('nats://***@a:4222', 'nats://***@b:4222')" in text
    assert ("connect_options={'user': '***', 'password': '***', 'token': '***', 'user_credentials': '***', "
            "'nkeys_seed': '***', 'signature_cb': '***', 'tls': '***'}") in text
    assert text.startswith("Config(name='shop', ") and "subject_prefix='tasks'" in text


def test_inbox_prefix_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_INBOX_PREFIX", "_INBOX.web")
    assert Config.build("shop").connect_options["inbox_prefix"] == "_INBOX.web"


def test_config_is_frozen() -> None:
    cfg = Config.build("shop")
    with pytest.raises(AttributeError):
        cfg.subject_prefix = "other"  # type: ignore[misc]


def test_duplicate_window_defaults_to_two_minutes_and_covers_publish_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Config.build("a").duplicate_window == 120.0
    monkeypatch.setenv("NATASK_DUPLICATE_WINDOW", "45")
    assert Config.build("a").duplicate_window == 45.0
    with pytest.raises(ConfigError, match="at least publish_timeout"):
        Config.build("a", duplicate_window=10)
    assert Config.build("a", duplicate_window=10, publish_timeout=5).duplicate_window == 10.0


def test_every_option_is_typed_and_documented_once() -> None:
    """The option table is the one description: ``Options`` types the same names, and the README's
    configuration table names each option and its environment variable."""
    from natask.config import OPTIONS, Options

    names = {f.name for f in OPTIONS}
    assert set(Options.__annotations__) == names | {"connect_options"}
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## Development")]
    for f in OPTIONS:
        assert f"`{f.name}`" in table and f"`{f.metadata['env']}`" in table, f.name


def test_unknown_options_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown option.*ack_wiat"):
        Config.build("shop", ack_wiat=3)


def test_jetstream_domain_is_one_subject_token(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Natask("d").config.jetstream_domain == ""  # the JetStream of the server connected to
    for bad in ("a.b", "hub*", " hub", 5):
        with pytest.raises(ConfigError, match="invalid jetstream_domain"):
            Natask("d", jetstream_domain=bad)  # type: ignore[arg-type]
    monkeypatch.setenv("NATASK_JS_DOMAIN", "hub")
    assert Natask("d").config.jetstream_domain == "hub"
    assert Natask("d", jetstream_domain="edge-1").config.jetstream_domain == "edge-1"
    monkeypatch.setenv("NATASK_JS_DOMAIN", "a>b")
    with pytest.raises(ConfigError, match="invalid jetstream_domain 'a>b'"):
        Natask("d")
