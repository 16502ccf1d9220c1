"""Stripe Checkout: start a session, fulfil it once, reconcile missed webhooks."""

import logging
from collections.abc import Mapping
from datetime import datetime

import stripe
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from djstripe.models import WebhookEndpoint
from djstripe.settings import djstripe_settings

from accounts.models import Account, User
from credits.models import CheckoutPurchase, CreditLot
from credits.services.ledger import CreditsError, purchase_lot_create

logger = logging.getLogger(__name__)

# dj-stripe keys endpoints by Stripe id; this one is configured locally, not synced.
LOCAL_WEBHOOK_ENDPOINT_ID = "we_tollbooth_configured"


def _stripe_options() -> dict:
    return {"api_key": settings.STRIPE_SECRET_KEY}


@transaction.atomic
def checkout_session_create(*, account: Account, amount_cents: int, user: User | None) -> dict:
    """Start a Stripe Checkout Session for `amount_cents` of credits.

    Returns the session's id and URL. The amount is validated here, so the dashboard
    and the API reject the same inputs.
    """
    if isinstance(amount_cents, bool) or not isinstance(amount_cents, int):
        raise CreditsError("amount must be an integer number of cents, such as 500 for USD 5.00.")
    minimum = settings.CREDITS_MIN_PURCHASE_CENTS
    maximum = settings.CREDITS_MAX_PURCHASE_CENTS
    if amount_cents < minimum:
        raise CreditsError(f"amount must be at least {minimum} cents (USD {minimum / 100:.2f}).")
    if amount_cents > maximum:
        raise CreditsError(f"amount must be at most {maximum} cents (USD {maximum / 100:.2f}).")
    if account.is_frozen:
        raise CreditsError("This account is frozen; contact support to buy credits.")

    base = settings.PUBLIC_URL
    session = stripe.checkout.Session.create(
        mode="payment",
        client_reference_id=str(account.pk),
        customer_email=user.email if user else None,
        line_items=[
            {
                "quantity": 1,
                "price_data": {
                    "currency": "usd",
                    "unit_amount": amount_cents,
                    "product_data": {"name": "Tollbooth credits"},
                },
            }
        ],
        metadata={"tollbooth_account_id": str(account.pk)},
        payment_intent_data={"metadata": {"tollbooth_account_id": str(account.pk)}},
        success_url=f"{base}/credits/success/?session_id={{CHECKOUT_SESSION_ID}}",
        cancel_url=f"{base}/credits/",
        **_stripe_options(),
    )
    CheckoutPurchase.objects.create(
        account=account,
        stripe_session_id=session["id"],
        amount_cents=amount_cents,
        created_by=user,
    )
    logger.info("Created checkout session for account %s, %s cents", account.pk, amount_cents)
    return {"id": session["id"], "url": session["url"]}


def _session_account_id(session: Mapping) -> int | None:
    purchase = CheckoutPurchase.objects.filter(stripe_session_id=session["id"]).first()
    if purchase is not None:
        return purchase.account_id
    reference = session.get("client_reference_id") or (session.get("metadata") or {}).get(
        "tollbooth_account_id"
    )
    if reference and str(reference).isdigit():
        return int(reference)
    return None


def _session_payment_ids(session: Mapping) -> tuple[str, str]:
    """Return the payment intent id and charge id of a session ("" when absent)."""
    payment_intent = session.get("payment_intent") or ""
    if isinstance(payment_intent, str):
        return payment_intent, ""
    charge = payment_intent.get("latest_charge") or ""
    if not isinstance(charge, str):
        charge = charge.get("id", "")
    return payment_intent.get("id", ""), charge


def _session_retrieve(session_id: str) -> stripe.checkout.Session:
    return stripe.checkout.Session.retrieve(
        session_id, expand=["payment_intent"], **_stripe_options()
    )


def checkout_session_fulfil(*, session_id: str) -> CreditLot | None:
    """Turn a paid Checkout Session into exactly one lot.

    Reads amount, currency and payment status from the session as retrieved from Stripe,
    never from the caller, and records the payment intent and charge on the lot, so that
    refunds and disputes find it. Returns None while the session is unpaid.
    """
    return _session_fulfil(_session_retrieve(session_id))


