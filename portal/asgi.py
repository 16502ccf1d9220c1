"""ASGI entry point; uvicorn serves the portal, the REST API and the gateway from it."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

application = get_asgi_application()
