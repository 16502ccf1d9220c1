"""ASGI entry point; uvicorn serves the portal, the REST API and the gateway from it.

Gateway paths (`/v1/...`) go to a lean adapter (`gateway.asgi`) that calls the gateway
views without Django's request handling: sessions, CSRF, messages, allauth and request
signals do nothing for key-authenticated API calls and cost time on every request.
Everything else goes through Django's full stack.
"""

import gc
import os
import sys

import django
from django.core.handlers.asgi import ASGIHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django.setup(set_prefix=False)

# Imported after setup: the gateway modules need the app registry.
from gateway.asgi import gateway_application  # noqa: E402
from gateway.metering import (  # noqa: E402
    metering_process_start,
    metering_process_stop,
    metering_queues_drain,
)
from gateway.proxy import background_tasks_drain  # noqa: E402

GATEWAY_PREFIX = "/v1/"

# Metering, and the admission of keys not yet in this process's memory, run in worker
# threads. With CPython's default switch interval (5 ms) a busy thread can keep the event
# loop from the GIL for that long, which showed as a p99 latency tail in bench/gateway.py.
sys.setswitchinterval(0.0005)

# Everything loaded so far lives as long as the process. Freezing it keeps the garbage
# collector from scanning those objects again in every full collection.
gc.freeze()

portal_application = ASGIHandler()


async def lifespan(receive, send) -> None:
    """Start the metering process, and on shutdown write every charge still queued."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            metering_process_start()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await background_tasks_drain()
            await metering_queues_drain()
            metering_process_stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "http" and scope["path"].startswith(GATEWAY_PREFIX):
        await gateway_application(scope, receive, send)
    else:
        await portal_application(scope, receive, send)
