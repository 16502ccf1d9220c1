"""A purchase's life at Stripe, against the local Stripe server: paid late or never,
fulfilled once however many callers race, refunded in parts, disputed and settled.

Every step checks the balance and the debt to the nano-dollar and runs
`ledger_violations`. USD 1.00 is 1_000_000_000 nano-dollars, one cent is 10_000_000.
"""

import threading
from collections.abc import Callable
from datetime import timedelta

import httpx
import pytest
from django.db import connection
from django.test import Client
from djstripe.models import Event

from accounts.models import Account
from credits.models import CheckoutPurchase, CreditLot, LedgerTransaction, LotDispute, LotRefund
from credits.services import (
    CreditsError,
    account_balance,
    charge_refunds_apply,
    checkout_session_create,
    checkout_session_fail,
    checkout_session_fulfil,
    credit_lot_expire,
    ledger_violations,
    lot_refund_apply,
    stripe_dispute_close,
    stripe_dispute_open,
    stripe_webhook_endpoint_configure,
    usage_debit,
)
from credits.tasks import checkout_sessions_reconcile
from devtools.stripe_server import encode_event, sign_payload

USD = 1_000_000_000
CENT = 10_000_000
WEBHOOK_SECRET = "whsec_" + "lifecycletest" * 3


@pytest.fixture
def stripe_control(stripe_url: str) -> Callable[..., dict]:
    """POST to a control endpoint of the local Stripe server and return its JSON."""

    def control(path: str, **fields) -> dict:
        response = httpx.post(f"{stripe_url}{path}", data=fields)
        assert response.status_code == 200, response.text
        return response.json()

    return control


def start_purchase(tenant, cents: int) -> str:
    created = checkout_session_create(account=tenant.account, amount_cents=cents, user=tenant.user)
    return created["id"]


def buy(tenant, cents: int, stripe_control) -> tuple[CreditLot, dict]:
    """Pay a new session at Stripe and fulfil it; return the lot and the pay result."""
    session_id = start_purchase(tenant, cents)
    paid = stripe_control(f"/_test/sessions/{session_id}/pay")
    return checkout_session_fulfil(session_id=session_id), paid


def assert_ledger(account: Account, *, balance: int, debt: int = 0, at=None) -> None:
    """Check the balance and debt to the nano-dollar, and every ledger invariant."""
    account.refresh_from_db()
    current = account_balance(account_id=account.pk, at=at)
    assert (current.balance_nanousd, current.debt_nanousd) == (balance, debt)
    assert ledger_violations(account=account, at=at) == []


def amounts_total(account: Account) -> int:
    """Sum the transaction amounts: with no expired lot, that is the balance."""
    return sum(
        LedgerTransaction.objects.filter(account=account).values_list("amount_nanousd", flat=True)
    )


