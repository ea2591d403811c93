"""Tasks of the orders app: ``@shared_task`` binds them to the project's app (``proj.celery``)."""

from natask.celery import shared_task


@shared_task
def add(x: int, y: int) -> int:
    return x + y


@shared_task
def send_receipt(order: str) -> str:
    return f"receipt for {order} sent"
