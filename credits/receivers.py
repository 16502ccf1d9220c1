"""dj-stripe webhook receivers.

dj-stripe verifies the signature and records the event, once per Stripe event id, then
sends these signals inside its transaction; a receiver that raises rolls the event back,
so Stripe redelivers it.
"""

import logging

from djstripe.event_handlers import djstripe_receiver

from credits.services import checkout_session_fulfil

logger = logging.getLogger(__name__)


@djstripe_receiver(["checkout.session.completed", "checkout.session.async_payment_succeeded"])
def checkout_session_paid(sender, event, **kwargs) -> None:
    session_id = event.data["object"]["id"]
    logger.info("Stripe event %s for a checkout session", event.id)
    checkout_session_fulfil(session_id=session_id)