def run_together(count: int, target: Callable[[], object]) -> list:
    """Run `target` in `count` threads released at once; return the results in order."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[index] = target()
        except BaseException as error:  # noqa: BLE001 - reported to the test below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    return results


# --- Purchases -------------------------------------------------------------------------


@pytest.mark.django_db
def test_reconcile_fulfils_missed_webhook(owner, stripe_control):
    session_id = start_purchase(owner, 1200)
    paid = stripe_control(f"/_test/sessions/{session_id}/pay")

    assert checkout_sessions_reconcile.delay().get() == 1
    assert checkout_sessions_reconcile.delay().get() == 0

    lot = CreditLot.objects.get()
    assert (lot.original_nanousd, lot.remaining_nanousd) == (12 * USD, 12 * USD)
    assert lot.stripe_checkout_session_id == session_id
    assert lot.stripe_payment_intent_id == paid["payment_intent"]["id"]
    assert lot.stripe_charge_id == paid["charge"]["id"]
    assert CheckoutPurchase.objects.get().status == CheckoutPurchase.Status.FULFILLED
    assert LedgerTransaction.objects.get().idempotency_key == f"checkout:{session_id}"
    assert_ledger(owner.account, balance=12 * USD)


@pytest.mark.django_db
def test_unpaid_session_makes_no_lot(owner, stripe_control):
    session_id = start_purchase(owner, 500)
    stripe_control(f"/_test/sessions/{session_id}/pay_async")

    assert checkout_session_fulfil(session_id=session_id) is None
    assert checkout_sessions_reconcile.delay().get() == 0
    assert not CreditLot.objects.exists()
    assert CheckoutPurchase.objects.get().status == CheckoutPurchase.Status.OPEN
    assert_ledger(owner.account, balance=0)

    stripe_control(f"/_test/sessions/{session_id}/async_succeeded")

    assert checkout_sessions_reconcile.delay().get() == 1
    assert checkout_sessions_reconcile.delay().get() == 0
    assert CreditLot.objects.get().original_nanousd == 5 * USD
    assert_ledger(owner.account, balance=5 * USD)


@pytest.mark.django_db
def test_failed_delayed_payment_is_never_fulfilled(owner, stripe_control):
    session_id = start_purchase(owner, 500)
    stripe_control(f"/_test/sessions/{session_id}/pay_async")
    stripe_control(f"/_test/sessions/{session_id}/async_failed")

    failed = checkout_session_fail(session_id=session_id)
    again = checkout_session_fail(session_id=session_id)

    assert failed.status == again.status == CheckoutPurchase.Status.FAILED
    assert checkout_sessions_reconcile.delay().get() == 0
    assert checkout_session_fulfil(session_id=session_id) is None
    assert CheckoutPurchase.objects.get().status == CheckoutPurchase.Status.FAILED
    assert not CreditLot.objects.exists()
    assert_ledger(owner.account, balance=0)


@pytest.mark.django_db
def test_failure_report_for_paid_session_ignored(owner, stripe_control):
    lot, paid = buy(owner, 500, stripe_control)

    purchase = checkout_session_fail(session_id=paid["session"]["id"])

    assert purchase.status == CheckoutPurchase.Status.FULFILLED
    assert purchase.lot_id == lot.pk
    assert_ledger(owner.account, balance=5 * USD)


@pytest.mark.django_db(transaction=True)
def test_racing_fulfilments_make_one_lot(owner, stripe_control):
    session_id = start_purchase(owner, 1000)
    stripe_control(f"/_test/sessions/{session_id}/pay")

    lots = run_together(4, lambda: checkout_session_fulfil(session_id=session_id))

    assert len({lot.pk for lot in lots}) == 1
    assert CreditLot.objects.count() == 1
    assert LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.PURCHASE).count() == 1
    assert CreditLot.objects.get().stripe_charge_id.startswith("ch_")
    assert_ledger(owner.account, balance=10 * USD)


@pytest.mark.django_db(transaction=True)
def test_racing_duplicate_webhooks_make_one_lot(owner, stripe_control):
    url = stripe_webhook_endpoint_configure(secret=WEBHOOK_SECRET, public_url="http://testserver")
    session_id = start_purchase(owner, 1000)
    event = stripe_control(f"/_test/sessions/{session_id}/pay")["event"]
    payload = encode_event(event)

    def deliver() -> int:
        return (
            Client()
            .post(
                url.removeprefix("http://testserver"),
                data=payload,
                content_type="application/json",
                HTTP_STRIPE_SIGNATURE=sign_payload(payload, WEBHOOK_SECRET),
            )
            .status_code
        )

    statuses = run_together(2, deliver)

    assert statuses == [200, 200]
    assert Event.objects.filter(id=event["id"]).count() == 1
    assert CreditLot.objects.count() == 1
    assert_ledger(owner.account, balance=10 * USD)


# --- Refunds ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_refund_shortfall_becomes_debt(owner, stripe_control):
    lot, paid = buy(owner, 1000, stripe_control)
    charge_id = paid["charge"]["id"]
    usage_debit(account_id=owner.account.pk, request_id="req_spend", amount_nanousd=2_500_000_001)
    assert_ledger(owner.account, balance=7_499_999_999)

    stripe_control(f"/_test/sessions/{paid['session']['id']}/refund", amount=300)
    assert len(charge_refunds_apply(charge_id=charge_id)) == 1
    assert_ledger(owner.account, balance=4_499_999_999)

    # The rest of the charge: the lot gives what it has, the rest is debt.
    stripe_control(f"/_test/sessions/{paid['session']['id']}/refund")
    assert len(charge_refunds_apply(charge_id=charge_id)) == 1
    assert charge_refunds_apply(charge_id=charge_id) == []
    assert_ledger(owner.account, balance=-2_500_000_001, debt=2_500_000_001)
    lot.refresh_from_db()
    assert lot.remaining_nanousd == 0

    refunds = LotRefund.objects.order_by("id").values_list(
        "amount_cents", "voided_nanousd", "debt_nanousd"
    )
    assert list(refunds) == [(300, 3 * USD, 0), (700, 4_499_999_999, 2_500_000_001)]
    refund_entries = LedgerTransaction.objects.filter(kind="refund").order_by("id")
    assert [list(t.entries.values_list("lot_id", "amount_nanousd")) for t in refund_entries] == [
        [(lot.pk, -3 * USD)],
        [(lot.pk, -4_499_999_999), (None, -2_500_000_001)],
    ]

    buy(owner, 500, stripe_control)
    assert_ledger(owner.account, balance=2_499_999_999)
    assert amounts_total(owner.account) == 2_499_999_999


@pytest.mark.django_db(transaction=True)
def test_racing_refund_events_apply_once(owner, stripe_control):
    lot, paid = buy(owner, 1000, stripe_control)
    session_id = paid["session"]["id"]
    first = stripe_control(f"/_test/sessions/{session_id}/refund", amount=300)["refund"]
    second = stripe_control(f"/_test/sessions/{session_id}/refund", amount=200)["refund"]

    applied = run_together(4, lambda: charge_refunds_apply(charge_id=paid["charge"]["id"]))

    assert sorted(refund.stripe_refund_id for batch in applied for refund in batch) == sorted(
        [first["id"], second["id"]]
    )
    assert LotRefund.objects.count() == 2
    lot.refresh_from_db()
    assert lot.remaining_nanousd == 5 * USD
    assert_ledger(owner.account, balance=5 * USD)


@pytest.mark.django_db
def test_refund_of_expired_lot_is_debt(owner, stripe_control):
    lot, paid = buy(owner, 1000, stripe_control)
    usage_debit(account_id=owner.account.pk, request_id="req_spend", amount_nanousd=USD)
    after_expiry = lot.expires_at + timedelta(seconds=1)

    refund, created = lot_refund_apply(
        lot_id=lot.pk,
        refund_id="re_test_after_expiry",
        charge_id=paid["charge"]["id"],
        amount_cents=1000,
        at=after_expiry,
    )

    assert created is True
    assert (refund.voided_nanousd, refund.debt_nanousd) == (0, 10 * USD)
    assert_ledger(owner.account, balance=-10 * USD, debt=10 * USD, at=after_expiry)
    credit_lot_expire(lot_id=lot.pk, at=after_expiry)
    lot.refresh_from_db()
    assert lot.remaining_nanousd == 0
    assert_ledger(owner.account, balance=-10 * USD, debt=10 * USD, at=after_expiry)


@pytest.mark.django_db
def test_refund_rejects_other_currencies(owner, stripe_control):
    lot, paid = buy(owner, 1000, stripe_control)

    with pytest.raises(CreditsError, match="USD"):
        lot_refund_apply(
            lot_id=lot.pk,
            refund_id="re_test_eur",
            charge_id=paid["charge"]["id"],
            amount_cents=100,
            currency="eur",
        )

    assert not LotRefund.objects.exists()
    assert_ledger(owner.account, balance=10 * USD)


# --- Disputes --------------------------------------------------------------------------


@pytest.mark.django_db
def test_won_dispute_unfreezes_lot(owner, stripe_control):
    lot, paid = buy(owner, 1000, stripe_control)
    usage_debit(account_id=owner.account.pk, request_id="req_before", amount_nanousd=USD)
    dispute_id = stripe_control(f"/_test/sessions/{paid['session']['id']}/dispute")["dispute"][
        "id"
    ]

    stripe_dispute_open(dispute_id=dispute_id)
    stripe_dispute_open(dispute_id=dispute_id)

    lot.refresh_from_db()
    assert lot.status == CreditLot.Status.FROZEN
    freeze = LedgerTransaction.objects.get(kind=LedgerTransaction.Kind.FREEZE)
    assert (freeze.idempotency_key, freeze.amount_nanousd) == (
        f"dispute:{dispute_id}:freeze",
        -9 * USD,
    )
    assert (freeze.balance_after_nanousd, freeze.entries.count()) == (0, 0)
    assert_ledger(owner.account, balance=0)

    # Usage skips the frozen lot and becomes debt.
    usage_debit(account_id=owner.account.pk, request_id="req_during", amount_nanousd=USD // 2)
    lot.refresh_from_db()
    assert lot.remaining_nanousd == 9 * USD
    assert_ledger(owner.account, balance=-USD // 2, debt=USD // 2)

    stripe_control(f"/_test/disputes/{dispute_id}/close", status="won")
    record = stripe_dispute_close(dispute_id=dispute_id)
    stripe_dispute_close(dispute_id=dispute_id)

    lot.refresh_from_db()
    assert (lot.status, lot.remaining_nanousd) == (CreditLot.Status.ACTIVE, 9 * USD)
    assert record.status == LotDispute.Status.WON
    assert record.close_transaction.kind == LedgerTransaction.Kind.UNFREEZE
    assert record.close_transaction.amount_nanousd == 9 * USD
    assert record.close_transaction.balance_after_nanousd == 9 * USD - USD // 2
    assert_ledger(owner.account, balance=9 * USD - USD // 2, debt=USD // 2)
    assert amounts_total(owner.account) == 9 * USD - USD // 2


@pytest.mark.django_db
def test_lost_dispute_voids_exactly_the_remainder(owner, stripe_control):
    lot, paid = buy(owner, 1000, stripe_control)
    usage_debit(account_id=owner.account.pk, request_id="req_spend", amount_nanousd=1_234_567_891)
    dispute_id = stripe_control(f"/_test/sessions/{paid['session']['id']}/dispute")["dispute"][
        "id"
    ]
    stripe_dispute_open(dispute_id=dispute_id)
    assert_ledger(owner.account, balance=0)

    stripe_control(f"/_test/disputes/{dispute_id}/close", status="lost")
    stripe_dispute_close(dispute_id=dispute_id)
    stripe_dispute_close(dispute_id=dispute_id)

    lot.refresh_from_db()
    assert (lot.status, lot.remaining_nanousd) == (CreditLot.Status.VOIDED, 0)
    void = LedgerTransaction.objects.get(kind=LedgerTransaction.Kind.VOID)
    assert void.idempotency_key == f"dispute:{dispute_id}:lost"
    # The freeze already took the remainder out of the balance.
    assert (void.amount_nanousd, void.balance_after_nanousd) == (0, 0)
    assert list(void.entries.values_list("lot_id", "amount_nanousd")) == [(lot.pk, -8_765_432_109)]
    assert LotDispute.objects.get().status == LotDispute.Status.LOST
    assert_ledger(owner.account, balance=0)
    assert amounts_total(owner.account) == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("outcome", "kind", "amount", "balance", "lot_status"),
    [
        ("won", "unfreeze", 0, 10 * USD, CreditLot.Status.ACTIVE),
        ("lost", "void", -10 * USD, 0, CreditLot.Status.VOIDED),
    ],
)
def test_dispute_closed_before_opened(
    owner, stripe_control, outcome, kind, amount, balance, lot_status
):
    lot, paid = buy(owner, 1000, stripe_control)
    dispute_id = stripe_control(f"/_test/sessions/{paid['session']['id']}/dispute")["dispute"][
        "id"
    ]
    stripe_control(f"/_test/disputes/{dispute_id}/close", status=outcome)

    closed = stripe_dispute_close(dispute_id=dispute_id)
    opened = stripe_dispute_open(dispute_id=dispute_id)

    assert closed.pk == opened.pk
    assert (opened.status, opened.freeze_transaction) == (outcome, None)
    lot.refresh_from_db()
    assert lot.status == lot_status
    assert list(
        LedgerTransaction.objects.order_by("id").values_list("kind", "amount_nanousd")
    ) == [("purchase", 10 * USD), (kind, amount)]
    assert_ledger(owner.account, balance=balance)


@pytest.mark.django_db
def test_refund_during_dispute_is_debt(owner, stripe_control):
    lot, paid = buy(owner, 1000, stripe_control)
    dispute_id = stripe_control(f"/_test/sessions/{paid['session']['id']}/dispute")["dispute"][
        "id"
    ]
    stripe_dispute_open(dispute_id=dispute_id)

    refund, _created = lot_refund_apply(
        lot_id=lot.pk,
        refund_id="re_test_during_dispute",
        charge_id=paid["charge"]["id"],
        amount_cents=300,
    )

    assert (refund.voided_nanousd, refund.debt_nanousd) == (0, 3 * USD)
    assert_ledger(owner.account, balance=-3 * USD, debt=3 * USD)

    stripe_control(f"/_test/disputes/{dispute_id}/close", status="won")
    stripe_dispute_close(dispute_id=dispute_id)

    # The same balance as a refund of the spendable lot: USD 10.00 - 3.00.
    assert_ledger(owner.account, balance=7 * USD, debt=3 * USD)


# --- The real server ---------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_server_applies_delivered_refunds_and_dispute(server, stripe_url, owner):
    webhook_url = stripe_webhook_endpoint_configure(secret=WEBHOOK_SECRET, public_url=server.url)
    headers = {"Authorization": f"Bearer {owner.key.raw_key}"}
    log_start = len(server.log())

    def balance() -> tuple[int, int]:
        body = httpx.get(f"{server.url}/api/credits/balance", headers=headers).json()
        return body["balance_nanousd"], body["debt_nanousd"]

    def control(path: str, **fields) -> dict:
        response = httpx.post(f"{stripe_url}{path}", data=fields, timeout=60)
        assert response.status_code == 200, response.text
        result = response.json()
        if "webhook_delivery" in result and result["webhook_delivery"] is not None:
            assert result["webhook_delivery"]["status"] == 200, result["webhook_delivery"]
        return result

    control("/_test/webhook_endpoint", url=webhook_url, secret=WEBHOOK_SECRET)
    try:
        created = httpx.post(
            f"{server.url}/api/credits/checkout-session", headers=headers, json={"amount": 1000}
        )
        assert created.status_code == 201, created.text
        session_id = created.json()["id"]
        control(f"/_test/sessions/{session_id}/pay")
        assert balance() == (10 * USD, 0)

        first = control(f"/_test/sessions/{session_id}/refund", amount=300)
        assert balance() == (7 * USD, 0)
        control(f"/_test/sessions/{session_id}/refund", amount=200)
        assert balance() == (5 * USD, 0)
        redelivered = control(f"/_test/events/{first['event']['id']}/deliver")
        assert redelivered["status"] == 200
        assert balance() == (5 * USD, 0)

        dispute = control(f"/_test/sessions/{session_id}/dispute")["dispute"]
        assert balance() == (0, 0)
        control(f"/_test/disputes/{dispute['id']}/close", status="won")
        assert balance() == (5 * USD, 0)
    finally:
        httpx.post(f"{stripe_url}/_test/webhook_endpoint")

    assert LotRefund.objects.count() == 2
    assert LotDispute.objects.get().status == LotDispute.Status.WON
    owner.account.refresh_from_db()
    assert ledger_violations(account=owner.account) == []
    assert "Traceback" not in server.log()[log_start:]
