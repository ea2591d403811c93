"""proj/tasks.py: ``from celery import shared_task`` became ``natask.celery``."""

from natask.celery import shared_task


@shared_task
def add(x, y):
    return x + y


@shared_task
def mul(x, y):
    return x * y


@shared_task
def xsum(numbers):
    return sum(numbers)


@shared_task(bind=True)
def whoami(self):
    return self.request.queue
