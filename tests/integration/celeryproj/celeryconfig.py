"""celeryconfig.py: Celery's setting names; the broker URL is the one changed line."""

import os
from datetime import timedelta

from natask.celery import crontab

broker_url = os.environ.get("CELERYPROJ_BROKER_URL", "nats://127.0.0.1:4222")
result_backend = "rpc://"
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
timezone = "Europe/Oslo"
enable_utc = True
result_expires = timedelta(hours=1)
task_time_limit = 60
task_routes = {
    "tests.integration.celeryproj.tasks.mul": {"queue": "math"},
    "tests.integration.celeryproj.tasks.x*": "sums",
}
beat_schedule = {
    "add-every-second": {
        "task": "tests.integration.celeryproj.tasks.add",
        "schedule": 1.0,
        "args": (16, 16),
    },
    "nightly-xsum": {
        "task": "tests.integration.celeryproj.tasks.xsum",
        "schedule": crontab(hour=3, minute=30, day_of_week="mon-fri"),
        "args": ([1, 2, 3],),
    },
}
