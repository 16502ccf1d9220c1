"""Stripe webhooks through Django's test client: the signature gate and each receiver.

Events come from the local Stripe server (or are built by hand) and are signed exactly
as Stripe signs them. dj-stripe syncs its objects from that server while it processes
them. Amounts: USD 1.00 is 1_000_000_000 nano-dollars, one cent is 10_000_000.
"""

import time
from urllib.parse import urlsplit

import httpx
import pytest
import stripe
from django.conf import settings
from django.test import Client
from djstripe.models import Charge as StripeCharge
from djstripe.models import Dispute as StripeDispute
from djstripe.models import Event, WebhookEventTrigger

from accounts.models import Account
from credits.models import (
    CheckoutPurchase,
    CreditLot,
    LedgerTransaction,
    LotDispute,
    LotRefund,
)
from credits.services import (
    account_balance,
    checkout_session_create,
    ledger_violations,
    stripe_webhook_endpoint_configure,
)
from devtools.stripe_server import build_event, encode_event, sign_payload

pytestmark = pytest.mark.django_db

WEBHOOK_SECRET = "whsec_" + "webhooktests" * 3
USD = 1_000_000_000
CENT = 10_000_000


@pytest.fixture
def webhook_path(db) -> str:
    url = stripe_webhook_endpoint_configure(secret=WEBHOOK_SECRET, public_url="http://testserver")
    return urlsplit(url).path


@pytest.fixture
def stripe_control(stripe_url: str):
    """POST to a control endpoint of the local Stripe server and return its JSON."""

    def control(path: str, **fields) -> dict:
        response = httpx.post(f"{stripe_url}{path}", data=fields)
        assert response.status_code == 200, response.text
        return response.json()

    return control


def post_event(
    path: str,
    event: dict,
    *,
    secret: str = WEBHOOK_SECRET,
    timestamp: int | None = None,
    payload: bytes | None = None,
):
    """Post an event signed like Stripe signs it; `payload` replaces the signed body."""
    body = encode_event(event)
    signature = sign_payload(body, secret, timestamp=timestamp)
    return Client().post(
        path,
        data=body if payload is None else payload,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=signature,
    )


def start_purchase(tenant, cents: int) -> str:
    return checkout_session_create(account=tenant.account, amount_cents=cents, user=tenant.user)[
        "id"
    ]


def assert_ledger(account: Account, *, balance: int, debt: int = 0) -> None:
    """Check the balance and debt to the nano-dollar, and every ledger invariant."""
    account.refresh_from_db()
    current = account_balance(account_id=account.pk)
    assert (current.balance_nanousd, current.debt_nanousd) == (balance, debt)
    assert ledger_violations(account=account) == []


def nothing_stored() -> bool:
    return not WebhookEventTrigger.objects.exists() and not Event.objects.exists()


# --- Signature gate --------------------------------------------------------------------


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param({"secret": "whsec_forged000000000000000000"}, id="forged-signature"),
        pytest.param({"timestamp": int(time.time()) - 3600}, id="stale-timestamp"),
        pytest.param({"payload": b"tampered"}, id="tampered-body"),
    ],
)
def test_bad_signature_rejected_storing_nothing(
    owner, stripe_url, stripe_control, webhook_path, tamper
):
    session_id = start_purchase(owner, 1000)
    paid = stripe_control(f"/_test/sessions/{session_id}/pay")
    event = paid["event"]
    if "payload" in tamper:
        # The signed event is for this session; the body sent claims USD 10,000.
        changed = {**event, "data": {"object": {**event["data"]["object"]}}}
        changed["data"]["object"]["amount_total"] = 1_000_000
        tamper = {"payload": encode_event(changed)}

    response = post_event(webhook_path, event, **tamper)

    assert response.status_code == 400
    assert nothing_stored()
    assert not CreditLot.objects.exists()
    assert CheckoutPurchase.objects.get().status == CheckoutPurchase.Status.OPEN
    assert_ledger(owner.account, balance=0)


def test_missing_signature_rejected(owner, stripe_control, webhook_path):
    session_id = start_purchase(owner, 1000)
    paid = stripe_control(f"/_test/sessions/{session_id}/pay")

    response = Client().post(
        webhook_path, data=encode_event(paid["event"]), content_type="application/json"
    )

    assert response.status_code == 400
    assert nothing_stored()
    assert not CreditLot.objects.exists()
    assert_ledger(owner.account, balance=0)


def test_unknown_endpoint_not_found(owner, stripe_control, webhook_path):
    session_id = start_purchase(owner, 1000)
    paid = stripe_control(f"/_test/sessions/{session_id}/pay")

    response = post_event("/stripe/webhook/00000000-0000-4000-8000-000000000000/", paid["event"])

    assert response.status_code == 404
    assert nothing_stored()
    assert not CreditLot.objects.exists()
    assert_ledger(owner.account, balance=0)


