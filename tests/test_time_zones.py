"""Expiry is the same instant whatever the server's time zone.

Storage is UTC, and `TIME_ZONE` only changes how times are shown. Each test runs in several
server zones, with that zone active, and passes instants spelled in that zone.
"""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import time_machine
from dateutil.relativedelta import relativedelta
from django.utils import timezone
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from credits.models import CreditLot, LedgerTransaction
from credits.services import (
    account_balance,
    credit_grant,
    credit_lots_expire_due,
    ledger_violations,
    lot_expiry_for,
    purchase_lot_create,
    usage_debit,
)

pytestmark = pytest.mark.django_db

ZONES = [
    "UTC",
    "America/Los_Angeles",
    "Asia/Kolkata",
    "Pacific/Chatham",
    "Australia/Lord_Howe",
    "Pacific/Kiritimati",
]
# Zones ahead of UTC on 31 December. Their New Year's Eve evening is still 31 December
# in UTC.
ZONES_AHEAD = ["Asia/Kolkata", "Pacific/Chatham", "Australia/Lord_Howe", "Pacific/Kiritimati"]
SECOND = timedelta(seconds=1)
USD = 1_000_000_000


@pytest.fixture(params=ZONES)
def server_zone(request, settings):
    """Run the test with the server's `TIME_ZONE` set to one zone, and that zone active."""
    settings.TIME_ZONE = request.param
    with timezone.override(request.param):
        yield ZoneInfo(request.param)


def buy(account, session_id: str, cents: int, at: datetime | None = None) -> CreditLot:
    lot, created = purchase_lot_create(
        account_id=account.pk,
        session_id=session_id,
        amount_cents=cents,
        currency="usd",
        payment_intent_id=f"pi_{session_id}",
        at=at,
    )
    assert created is True
    return lot


@pytest.mark.parametrize(
    "wall_clock",
    [datetime(2027, 1, 1, 0, 0), datetime(2026, 11, 1, 1, 30, fold=1)],
    ids=["new-year-midnight", "repeated-hour-of-dst-end"],
)
def test_lot_usable_until_one_second_before_expiry(owner, server_zone, wall_clock):
    expiry = wall_clock.replace(tzinfo=server_zone)
    lot = credit_grant(
        account=owner.account,
        amount_nanousd=USD,
        reason="zone",
        at=expiry - timedelta(days=10),
        expires_at=expiry,
    )
    account_id = owner.account.pk

    assert lot.is_spendable(at=expiry - SECOND) is True
    assert lot.is_spendable(at=expiry) is False
    assert account_balance(account_id=account_id, at=expiry - SECOND).balance_nanousd == USD
    assert account_balance(account_id=account_id, at=expiry).balance_nanousd == 0
    assert credit_lots_expire_due(at=expiry - SECOND) == 0

    usage_debit(
        account_id=account_id, request_id="req_before", amount_nanousd=1_000, at=expiry - SECOND
    )
    usage_debit(account_id=account_id, request_id="req_at", amount_nanousd=500, at=expiry)

    lot.refresh_from_db()
    owner.account.refresh_from_db()
    assert (lot.remaining_nanousd, owner.account.debt_nanousd) == (USD - 1_000, 500)
    assert credit_lots_expire_due(at=expiry) == 1
    lot.refresh_from_db()
    # In UTC: a time in a repeated hour (fold=1) never equals another zone's time.
    assert (lot.remaining_nanousd, lot.expired_at) == (0, expiry.astimezone(UTC))
    assert account_balance(account_id=account_id, at=expiry).balance_nanousd == -500
    assert ledger_violations(account=owner.account, at=expiry) == []


def test_lot_ends_when_clock_reaches_expiry(owner, server_zone):
    bought = datetime(2026, 6, 15, 9, 45, tzinfo=server_zone)
    with time_machine.travel(bought, tick=False):
        lot = buy(owner.account, "cs_clock", 500)
    expiry = bought.astimezone(UTC) + relativedelta(years=1)
    assert lot.expires_at == expiry

    with time_machine.travel(expiry - SECOND, tick=False):
        assert account_balance(account_id=owner.account.pk).balance_nanousd == 5 * USD
        assert credit_lots_expire_due() == 0
    with time_machine.travel(expiry, tick=False):
        assert account_balance(account_id=owner.account.pk).balance_nanousd == 0
        assert credit_lots_expire_due() == 1

    lot.refresh_from_db()
    assert (lot.remaining_nanousd, lot.expired_at) == (0, expiry)
    expiry_record = LedgerTransaction.objects.get(kind=LedgerTransaction.Kind.EXPIRY)
    assert list(expiry_record.entries.values_list("lot_id", "amount_nanousd")) == [
        (lot.pk, -5 * USD)
    ]


def test_leap_day_lot_expires_28_february(owner, server_zone):
    # 08:00 UTC on 29 February 2028 is 29 February in every zone tested, and so is
    # 08:00 UTC on 28 February 2029.
    bought = datetime(2028, 2, 29, 8, 0, tzinfo=UTC).astimezone(server_zone)
    with time_machine.travel(bought, tick=False):
        from_clock = buy(owner.account, "cs_leap_clock", 500)
    spelled_locally = buy(owner.account, "cs_leap_local", 500, at=bought)

    expected = datetime(2029, 2, 28, 8, 0, tzinfo=UTC)
    assert from_clock.expires_at == expected
    assert spelled_locally.expires_at == expected
    assert timezone.localtime(expected).date() == timezone.localtime(bought).date().replace(
        year=2029, day=28
    )


@pytest.mark.parametrize("zone_name", ZONES_AHEAD)
def test_new_year_eve_lot_expires_one_year_later(owner, settings, zone_name):
    zone = ZoneInfo(zone_name)
    settings.TIME_ZONE = zone_name
    bought = datetime(2025, 12, 31, 23, 30, tzinfo=zone)
    assert bought.utcoffset() > timedelta(0)

    with timezone.override(zone), time_machine.travel(bought, tick=False):
        from_clock = buy(owner.account, "cs_nye_clock", 500)
    with timezone.override(zone):
        spelled_locally = buy(owner.account, "cs_nye_local", 500, at=bought)

    expected = bought.astimezone(UTC) + relativedelta(years=1)
    assert expected == datetime(2026, 12, 31, 23, 30, tzinfo=zone)
    assert from_clock.created_at == bought
    assert from_clock.expires_at == expected
    assert spelled_locally.expires_at == expected
    assert (
        account_balance(account_id=owner.account.pk, at=expected - SECOND).balance_nanousd
        == 10 * USD
    )
    assert account_balance(account_id=owner.account.pk, at=expected).balance_nanousd == 0


@hypothesis_settings(max_examples=200, deadline=None)
@given(
    instant=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2090, 12, 31), timezones=st.just(UTC)
    ),
    zone=st.sampled_from(ZONES + ["Europe/London", "America/Santiago"]).map(ZoneInfo),
)
def test_expiry_ignores_the_spelling_zone(instant, zone):
    expected = instant + relativedelta(years=1)

    assert lot_expiry_for(instant.astimezone(zone)) == expected
    assert lot_expiry_for(instant) == expected
