"""Django settings of the example project: the minimum Django needs, plus natask's CELERY_* settings."""

import os

SECRET_KEY = "example-only-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "proj.urls"
INSTALLED_APPS = ["orders"]
MIDDLEWARE: list[str] = []
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True

# natask reads these through app.config_from_object("django.conf:settings", namespace="CELERY").
CELERY_BROKER_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
CELERY_TASK_DEFAULT_QUEUE = "django"
CELERY_TASK_TIME_LIMIT = 30
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_ROUTES = {"orders.tasks.send_receipt": {"queue": "mail"}}
