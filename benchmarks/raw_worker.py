"""The raw nats-py reference worker: a durable pull consumer, ``fetch`` in batches, ack each.

Run by ``run.py`` as a subprocess, like the natask worker, until SIGTERM:

    python raw_worker.py --url nats://... --stream RAW_X --subject 'rawx.>' --durable raw --mode drain

``drain``: fetch ``--batch`` messages (default 100), ack each.
``rpc``: fetch one message at a time, publish a reply to the subject in its ``Reply-To`` header, ack.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

REPLY_HEADER = "Reply-To"


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(args.url, name="raw-worker")
    js = nc.jetstream(domain=args.domain or None)  # through a leaf node: the hub's JetStream domain
    config = ConsumerConfig(
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=30,
        max_ack_pending=args.max_ack_pending,  # natask's default, so both see the same cap
        max_deliver=-1,
    )
    psub = await js.pull_subscribe(args.subject, durable=args.durable, stream=args.stream, config=config)
    batch = args.batch if args.mode == "drain" else 1
    try:
        while not stop.is_set():
            try:
                msgs = await psub.fetch(batch=batch, timeout=0.5)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue  # idle
            if args.mode == "drain":
                for msg in msgs:
                    await msg.ack()
            else:
                for msg in msgs:
                    reply = (msg.headers or {}).get(REPLY_HEADER)
                    if reply:
                        await nc.publish(reply, b"3")
                    await msg.ack()
    finally:
        # Every fetched message is acked before the next fetch, so there is nothing to drain: close.
        # (nc.drain() with this pull subscription open never returned here, nats-py 2.16, which cost each
        # raw measurement run.py's 15 s stop timeout and a SIGKILL.)
        await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--durable", required=True)
    parser.add_argument("--mode", choices=["drain", "rpc"], default="drain")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--max-ack-pending", type=int, default=1000)
    parser.add_argument("--domain", default="", help="JetStream domain of the stream (a worker on a leaf node)")
    asyncio.run(main(parser.parse_args()))
