"""ASGI entry point; uvicorn serves the portal, the REST API and the gateway from it.

Gateway paths (`/v1/...`) go to a Django handler without the portal's middleware:
sessions, CSRF, messages and allauth do nothing for key-authenticated API calls and
cost time on every request. Everything else goes through the full stack.
"""

import os

import django
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django.setup(set_prefix=False)

from gateway.proxy import background_tasks_drain  # noqa: E402  (needs the app registry)

GATEWAY_PREFIX = "/v1/"


class GatewayHandler(ASGIHandler):
    """Serve the gateway views with no middleware."""

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        self._middleware_chain = convert_exception_to_response(self._get_response_async)


portal_application = ASGIHandler()
gateway_application = GatewayHandler()


async def lifespan(receive, send) -> None:
    """Answer startup, and on shutdown wait for metering that runs after responses."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await background_tasks_drain()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "http" and scope["path"].startswith(GATEWAY_PREFIX):
        await gateway_application(scope, receive, send)
    else:
        await portal_application(scope, receive, send)

