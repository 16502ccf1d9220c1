from datetime import timedelta

import pytest
from django.utils import timezone

from credits.models import CheckoutPurchase, CreditLot
from credits.services import credit_grant, credit_lot_expire, usage_debit


def test_balance_lists_unexpired_lots_in_draw_down_order(owner):
    now = timezone.now()
    late = credit_grant(
        account=owner.account,
        amount_nanousd=2_000_000_000,
        reason="late",
        expires_at=now + timedelta(days=90),
    )
    soon = credit_grant(
        account=owner.account,
        amount_nanousd=1_000_000_000,
        reason="soon",
        expires_at=now + timedelta(days=9),
    )
    credit_grant(
        account=owner.account,
        amount_nanousd=7_000_000_000,
        reason="gone",
        at=now - timedelta(days=5),
        expires_at=now - timedelta(days=1),
    )
    usage_debit(account_id=owner.account.pk, request_id="req_1", amount_nanousd=50_000)

    response = owner.api().get("/api/credits/balance")

    assert response.status_code == 200
    body = response.json()
    assert body["balance_usd"] == "2.999950000"
    assert body["balance_nanousd"] == 2_999_950_000
    assert body["balance_cents"] == 299
    assert body["debt_usd"] == "0.000000000"
    assert [(lot["id"], lot["remaining_usd"], lot["spendable"]) for lot in body["lots"]] == [
        (soon.pk, "0.999950000", True),
        (late.pk, "2.000000000", True),
    ]


def test_balance_of_outsider_is_its_own(funded, outsider):
    response = outsider.api().get("/api/credits/balance")
    assert response.status_code == 200
    assert response.json()["balance_nanousd"] == 0
    assert response.json()["lots"] == []


def test_balance_needs_a_key(db):
    from rest_framework.test import APIClient

    response = APIClient().get("/api/credits/balance")
    assert response.status_code == 401
    assert response.json()["error"]["message"].startswith("Missing access key")


def test_revoked_key_gets_401(owner, django_capture_on_commit_callbacks):
    from gateway.services import access_key_revoke

    with django_capture_on_commit_callbacks(execute=True):
        access_key_revoke(access_key=owner.key.access_key)
    response = owner.api().get("/api/credits/balance")
    assert response.status_code == 401
    assert "revoked" in response.json()["error"]["message"]


def test_inference_only_key_gets_403(owner):
    from rest_framework.test import APIClient

    from gateway.services import access_key_create

    created = access_key_create(account=owner.account, name="gw", scopes=["inference"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {created.raw_key}")
    response = client.get("/api/credits/balance")
    assert response.status_code == 403
    assert "management" in response.json()["error"]["message"]


def test_checkout_session_returns_id_and_url(owner, stripe_url):
    response = owner.api().post("/api/credits/checkout-session", {"amount": 500}, format="json")

    assert response.status_code == 201
    body = response.json()
    assert body["id"].startswith("cs_test_")
    assert body["url"].startswith(stripe_url)
    assert body["amount"] == 500
    purchase = CheckoutPurchase.objects.get()
    assert (purchase.account, purchase.stripe_session_id, purchase.amount_cents) == (
        owner.account,
        body["id"],
        500,
    )
    assert CreditLot.objects.count() == 0


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"amount": 499}, "at least 500 cents"),
        ({"amount": 5.5}, "integer number of cents"),
        ({"amount": "500"}, "integer number of cents"),
        ({"amount": True}, "integer number of cents"),
        ({"amount": 100_000_001}, "at most"),
        ({}, "required"),
    ],
)
def test_checkout_session_rejects_bad_amounts(owner, stripe_url, payload, message):
    response = owner.api().post("/api/credits/checkout-session", payload, format="json")

    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"]
    assert "amount" in error["fields"]
    assert CheckoutPurchase.objects.count() == 0


def test_checkout_session_rejects_malformed_json(owner, stripe_url):
    response = owner.api().post(
        "/api/credits/checkout-session", '{"amount": 5', content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "parse_error"
    assert CheckoutPurchase.objects.count() == 0


def test_transactions_are_newest_first_with_balance_after(owner):
    credit_grant(account=owner.account, amount_nanousd=1_000_000_000, reason="welcome")
    usage_debit(account_id=owner.account.pk, request_id="req_t", amount_nanousd=400)

    response = owner.api().get("/api/credits/transactions")

    assert response.status_code == 200
    rows = response.json()["results"]
    assert [(row["kind"], row["amount_usd"], row["balance_after_usd"]) for row in rows] == [
        ("usage", "-0.000000400", "0.999999600"),
        ("grant", "1.000000000", "1.000000000"),
    ]


def test_lots_list_shows_only_own_lots(funded, outsider):
    credit_grant(account=outsider.account, amount_nanousd=1, reason="theirs")
    response = funded.api().get("/api/credits/lots")
    assert response.status_code == 200
    assert [lot["original_usd"] for lot in response.json()["results"]] == ["10.000000000"]


def test_lots_list_shows_when_an_expiry_was_written(funded):
    now = timezone.now()
    lot = credit_grant(
        account=funded.account,
        amount_nanousd=250_000_000,
        reason="short trial",
        at=now - timedelta(days=2),
        expires_at=now - timedelta(days=1),
    )
    credit_lot_expire(lot_id=lot.pk, at=now)

    lots = {row["id"]: row for row in funded.api().get("/api/credits/lots").json()["results"]}

    expired = lots[lot.pk]
    assert (expired["remaining_usd"], expired["spendable"]) == ("0.000000000", False)
    assert expired["expired_at"] == now.isoformat().replace("+00:00", "Z")
    assert [row["expired_at"] for row in lots.values() if row["id"] != lot.pk] == [None]
