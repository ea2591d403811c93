"""A Celery tutorial-style project (proj/celery.py, proj/tasks.py) with only the imports and the broker
URL changed: the migration test (tests/integration/test_celery_migration.py) runs it end to end."""

from .celery import app as celery_app

__all__ = ("celery_app",)