def test_duplicate_event_processed_once(owner, stripe_control, webhook_path):
    session_id = start_purchase(owner, 1000)
    paid = stripe_control(f"/_test/sessions/{session_id}/pay")

    first = post_event(webhook_path, paid["event"])
    second = post_event(webhook_path, paid["event"])

    assert (first.status_code, second.status_code) == (200, 200)
    assert list(Event.objects.values_list("id", "type")) == [
        (paid["event"]["id"], "checkout.session.completed")
    ]
    assert WebhookEventTrigger.objects.filter(valid=True, processed=True).count() == 2
    lot = CreditLot.objects.get()
    assert lot.original_nanousd == 10 * USD
    assert lot.stripe_payment_intent_id == paid["payment_intent"]["id"]
    assert lot.stripe_charge_id == paid["charge"]["id"]
    assert CheckoutPurchase.objects.get().status == CheckoutPurchase.Status.FULFILLED
    assert_ledger(owner.account, balance=10 * USD)


@pytest.mark.parametrize("event_type", ["billing.meter.created", "balance.available"])
def test_unknown_event_type_recorded_and_ignored(owner, webhook_path, stripe_url, event_type):
    event = build_event(event_type, {"id": "obj_test_1", "object": "unknown_object"})

    response = post_event(webhook_path, event)

    assert response.status_code == 200
    assert list(Event.objects.values_list("id", "type")) == [(event["id"], event_type)]
    assert not LedgerTransaction.objects.exists()
    assert_ledger(owner.account, balance=0)


# --- Purchases -------------------------------------------------------------------------


def test_delayed_payment_lot_only_on_success(owner, stripe_control, webhook_path):
    session_id = start_purchase(owner, 700)

    pending = stripe_control(f"/_test/sessions/{session_id}/pay_async")
    assert post_event(webhook_path, pending["event"]).status_code == 200
    assert not CreditLot.objects.exists()
    assert CheckoutPurchase.objects.get().status == CheckoutPurchase.Status.OPEN
    assert_ledger(owner.account, balance=0)

    succeeded = stripe_control(f"/_test/sessions/{session_id}/async_succeeded")
    assert succeeded["event"]["type"] == "checkout.session.async_payment_succeeded"
    assert post_event(webhook_path, succeeded["event"]).status_code == 200
    assert post_event(webhook_path, succeeded["event"]).status_code == 200

    lot = CreditLot.objects.get()
    assert (lot.original_nanousd, lot.remaining_nanousd) == (7 * USD, 7 * USD)
    assert lot.stripe_charge_id == succeeded["charge"]["id"]
    assert CheckoutPurchase.objects.get().status == CheckoutPurchase.Status.FULFILLED
    assert_ledger(owner.account, balance=7 * USD)


def test_failed_delayed_payment_marks_purchase_failed(owner, stripe_control, webhook_path):
    session_id = start_purchase(owner, 700)
    pending = stripe_control(f"/_test/sessions/{session_id}/pay_async")
    post_event(webhook_path, pending["event"])

    failed = stripe_control(f"/_test/sessions/{session_id}/async_failed")
    first = post_event(webhook_path, failed["event"])
    again = post_event(webhook_path, failed["event"])

    assert (first.status_code, again.status_code) == (200, 200)
    assert failed["event"]["type"] == "checkout.session.async_payment_failed"
    assert CheckoutPurchase.objects.get().status == CheckoutPurchase.Status.FAILED
    assert not CreditLot.objects.exists()
    assert not LedgerTransaction.objects.exists()
    assert_ledger(owner.account, balance=0)


# --- Refunds ---------------------------------------------------------------------------


def buy(tenant, cents: int, stripe_control, webhook_path) -> dict:
    """Buy through Checkout and the signed webhook; return the pay action's result."""
    paid = stripe_control(f"/_test/sessions/{start_purchase(tenant, cents)}/pay")
    assert post_event(webhook_path, paid["event"]).status_code == 200
    return paid


def test_two_partial_refunds_each_apply_once(owner, stripe_control, webhook_path):
    paid = buy(owner, 1000, stripe_control, webhook_path)
    session_id = paid["session"]["id"]

    first = stripe_control(f"/_test/sessions/{session_id}/refund", amount=300)
    assert post_event(webhook_path, first["event"]).status_code == 200
    assert_ledger(owner.account, balance=7 * USD)

    second = stripe_control(f"/_test/sessions/{session_id}/refund", amount=250)
    assert second["event"]["data"]["object"]["amount_refunded"] == 550
    assert post_event(webhook_path, second["event"]).status_code == 200
    assert_ledger(owner.account, balance=7 * USD - 250 * CENT)

    # Both events again, newest first: nothing changes.
    assert post_event(webhook_path, second["event"]).status_code == 200
    assert post_event(webhook_path, first["event"]).status_code == 200
    assert_ledger(owner.account, balance=4 * USD + 50 * CENT)

    refunds = LotRefund.objects.order_by("id")
    assert [
        (r.stripe_refund_id, r.amount_cents, r.voided_nanousd, r.debt_nanousd) for r in refunds
    ] == [
        (first["refund"]["id"], 300, 300 * CENT, 0),
        (second["refund"]["id"], 250, 250 * CENT, 0),
    ]
    transactions = LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.REFUND)
    assert sorted(transactions.values_list("idempotency_key", "amount_nanousd")) == sorted(
        [
            (f"refund:{first['refund']['id']}", -300 * CENT),
            (f"refund:{second['refund']['id']}", -250 * CENT),
        ]
    )
    assert CreditLot.objects.get().remaining_nanousd == 450 * CENT
    # dj-stripe synced the charge from the local server while processing the events.
    charge = StripeCharge.objects.get(id=paid["charge"]["id"])
    assert (charge.amount_refunded, charge.refunded) == (550, False)


