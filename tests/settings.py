"""Test settings: the project settings with one Redis database per pytest-xdist worker.

Each worker flushes its cache between tests, so workers must not share a database.
"""

import os

from portal.settings import *  # noqa: F403
from portal.settings import CACHES, REDIS_URL

_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
if REDIS_URL:
    # Worker gwN uses the database N below the one REDIS_URL names.
    base, _, database = REDIS_URL.rpartition("/")
    CACHES["default"]["LOCATION"] = f"{base}/{int(database or 15) - int(_worker or 0)}"
    TEST_REDIS_URL = CACHES["default"]["LOCATION"]
else:
    TEST_REDIS_URL = ""

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
CELERY_TASK_ALWAYS_EAGER = True
# In-process tests run each request on an event loop that closes with it, so metering
# must finish before the response. The `server` fixture's process keeps the default.
GATEWAY_METER_AFTER_RESPONSE = False
