"""Celery's ``proj/celery.py`` for Django, with only the import changed (``natask.celery``).

    natask worker -A proj            # from examples/django/, finds proj.celery:app
"""

import os

from natask.celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
# Every CELERY_* name in Django's settings (CELERY_BROKER_URL is broker_url, ...).
app.config_from_object("django.conf:settings", namespace="CELERY")
# tasks.py of every app in INSTALLED_APPS.
app.autodiscover_tasks()
