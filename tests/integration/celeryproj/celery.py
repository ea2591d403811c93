"""proj/celery.py of Celery's "First steps": ``from celery import Celery`` became ``natask.celery``."""

from natask.celery import Celery

app = Celery("proj")
app.config_from_object("tests.integration.celeryproj.celeryconfig")
app.autodiscover_tasks(["tests.integration.celeryproj"])
