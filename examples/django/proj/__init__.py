"""A Django project using natask the way Celery's Django guide sets Celery up: importing the project
imports its task app, so ``@shared_task`` in each Django app binds to it."""

from .celery import app as celery_app

__all__ = ["celery_app"]
