"""The credit history: `GET /api/credits/transactions`, its OpenAPI schema and the credits page.

Usage charges are summed per UTC day by the database; every other transaction is a row.
"""

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from rest_framework.test import APIClient

from accounts.models import User
from credits.services import (
    credit_grant,
    credit_lot_expire,
    credit_lot_void,
    ledger_violations,
    purchase_lot_create,
    usage_debit,
)
from gateway.services import access_key_create

USD = 1_000_000_000
# Midnight UTC, three days back: every row below lies in the past, on known UTC days.
DAY_1 = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=3)
DAY_2 = DAY_1 + timedelta(days=1)
DAY_3 = DAY_1 + timedelta(days=2)


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user(email="support@example.com", password="x", is_staff=True)


@pytest.fixture
def history(owner, staff) -> dict:
    """Three UTC days of grants, usage, an expiry, a void and a purchase on the owner's account.

    Returns the ids the expected rows refer to.
    """
    account = owner.account

    def charge(request_id: str, amount: int, at: datetime) -> None:
        usage_debit(account_id=account.pk, request_id=request_id, amount_nanousd=amount, at=at)

    welcome = credit_grant(
        account=account,
        amount_nanousd=10 * USD,
        reason="welcome",
        at=DAY_1 + timedelta(hours=1),
        expires_at=DAY_1 + timedelta(days=400),
    )
    charge("req_1", 1_234_567, DAY_1 + timedelta(hours=2))
    charge("req_2", 765_433, DAY_1 + timedelta(hours=5))
    # The last instant of day 2 and the first of day 3 fall on different days.
    charge("req_3", 1, DAY_2 + timedelta(hours=23, minutes=59, seconds=59, microseconds=999999))
    charge("req_4", 2, DAY_3)
    short = credit_grant(
        account=account,
        amount_nanousd=2 * USD,
        reason="short trial",
        at=DAY_3 + timedelta(hours=1),
        expires_at=DAY_3 + timedelta(hours=2),
    )
    expiry = credit_lot_expire(lot_id=short.pk, at=DAY_3 + timedelta(hours=3))
    charge("req_5", 3, DAY_3 + timedelta(hours=4))
    extra = credit_grant(
        account=account,
        amount_nanousd=USD,
        reason="extra",
        at=DAY_3 + timedelta(hours=4, minutes=30),
        expires_at=DAY_3 + timedelta(days=30),
    )
    void = credit_lot_void(
        lot_id=extra.pk, reason="Granted twice", actor=staff, at=DAY_3 + timedelta(hours=5)
    )
    bought, _created = purchase_lot_create(
        account_id=account.pk,
        session_id="cs_test_history",
        amount_cents=500,
        currency="usd",
        payment_intent_id="pi_test_history",
        at=DAY_3 + timedelta(hours=6),
    )
    account.refresh_from_db()
    assert ledger_violations(account=account, at=DAY_3 + timedelta(hours=7)) == []
    return {
        "welcome": welcome.opening.pk,
        "short": short.opening.pk,
        "expiry": expiry.pk,
        "extra": extra.opening.pk,
        "void": void.pk,
        "purchase": bought.opening.pk,
        "short_lot": short.pk,
        "extra_lot": extra.pk,
    }


def row(
    kind: str,
    at: datetime,
    amount: int,
    balance_after: int,
    *,
    id: int | None = None,
    requests: int = 0,
    description: str = "",
) -> dict:
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(amount), USD)
    balance_whole, balance_fraction = divmod(balance_after, USD)
    return {
        "id": id,
        "kind": kind,
        "date": at.date().isoformat(),
        "created_at": at.isoformat().replace("+00:00", "Z"),
        "amount_usd": f"{sign}{whole}.{fraction:09d}",
        "amount_nanousd": amount,
        "balance_after_usd": f"{balance_whole}.{balance_fraction:09d}",
        "balance_after_nanousd": balance_after,
        "request_count": requests,
        "description": description,
    }


def expected_rows(ids: dict) -> list[dict]:
    """Every row of the history fixture, newest first, to the nano-dollar."""
    return [
        row(
            "purchase",
            DAY_3 + timedelta(hours=6),
            5 * USD,
            14_997_999_994,
            id=ids["purchase"],
            description="Purchase of USD 5.00",
        ),
        row(
            "void",
            DAY_3 + timedelta(hours=5),
            -USD,
            9_997_999_994,
            id=ids["void"],
            description=f"Lot {ids['extra_lot']} voided by support",
        ),
        row(
            "grant",
            DAY_3 + timedelta(hours=4, minutes=30),
            USD,
            10_997_999_994,
            id=ids["extra"],
            description="extra",
        ),
        # Day 3's usage is split by the grant and the expiry between its two charges.
        row("usage", DAY_3 + timedelta(hours=4), -3, 9_997_999_994, requests=1),
        row(
            "expiry",
            DAY_3 + timedelta(hours=3),
            0,
            9_997_999_997,
            id=ids["expiry"],
            description=f"Lot {ids['short_lot']} expired with USD 2.00 unspent",
        ),
        row(
            "grant",
            DAY_3 + timedelta(hours=1),
            2 * USD,
            11_997_999_997,
            id=ids["short"],
            description="short trial",
        ),
        row("usage", DAY_3, -2, 9_997_999_997, requests=1),
        row(
            "usage",
            DAY_2 + timedelta(hours=23, minutes=59, seconds=59, microseconds=999999),
            -1,
            9_997_999_999,
            requests=1,
        ),
        row("usage", DAY_1 + timedelta(hours=5), -2_000_000, 9_998_000_000, requests=2),
        row(
            "grant",
            DAY_1 + timedelta(hours=1),
            10 * USD,
            10 * USD,
            id=ids["welcome"],
            description="welcome",
        ),
    ]


