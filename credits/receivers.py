"""Stripe webhooks: the signature gate in front of dj-stripe, and dj-stripe's receivers.

`StripeWebhookView` serves `/stripe/webhook/<uuid>/`. It checks the Stripe-Signature
header against the endpoint's secret before anything is stored (dj-stripe's own view
records a WebhookEventTrigger row even for a forged request), then hands the request to
dj-stripe. dj-stripe records the event once per Stripe event id, syncs its objects and
sends the signals below inside its transaction. A receiver that raises rolls the event
back, so Stripe redelivers it. Event types without a receiver are recorded and ignored.
"""

import logging
from collections.abc import Mapping

import stripe
from django.contrib.auth.decorators import login_not_required
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404
from django.utils.decorators import method_decorator
from django.views.decorators.csrf import csrf_exempt
from django.views.generic import View
from djstripe.event_handlers import djstripe_receiver
from djstripe.models import WebhookEndpoint
from djstripe.views import ProcessWebhookView

from credits.services import (
    charge_refunds_apply,
    checkout_session_fail,
    checkout_session_fulfil,
    stripe_dispute_close,
    stripe_dispute_open,
)

logger = logging.getLogger(__name__)


# dj-stripe's view manages its own transactions (its error record must survive a
# failed event), so this one stays out of ATOMIC_REQUESTS too.
@method_decorator(transaction.non_atomic_requests, name="dispatch")
@method_decorator(csrf_exempt, name="dispatch")
@method_decorator(login_not_required, name="dispatch")
class StripeWebhookView(View):
    """Reject a request not signed with the endpoint's secret (HTTP 400), storing nothing."""

    def post(self, request: HttpRequest, uuid) -> HttpResponse:
        signature = request.headers.get("stripe-signature")
        if not signature:
            logger.warning("Stripe webhook without a signature")
            return HttpResponseBadRequest()
        endpoint = get_object_or_404(WebhookEndpoint, djstripe_uuid=uuid)
        try:
            payload = request.body.decode(request.encoding or "utf-8")
            # Checks the HMAC of "<timestamp>.<body>" and that the timestamp is recent.
            stripe.WebhookSignature.verify_header(
                payload, signature, endpoint.secret, endpoint.djstripe_tolerance
            )
        except (UnicodeDecodeError, stripe.SignatureVerificationError):
            logger.warning("Stripe webhook for endpoint %s: bad signature", endpoint.pk)
            return HttpResponseBadRequest()
        return ProcessWebhookView.as_view()(request, uuid=uuid)


def _object_id(value) -> str:
    if isinstance(value, Mapping):
        return value.get("id") or ""
    return value or ""


@djstripe_receiver(["checkout.session.completed", "checkout.session.async_payment_succeeded"])
def checkout_session_paid(sender, event, **kwargs) -> None:
    logger.info("Stripe event %s for a checkout session", event.id)
    checkout_session_fulfil(session_id=event.data["object"]["id"])


@djstripe_receiver("checkout.session.async_payment_failed")
def checkout_session_payment_failed(sender, event, **kwargs) -> None:
    logger.info("Stripe event %s for a failed checkout payment", event.id)
    checkout_session_fail(session_id=event.data["object"]["id"])


@djstripe_receiver(["charge.refunded", "charge.refund.updated"])
def charge_refunded(sender, event, **kwargs) -> None:
    # charge.refunded carries the charge; charge.refund.updated carries one refund.
    data_object = event.data["object"]
    if data_object.get("object") == "charge":
        charge_id = data_object["id"]
    else:
        charge_id = _object_id(data_object.get("charge"))
    logger.info("Stripe event %s for refunds of charge %s", event.id, charge_id)
    if charge_id:
        charge_refunds_apply(charge_id=charge_id)


@djstripe_receiver("charge.dispute.created")
def charge_dispute_created(sender, event, **kwargs) -> None:
    logger.info("Stripe event %s opened a dispute", event.id)
    stripe_dispute_open(dispute_id=event.data["object"]["id"])


@djstripe_receiver("charge.dispute.closed")
def charge_dispute_closed(sender, event, **kwargs) -> None:
    logger.info("Stripe event %s closed a dispute", event.id)
    stripe_dispute_close(dispute_id=event.data["object"]["id"])