def _session_fulfil(session: Mapping) -> CreditLot | None:
    if session.get("payment_status") != "paid":
        logger.info("Checkout session not paid yet, status %s", session.get("payment_status"))
        return None
    if (session.get("currency") or "").lower() != "usd":
        raise CreditsError("Only USD checkout sessions can be fulfilled.")
    account_id = _session_account_id(session)
    if account_id is None:
        raise CreditsError("The checkout session does not belong to a Tollbooth account.")
    payment_intent_id, charge_id = _session_payment_ids(session)
    # One transaction: the account lock taken inside is held until the charge id is set.
    with transaction.atomic():
        lot, _created = purchase_lot_create(
            account_id=account_id,
            session_id=session["id"],
            amount_cents=int(session["amount_total"]),
            currency="usd",
            payment_intent_id=payment_intent_id,
        )
        if charge_id and not lot.stripe_charge_id:
            CreditLot.objects.filter(pk=lot.pk).update(stripe_charge_id=charge_id)
            lot.stripe_charge_id = charge_id
    return lot


def checkout_session_fail(*, session_id: str) -> CheckoutPurchase | None:
    """Mark the purchase of a session whose delayed payment failed; it never becomes a lot.

    Reads the payment status from the session as retrieved from Stripe: a session that
    is paid after all is left alone, and so is a purchase that is no longer open. Returns
    the purchase, or None when Tollbooth did not start the session.
    """
    session = stripe.checkout.Session.retrieve(session_id, **_stripe_options())
    with transaction.atomic():
        purchase = (
            CheckoutPurchase.objects.select_for_update()
            .filter(stripe_session_id=session_id)
            .first()
        )
        if purchase is None:
            logger.warning("Failed payment of a checkout session Tollbooth did not start")
            return None
        if session.get("payment_status") == "paid":
            logger.warning("Checkout purchase %s reported failed but is paid", purchase.pk)
            return purchase
        if purchase.status == CheckoutPurchase.Status.OPEN:
            purchase.status = CheckoutPurchase.Status.FAILED
            purchase.save(update_fields=["status"])
            logger.info("Checkout purchase %s failed", purchase.pk)
    return purchase


def checkout_sessions_reconcile(*, at: datetime | None = None) -> int:
    """Fulfil open purchases whose session Stripe reports paid; return how many were fulfilled.

    A purchase whose session expired unpaid (Stripe expires an uncompleted session at
    its `expires_at`, at most 24 hours after creation) is marked expired. A session
    completed with a delayed payment method stays open until its payment settles.
    """
    at = at or timezone.now()
    fulfilled = 0
    open_purchases = CheckoutPurchase.objects.filter(status=CheckoutPurchase.Status.OPEN)
    for purchase in open_purchases.order_by("created_at", "id"):
        try:
            session = _session_retrieve(purchase.stripe_session_id)
            lot = _session_fulfil(session)
        except (stripe.StripeError, CreditsError) as error:
            logger.warning(
                "Reconciling checkout purchase %s failed: %s", purchase.pk, type(error).__name__
            )
            continue
        if lot is not None:
            fulfilled += 1
            continue
        status = session.get("status")
        expires_at = session.get("expires_at")
        if status == "expired" or (
            status == "open" and expires_at and at.timestamp() > expires_at
        ):
            open_purchases.filter(pk=purchase.pk).update(status=CheckoutPurchase.Status.EXPIRED)
    return fulfilled


@transaction.atomic
def stripe_webhook_endpoint_configure(*, secret: str, public_url: str, uuid: str = "") -> str:
    """Store the webhook endpoint dj-stripe verifies against, without calling Stripe.

    Returns the URL to register in the Stripe dashboard. The endpoint's UUID (its path)
    stays the same across runs unless `uuid` sets another.
    """
    if not secret.startswith("whsec_"):
        raise CreditsError("STRIPE_WEBHOOK_SECRET must start with whsec_.")
    endpoint = WebhookEndpoint.objects.filter(id=LOCAL_WEBHOOK_ENDPOINT_ID).first()
    if endpoint is None:
        endpoint = WebhookEndpoint(
            id=LOCAL_WEBHOOK_ENDPOINT_ID,
            livemode=settings.STRIPE_LIVE_MODE,
            enabled_events=["*"],
            status="enabled",
            api_version=djstripe_settings.STRIPE_API_VERSION,
        )
    if uuid:
        endpoint.djstripe_uuid = uuid
    endpoint.secret = secret
    endpoint.livemode = settings.STRIPE_LIVE_MODE
    endpoint.save()
    url = f"{public_url}/stripe/webhook/{endpoint.djstripe_uuid}/"
    if endpoint.url != url:
        endpoint.url = url
        endpoint.save(update_fields=["url"])
    return url