def test_transactions_sum_usage_per_utc_day(owner, history):
    response = owner.api().get("/api/credits/transactions")

    assert response.status_code == 200
    assert response.json() == {
        "count": 10,
        "next": None,
        "previous": None,
        "results": expected_rows(history),
    }


def test_transactions_days_ignore_display_time_zone(owner, history, settings):
    settings.TIME_ZONE = "Pacific/Auckland"

    response = owner.api().get("/api/credits/transactions")

    usage = [item for item in response.json()["results"] if item["kind"] == "usage"]
    assert [(item["date"], item["amount_nanousd"]) for item in usage] == [
        (DAY_3.date().isoformat(), -3),
        (DAY_3.date().isoformat(), -2),
        (DAY_2.date().isoformat(), -1),
        (DAY_1.date().isoformat(), -2_000_000),
    ]


def test_transactions_limit_and_offset(owner, history):
    response = owner.api().get("/api/credits/transactions?limit=3&offset=2")

    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 10
    assert body["next"] == "http://testserver/api/credits/transactions?limit=3&offset=5"
    assert body["previous"] == "http://testserver/api/credits/transactions?limit=3"
    assert body["results"] == expected_rows(history)[2:5]


def test_transactions_query_count_is_constant(owner):
    def queries_for_charges(count: int, day: datetime) -> int:
        for number in range(count):
            usage_debit(
                account_id=owner.account.pk,
                request_id=f"req_{day.date()}_{number}",
                amount_nanousd=10,
                at=day + timedelta(minutes=number),
            )
        client = owner.api()
        client.get("/api/credits/transactions")  # warm the key cache
        with CaptureQueriesContext(connection) as queries:
            response = client.get("/api/credits/transactions")
        assert response.status_code == 200
        return len(queries)

    few = queries_for_charges(2, DAY_1)
    many = queries_for_charges(40, DAY_2)

    assert many == few


def test_transactions_outsider_sees_own_only(owner, outsider, history):
    response = outsider.api().get("/api/credits/transactions")

    assert response.status_code == 200
    assert response.json() == {"count": 0, "next": None, "previous": None, "results": []}
    assert owner.api().get("/api/credits/transactions").json()["count"] == 10


def test_transactions_need_management_key(owner, history):
    inference = access_key_create(account=owner.account, name="gw", scopes=["inference"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {inference.raw_key}")

    assert client.get("/api/credits/transactions").status_code == 403
    assert APIClient().get("/api/credits/transactions").status_code == 401


def test_lots_newest_first_exact_amounts(owner, outsider, history):
    response = owner.api().get("/api/credits/lots?limit=2")

    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 4
    assert [
        (lot["source"], lot["status"], lot["original_usd"], lot["remaining_usd"])
        for lot in body["results"]
    ] == [
        ("purchase", "active", "5.000000000", "5.000000000"),
        ("grant", "voided", "1.000000000", "0.000000000"),
    ]
    assert outsider.api().get("/api/credits/lots").json()["count"] == 0


def test_schema_documents_transactions_and_threshold(db):
    response = Client().get("/api/schema", {"format": "json"})

    assert response.status_code == 200
    schema = response.json()
    listing = schema["paths"]["/api/credits/transactions"]["get"]
    assert {parameter["name"] for parameter in listing["parameters"]} == {"limit", "offset"}
    page = listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    page_schema = schema["components"]["schemas"][page.rsplit("/", 1)[1]]
    assert page_schema["properties"]["results"]["items"]["$ref"].endswith("/Transaction")
    row_schema = schema["components"]["schemas"]["Transaction"]
    assert set(row_schema["properties"]) == {
        "id",
        "kind",
        "date",
        "created_at",
        "amount_usd",
        "amount_nanousd",
        "balance_after_usd",
        "balance_after_nanousd",
        "request_count",
        "description",
    }
    patch = schema["paths"]["/api/credits/balance"]["patch"]
    body = patch["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    settings_schema = schema["components"]["schemas"][body.rsplit("/", 1)[1]]
    assert set(settings_schema["properties"]) == {"low_balance_threshold_usd"}
    assert patch["summary"] == "Set the low-balance alert threshold"
    balance = schema["components"]["schemas"]["Balance"]["properties"]
    assert {"low_balance_threshold_usd", "low_balance_threshold_nanousd"} <= set(balance)


def test_credits_page_shows_same_history(owner, outsider, history):
    credit_grant(account=outsider.account, amount_nanousd=USD, reason="secret-outsider-grant")
    client = Client()
    client.force_login(owner.user)

    page = client.get(reverse("credits")).content.decode()

    table = page[page.index('data-testid="transactions"') :]
    assert table.count("<tr>") == 11  # the header and ten rows
    assert f"{DAY_3.date().isoformat()} (UTC day)" in table
    assert "2 requests" in table
    assert "1 request<" in table
    assert 'title="-$0.000000003">-$0.000000003<' in table
    assert 'title="-$0.000000002">-$0.000000002<' in table
    assert 'title="-$0.002000000">-$0.002<' in table
    assert f"Lot {history['extra_lot']} voided by support" in table
    assert "Purchase of USD 5.00" in table
    assert "secret-outsider-grant" not in page
    # Newest first: the purchase comes before the first day's grant.
    assert table.index("Purchase of USD 5.00") < table.index("welcome")