def test_refund_ignores_event_body_amount(owner, stripe_control, webhook_path):
    paid = buy(owner, 1000, stripe_control, webhook_path)
    # Signed, but Stripe lists no refund of this charge.
    claimed = {**paid["charge"], "amount_refunded": 1000, "refunded": True}

    response = post_event(webhook_path, build_event("charge.refunded", claimed))

    assert response.status_code == 200
    assert not LotRefund.objects.exists()
    assert_ledger(owner.account, balance=10 * USD)


def test_refund_updated_event_applies_refund(owner, stripe_control, webhook_path):
    paid = buy(owner, 1000, stripe_control, webhook_path)
    refunded = stripe_control(f"/_test/sessions/{paid['session']['id']}/refund", amount=100)

    response = post_event(webhook_path, build_event("charge.refund.updated", refunded["refund"]))

    assert response.status_code == 200
    assert LotRefund.objects.get().stripe_refund_id == refunded["refund"]["id"]
    assert_ledger(owner.account, balance=9 * USD)


def test_refund_fulfils_missed_purchase_first(owner, stripe_control, webhook_path):
    session_id = start_purchase(owner, 1000)
    stripe_control(f"/_test/sessions/{session_id}/pay")
    refunded = stripe_control(f"/_test/sessions/{session_id}/refund", amount=400)

    response = post_event(webhook_path, refunded["event"])

    assert response.status_code == 200
    lot = CreditLot.objects.get()
    assert (lot.original_nanousd, lot.remaining_nanousd) == (10 * USD, 6 * USD)
    assert CheckoutPurchase.objects.get().status == CheckoutPurchase.Status.FULFILLED
    assert_ledger(owner.account, balance=6 * USD)


def test_refund_of_foreign_charge_ignored(owner, stripe_url, stripe_control, webhook_path):
    foreign = stripe.checkout.Session.create(
        mode="payment",
        success_url="http://testserver/done",
        line_items=[
            {
                "quantity": 1,
                "price_data": {
                    "currency": "usd",
                    "unit_amount": 900,
                    "product_data": {"name": "Something else"},
                },
            }
        ],
        api_key=settings.STRIPE_SECRET_KEY,
    )
    stripe_control(f"/_test/sessions/{foreign.id}/pay")
    refunded = stripe_control(f"/_test/sessions/{foreign.id}/refund")

    response = post_event(webhook_path, refunded["event"])

    assert response.status_code == 200
    assert not LotRefund.objects.exists()
    assert not LedgerTransaction.objects.exists()
    assert_ledger(owner.account, balance=0)


# --- Disputes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "balance", "lot_status", "remaining"),
    [
        ("won", 10 * USD, CreditLot.Status.ACTIVE, 10 * USD),
        ("lost", 0, CreditLot.Status.VOIDED, 0),
    ],
)
def test_dispute_freezes_lot_until_closed(
    owner, stripe_control, webhook_path, outcome, balance, lot_status, remaining
):
    paid = buy(owner, 1000, stripe_control, webhook_path)

    opened = stripe_control(f"/_test/sessions/{paid['session']['id']}/dispute")
    assert post_event(webhook_path, opened["event"]).status_code == 200
    assert post_event(webhook_path, opened["event"]).status_code == 200
    lot = CreditLot.objects.get()
    assert lot.status == CreditLot.Status.FROZEN
    assert_ledger(owner.account, balance=0)

    closed = stripe_control(f"/_test/disputes/{opened['dispute']['id']}/close", status=outcome)
    assert post_event(webhook_path, closed["event"]).status_code == 200
    assert post_event(webhook_path, closed["event"]).status_code == 200
    # A late copy of the opening event freezes nothing again.
    assert post_event(webhook_path, {**opened["event"], "id": "evt_late_copy"}).status_code == 200

    lot.refresh_from_db()
    assert (lot.status, lot.remaining_nanousd) == (lot_status, remaining)
    dispute = LotDispute.objects.get()
    assert (dispute.stripe_dispute_id, dispute.status) == (opened["dispute"]["id"], outcome)
    assert StripeDispute.objects.get(id=opened["dispute"]["id"]).status == outcome
    assert dispute.stripe_charge_id == paid["charge"]["id"]
    kinds = LedgerTransaction.objects.order_by("id").values_list("kind", "amount_nanousd")
    close_kind = "unfreeze" if outcome == "won" else "void"
    close_amount = 10 * USD if outcome == "won" else 0
    assert list(kinds) == [
        ("purchase", 10 * USD),
        ("freeze", -10 * USD),
        (close_kind, close_amount),
    ]
    assert_ledger(owner.account, balance=balance)
