"""Entry point of the metering process that the gateway server starts (gateway.metering).

The process is started with the `spawn` method, so it imports this module afresh and
sets Django up here, before anything that needs the app registry.
"""

import logging
import os

import django
from django.apps import apps

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
# The server imports this module too, after its own setup; setting up twice would
# configure logging twice.
if not apps.ready:
    django.setup()

from gateway.settlement import usage_settle_batch  # noqa: E402  (needs the app registry)

logger = logging.getLogger(__name__)


def main(connection, niceness: int = 0) -> None:
    """Record and charge batches sent over `connection` until a None arrives.

    `niceness` lowers the process's CPU priority, so on a busy machine request handling
    goes first. Charges then land a little later, and reservations cover their cost until
    they do.
    """
    os.nice(niceness)
    while True:
        settlements = connection.recv()
        if settlements is None:
            return
        try:
            records = usage_settle_batch(settlements)
        except Exception as error:
            # Reported to the server, whose waiters each receive it.
            logger.exception("Metering process failed on a batch of %s", len(settlements))
            connection.send((None, f"{type(error).__name__}: {error}"))
            continue
        connection.send(([record.pk for record in records], None))
