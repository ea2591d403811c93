"""What the NATS layer hands up: a received message (``Message``), and what a task delivery's ack
subject says about it without building nats-py's ``Metadata`` (a datetime among others) per task."""

from __future__ import annotations

from typing import Protocol


class Message(Protocol):
    """A message natask received: a task delivery (which the worker acks, naks, terminates or keeps
    leased) or a core message (RPC, control, events, replies)."""

    subject: str
    reply: str
    data: bytes
    headers: dict[str, str] | None

    async def ack(self) -> None: ...

    async def nak(self, delay: float | None = None) -> None: ...

    async def in_progress(self) -> None: ...

    async def term(self) -> None: ...


def _ack_tokens(msg: Message) -> list[str] | None:
    # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>
    tokens = (msg.reply or "").split(".")
    return tokens if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK" else None


def attempt(msg: Message) -> int:
    """How many times the server has delivered ``msg`` (1 on its first delivery)."""
    tokens = _ack_tokens(msg)
    if tokens is not None:
        return int(tokens[4])
    return int(msg.metadata.num_delivered)  # type: ignore[attr-defined]  # the longer layouts (domains)


def stream_sequence(msg: Message) -> int:
    """The stream sequence of a task delivery (unique per stored message)."""
    tokens = _ack_tokens(msg)
    if tokens is not None:
        return int(tokens[5])
    return int(msg.metadata.sequence.stream)  # type: ignore[attr-defined]
