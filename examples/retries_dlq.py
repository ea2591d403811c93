"""Retries with dead letters: automatic retries with backoff, then the dead-letter queue, then a replay.

- ``autoretry_for=(ConnectionError,)`` retries a task that raises one, with exponential backoff
  (``retry_backoff * 2**n``). Each retry is a message the server holds until it is due, so no
  worker keeps a timer and a worker restart loses nothing; the state is ``RETRY`` in between.
- After ``max_retries`` the task goes to the dead-letter stream ``NATASK_DLQ`` with the original
  message, the reason, the error and the attempt count; the caller's ``get()`` raises ``TaskFailed``.
- ``raise natask.Reject(...)`` dead-letters at once (no retry), and a call of a task no worker
  knows is dead-lettered as ``unknown task``.
- ``natask.dlq.DeadLetters(app)`` lists, replays and purges them (the ``natask dlq`` CLI does the
  same): once the cause is fixed, a replay runs the task again under its original id.

    python examples/retries_dlq.py         # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import os

from natask import Natask, Reject, Task, TaskFailed
from natask.dlq import DeadLetters
from natask.worker import Worker

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

app = Natask("retries", subject_prefix="retries")

gateway_up = False  # the mail gateway is down until we "fix" it below


@app.task(name="billing.charge", bind=True, autoretry_for=(ConnectionError,), max_retries=3,
          retry_backoff=0.1, retry_jitter=False)
def charge(self: Task[..., str], order_id: int) -> str:
    attempt = self.request.retries + 1
    if attempt < 3:
        print(f"  charge({order_id}) attempt {attempt}: payment service busy, will retry")
        raise ConnectionError("payment service busy")
    print(f"  charge({order_id}) attempt {attempt}: ok")
    return f"charged order {order_id}"


@app.task(name="billing.send_receipt", bind=True, autoretry_for=(ConnectionError,), max_retries=2,
          retry_backoff=0.1, retry_jitter=False)
def send_receipt(self: Task[..., str], order_id: int) -> str:
    if not gateway_up:
        print(f"  send_receipt({order_id}) attempt {self.request.retries + 1}: mail gateway down")
        raise ConnectionError("mail gateway unreachable")
    print(f"  send_receipt({order_id}): sent")
    return f"receipt for order {order_id} sent"


@app.task(name="billing.refund")
def refund(order_id: int) -> str:
    raise Reject(f"order {order_id} was never charged")  # no retry: straight to the DLQ


async def main() -> None:
    global gateway_up
    # unknown_grace: how long a task name no worker knows keeps coming back (a rolling deploy's new
    # code may be on its way) before it is dead-lettered; 20 s by default, shortened for the demo.
    async with app, Worker(app, concurrency=4, unknown_grace=2):
        print("charge: fails twice, succeeds on the third attempt")
        charged = await charge.adelay(1)
        print(f"  -> {await charged.aget(timeout=15)!r} (state {charged.state})")

        print("send_receipt: the gateway stays down, retries run out")
        receipt = await send_receipt.adelay(1)
        try:
            await receipt.aget(timeout=15)
        except TaskFailed as e:
            print(f"  -> TaskFailed: {e.exc_type}: {e.message}")

        print("refund: rejected at once; billing.void: no worker knows that task")
        rejected = await refund.adelay(2)
        unknown = await app.asend_task("billing.void", [3])
        for result in (rejected, unknown):
            try:
                await result.aget(timeout=15)
            except TaskFailed as e:
                print(f"  -> TaskFailed: {e.exc_type}: {e.message}")

        dlq = DeadLetters(app)
        mine = {receipt.id, rejected.id, unknown.id}
        entries = [e for e in await dlq.list() if e.id in mine]
        print(f"dead letters ({len(entries)}):")
        for entry in entries:
            print(f"  {entry.id}  {entry.reason:20}  {entry.task:20}  attempts={entry.attempts}  {entry.error}")

        gateway_up = True
        await receipt.aforget()  # drop the stored FAILURE, so waiting below sees the replay's outcome
        await dlq.replay(receipt.id)
        print(f"gateway fixed, replayed {receipt.id}: {await app.AsyncResult(receipt.id).aget(timeout=15)!r}")
        print(f"purged {await dlq.purge()} remaining dead letter(s)")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    finally:
        if "server" in globals():
            server.close()
