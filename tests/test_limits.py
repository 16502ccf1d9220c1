"""Per-key limits: requests per minute, spend limits per UTC period, reservations, rebuilds.

Every store-level test runs twice, against Redis (the database REDIS_URL names) and
against the in-process store used without Redis, so both keep the same semantics.
"""

from datetime import UTC, datetime, timedelta
from datetime import timezone as dt_timezone

import pytest
from django.test import Client
from django.urls import reverse

from credits.services import credit_grant
from gateway import limits
from gateway.errors import GatewayError
from gateway.limits import (
    Reservation,
    held_nanousd,
    key_spend,
    limits_store,
    reservation_hold,
    reservation_settle,
    spend_period,
    worst_case_cost,
)
from gateway.models import AccessKey, UsageRecord
from gateway.pricing import Price
from gateway.services import (
    AccessKeyError,
    KeyIdentity,
    access_key_authenticate,
    access_key_create,
)

# USD 1.00 input, 4.00 output, 0.10 cache read and 1.25 cache write per million tokens.
PRICE = Price(
    input=1_000_000_000, output=4_000_000_000, cache_read=100_000_000, cache_write=1_250_000_000
)
PLAIN = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
CAPPED = {**PLAIN, "max_tokens": 100}
# "hi" estimates to 1 token: input 1 * 2 + 256 = 258 tokens at the cache-write price
# 1250 plus the fee 50, output 100 tokens at 4000 plus 50.
WORST = 258 * 1300 + 100 * 4050
TEN_USD = 10_000_000_000
T0 = datetime(2025, 3, 4, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["redis", "local"])
def store(request, settings):
    """The limits store of one backend, empty."""
    if request.param == "local":
        settings.REDIS_URL = ""
    elif not settings.REDIS_URL:
        pytest.skip("REDIS_URL is not set")
    selected = limits_store()
    assert isinstance(
        selected, limits.RedisLimits if request.param == "redis" else limits.LocalLimits
    )
    selected.clear()
    yield selected
    selected.clear()


def limited_key(tenant, **key_limits) -> KeyIdentity:
    created = access_key_create(account=tenant.account, name="limited", **key_limits)
    identity = access_key_authenticate(raw_key=created.raw_key)
    assert identity is not None
    return identity


def attempt(identity: KeyIdentity, *, at: datetime, body: dict = PLAIN):
    """Return the reservation of an admitted request, or the error of a rejected one."""
    try:
        return reservation_hold(identity=identity, body=body, prices=[PRICE], at=at)
    except GatewayError as error:
        return error


def record_usage(identity: KeyIdentity, cost: int, *, at: datetime) -> UsageRecord:
    return UsageRecord.objects.create(
        request_id=f"req_{at.timestamp()}_{cost}",
        account_id=identity.account_id,
        access_key_id=identity.key_id,
        provider="openai",
        model="gpt-4o-mini",
        surface="openai",
        key_source="builtin",
        status="succeeded",
        cost_nanousd=cost,
        created_at=at,
    )


def spend(identity: KeyIdentity, cost: int, *, at: datetime) -> None:
    """Admit a request without max_tokens, record what it cost and settle it."""
    reservation = reservation_hold(identity=identity, body=PLAIN, prices=[PRICE], at=at)
    record_usage(identity, cost, at=at)
    reservation_settle(reservation=reservation, cost_nanousd=cost, at=at)


def error_parts(error: GatewayError) -> tuple:
    return (error.status, error.openai_type, error.code, error.message, error.headers)


# Worst-case cost


@pytest.mark.parametrize(
    ("body", "price", "expected"),
    [
        (PLAIN, PRICE, 0),
        (CAPPED, PRICE, WORST),
        ({**PLAIN, "max_completion_tokens": 100}, PRICE, WORST),
        # The larger of the two limits counts.
        ({**CAPPED, "max_completion_tokens": 300}, PRICE, 258 * 1300 + 300 * 4050),
        # `n` choices each produce up to the limit.
        ({**CAPPED, "n": 3}, PRICE, 258 * 1300 + 300 * 4050),
        # Without a price (own key, custom provider) only the fee: (258 + 100) * 50.
        (CAPPED, None, 17_900),
        # 40 characters are 10 tokens, doubled plus the margin: 276 input tokens.
        (
            {**CAPPED, "system": "x" * 20, "messages": [{"role": "user", "content": "y" * 19}]},
            PRICE,
            276 * 1300 + 100 * 4050,
        ),
        ({**PLAIN, "max_tokens": True}, PRICE, 0),
        ({**PLAIN, "max_tokens": -5}, PRICE, 0),
        ({**PLAIN, "max_tokens": "100"}, PRICE, 0),
    ],
)
def test_worst_case_cost_per_body(body, price, expected):
    assert worst_case_cost(body=body, price=price) == expected


# Periods


@pytest.mark.parametrize(
    ("period", "at", "start", "end"),
    [
        (
            "daily",
            datetime(2025, 3, 4, 23, 59, 59, 999999, tzinfo=UTC),
            (2025, 3, 4),
            (2025, 3, 5),
        ),
        ("daily", datetime(2025, 3, 5, tzinfo=UTC), (2025, 3, 5), (2025, 3, 6)),
        # Weeks start on Monday: 2025-03-10 is one, and so is 2024-12-30.
        (
            "weekly",
            datetime(2025, 3, 9, 23, 59, 59, 999999, tzinfo=UTC),
            (2025, 3, 3),
            (2025, 3, 10),
        ),
        ("weekly", datetime(2025, 3, 10, tzinfo=UTC), (2025, 3, 10), (2025, 3, 17)),
        ("weekly", datetime(2025, 1, 1, 8, tzinfo=UTC), (2024, 12, 30), (2025, 1, 6)),
        (
            "monthly",
            datetime(2025, 2, 28, 23, 59, 59, 999999, tzinfo=UTC),
            (2025, 2, 1),
            (2025, 3, 1),
        ),
        ("monthly", datetime(2024, 12, 31, 23, 0, tzinfo=UTC), (2024, 12, 1), (2025, 1, 1)),
        # A time in another zone is placed by its UTC instant.
        (
            "daily",
            datetime(2025, 3, 4, 19, 30, tzinfo=dt_timezone(timedelta(hours=-5))),
            (2025, 3, 5),
            (2025, 3, 6),
        ),
    ],
)
def test_spend_period_utc_bounds(period, at, start, end):
    found = spend_period(period=period, at=at)
    assert (found.start, found.end) == (datetime(*start, tzinfo=UTC), datetime(*end, tzinfo=UTC))


def test_lifetime_spend_period_has_no_bounds():
    found = spend_period(period="never", at=T0)
    assert (found.start, found.end, found.slug) == (None, None, "all")


# Requests per minute


def test_rpm_window_slides(store, funded):
    identity = limited_key(funded, requests_per_minute=3)
    for offset in (0, 10, 20):
        assert isinstance(attempt(identity, at=T0 + timedelta(seconds=offset)), Reservation)

    rejected = attempt(identity, at=T0 + timedelta(seconds=30))
    assert error_parts(rejected) == (
        429,
        "requests",
        "rate_limit_exceeded",
        "This access key allows 3 requests per minute; retry in 30 s.",
        {"retry-after": "30"},
    )
    # One millisecond before the first request leaves the window it still counts.
    last_moment = attempt(identity, at=T0 + timedelta(seconds=59, milliseconds=999))
    assert error_parts(last_moment)[3:] == (
        "This access key allows 3 requests per minute; retry in 1 s.",
        {"retry-after": "1"},
    )
    assert isinstance(attempt(identity, at=T0 + timedelta(seconds=60)), Reservation)
    # Rejected requests did not count: the window holds the requests at 10, 20 and 60 s.
    again = attempt(identity, at=T0 + timedelta(seconds=61))
    assert error_parts(again)[4] == {"retry-after": "9"}
    assert isinstance(attempt(identity, at=T0 + timedelta(seconds=70)), Reservation)


def test_rpm_counted_per_key(store, funded):
    limited = limited_key(funded, requests_per_minute=1)
    other = limited_key(funded, requests_per_minute=1)
    assert isinstance(attempt(limited, at=T0), Reservation)
    assert isinstance(attempt(other, at=T0), Reservation)
    assert attempt(limited, at=T0).status == 429


def test_rpm_message_singular(store, funded):
    identity = limited_key(funded, requests_per_minute=1)
    attempt(identity, at=T0)
    assert attempt(identity, at=T0 + timedelta(seconds=15)).message == (
        "This access key allows 1 request per minute; retry in 45 s."
    )


# Spend limits per period


@pytest.mark.parametrize(
    ("period", "start", "last_moment", "next_start", "label"),
    [
        (
            "daily",
            datetime(2025, 3, 4, tzinfo=UTC),
            datetime(2025, 3, 4, 23, 59, 59, 999999, tzinfo=UTC),
            datetime(2025, 3, 5, tzinfo=UTC),
            "daily",
        ),
        (
            "weekly",
            datetime(2025, 3, 3, tzinfo=UTC),
            datetime(2025, 3, 9, 23, 59, 59, 999999, tzinfo=UTC),
            datetime(2025, 3, 10, tzinfo=UTC),
            "weekly",
        ),
        (
            "monthly",
            datetime(2025, 2, 1, tzinfo=UTC),
            datetime(2025, 2, 28, 23, 59, 59, 999999, tzinfo=UTC),
            datetime(2025, 3, 1, tzinfo=UTC),
            "monthly",
        ),
    ],
)
def test_spend_limit_resets_at_boundary(
    store, funded, period, start, last_moment, next_start, label
):
    identity = limited_key(funded, spend_limit_nanousd=1_000_000, spend_limit_period=period)
    spend(identity, 600_000, at=start)
    spend(identity, 400_000, at=start + timedelta(hours=1))

    rejected = attempt(identity, at=last_moment)
    assert error_parts(rejected) == (
        429,
        "insufficient_quota",
        "spend_limit_exceeded",
        f"This access key has reached its {label} spend limit of USD 0.001: USD 0.001 spent. "
        f"It resets at {next_start:%Y-%m-%dT%H:%M:%SZ}.",
        # One millisecond is left, rounded up to a whole second.
        {"retry-after": "1"},
    )
    assert isinstance(attempt(identity, at=next_start), Reservation)
    assert key_spend(identity=identity, at=last_moment) == 1_000_000
    assert key_spend(identity=identity, at=next_start) == 0


def test_lifetime_spend_limit_never_resets(store, funded):
    identity = limited_key(funded, spend_limit_nanousd=1_000_000, spend_limit_period="never")
    spend(identity, 1_000_000, at=datetime(2025, 1, 1, tzinfo=UTC))

    rejected = attempt(identity, at=datetime(2030, 6, 1, tzinfo=UTC))

    assert error_parts(rejected) == (
        429,
        "insufficient_quota",
        "spend_limit_exceeded",
        "This access key has reached its lifetime spend limit of USD 0.001: USD 0.001 spent. "
        "The limit does not reset.",
        {},
    )


def test_spend_below_limit_admits_uncapped(store, funded):
    identity = limited_key(funded, spend_limit_nanousd=1_000_000, spend_limit_period="daily")
    spend(identity, 999_999, at=T0)

    assert isinstance(attempt(identity, at=T0), Reservation)
    # A request with max_tokens must fit whole: 999_999 + WORST is over the limit.
    rejected = attempt(identity, at=T0, body=CAPPED)
    assert error_parts(rejected) == (
        429,
        "insufficient_quota",
        "spend_limit_exceeded",
        "This access key has reached its daily spend limit of USD 0.001: USD 0.000999999 "
        "spent, and this request may cost up to USD 0.0007404. It resets at "
        "2025-03-05T00:00:00Z.",
        {"retry-after": "43200"},
    )


def test_spend_limit_counts_inflight_holds(store, funded):
    identity = limited_key(funded, spend_limit_nanousd=2 * WORST - 1, spend_limit_period="monthly")
    first = attempt(identity, at=T0, body=CAPPED)
    assert isinstance(first, Reservation)
    assert first.hold_nanousd == WORST
    assert held_nanousd(account_id=identity.account_id, key_id=identity.key_id, at=T0) == WORST

    second = attempt(identity, at=T0, body=CAPPED)
    # Settled spend alone would fit, so waiting for the period end is not advised.
    assert error_parts(second) == (
        429,
        "insufficient_quota",
        "spend_limit_exceeded",
        "This access key has reached its monthly spend limit of USD 0.001480799: USD 0.00 "
        "spent, USD 0.0007404 held for requests in flight or not yet charged, and this "
        "request may cost up to USD 0.0007404. It resets at 2025-04-01T00:00:00Z.",
        {},
    )

    record_usage(identity, 1000, at=T0)
    reservation_settle(reservation=first, cost_nanousd=1000, at=T0)

    assert held_nanousd(account_id=identity.account_id, key_id=identity.key_id, at=T0) == 0
    assert key_spend(identity=identity, at=T0) == 1000
    assert isinstance(attempt(identity, at=T0, body=CAPPED), Reservation)


def test_unlimited_key_holds_on_account(store, funded):
    identity = limited_key(funded)
    reservation = attempt(identity, at=T0, body=CAPPED)

    assert isinstance(reservation, Reservation)
    assert held_nanousd(account_id=identity.account_id, at=T0) == WORST
    assert held_nanousd(account_id=identity.account_id, key_id=identity.key_id, at=T0) == 0


# Rebuilds and expiry


def test_spend_counter_rebuilt_after_flush(store, funded):
    identity = limited_key(funded, spend_limit_nanousd=1_000_000, spend_limit_period="daily")
    spend(identity, 700_000, at=T0)
    spend(identity, 300_000, at=T0 + timedelta(minutes=5))
    # Neither another key's spend nor yesterday's counts.
    other = limited_key(funded)
    record_usage(other, 5_000_000, at=T0)
    record_usage(identity, 5_000_000, at=T0 - timedelta(days=1))
    assert attempt(identity, at=T0).code == "spend_limit_exceeded"

    if isinstance(store, limits.RedisLimits):
        store.client.flushdb()
    else:
        store.clear()
    slug = spend_period(period="daily", at=T0).slug
    assert (
        store.spend_counted(
            account_id=identity.account_id, key_id=identity.key_id, spend_slug=slug
        )
        is None
    )

    rejected = attempt(identity, at=T0 + timedelta(minutes=10))

    assert rejected.message.startswith(
        "This access key has reached its daily spend limit of USD 0.001: USD 0.001 spent."
    )
    assert (
        store.spend_counted(
            account_id=identity.account_id, key_id=identity.key_id, spend_slug=slug
        )
        == 1_000_000
    )


def test_rebuilt_counter_keeps_counting(store, funded):
    identity = limited_key(funded, spend_limit_nanousd=1_000_000, spend_limit_period="monthly")
    spend(identity, 400_000, at=T0)
    limits_store().clear()

    spend(identity, 500_000, at=T0)

    assert key_spend(identity=identity, at=T0) == 900_000
    assert isinstance(attempt(identity, at=T0), Reservation)
    spend(identity, 100_000, at=T0)
    assert attempt(identity, at=T0).code == "spend_limit_exceeded"


def test_holds_lapse_after_ttl(store, funded, settings):
    settings.GATEWAY_RESERVATION_TTL_SECONDS = 30
    identity = limited_key(funded, spend_limit_nanousd=WORST, spend_limit_period="daily")
    assert isinstance(attempt(identity, at=T0, body=CAPPED), Reservation)
    just_before = T0 + timedelta(seconds=29, milliseconds=999)

    assert held_nanousd(account_id=identity.account_id, at=just_before) == WORST
    assert attempt(identity, at=just_before, body=CAPPED).code == "spend_limit_exceeded"

    lapsed = T0 + timedelta(seconds=30)
    assert held_nanousd(account_id=identity.account_id, at=lapsed) == 0
    assert isinstance(attempt(identity, at=lapsed, body=CAPPED), Reservation)


# Account credit


def test_held_credit_not_spent_twice(store, owner, settings):
    credit_grant(account=owner.account, amount_nanousd=2 * WORST, reason="test")
    identity = limited_key(owner)
    assert isinstance(attempt(identity, at=T0, body=CAPPED), Reservation)
    assert isinstance(attempt(identity, at=T0, body=CAPPED), Reservation)

    rejected = attempt(identity, at=T0, body=CAPPED)
    assert error_parts(rejected) == (
        402,
        "insufficient_quota",
        "insufficient_quota",
        "Not enough credit: the balance is USD 0.0014808, of which USD 0.0014808 is held for "
        "requests in flight or not yet charged, and this request may cost up to USD 0.0007404 "
        "(its input "
        "estimate and max_tokens at the model's prices); lower max_tokens or buy credits at "
        f"{settings.PUBLIC_URL}/credits/ or with POST /api/credits/checkout-session.",
        {},
    )
    # Without max_tokens nothing is held, but nothing is left either.
    assert attempt(identity, at=T0).message == (
        "Not enough credit: the balance is USD 0.0014808, of which USD 0.0014808 is held for "
        "requests in flight or not yet charged; retry when they are charged or buy credits at "
        f"{settings.PUBLIC_URL}/credits/ or with POST /api/credits/checkout-session."
    )


# Creating keys with limits

BAD_SPEND_LIMIT = "spend_limit must be more than USD 0 and at most USD 1,000,000."
BAD_RPM = "requests_per_minute must be a whole number from 1 to 1000000."


def test_identity_carries_key_limits(owner):
    created = access_key_create(
        account=owner.account,
        name="limited",
        spend_limit_nanousd=25_000_000_000,
        spend_limit_period="weekly",
        requests_per_minute=60,
    )

    fresh = access_key_authenticate(raw_key=created.raw_key)
    cached = access_key_authenticate(raw_key=created.raw_key)

    for identity in (fresh, cached):
        assert (
            identity.spend_limit_nanousd,
            identity.spend_limit_period,
            identity.requests_per_minute,
        ) == (25_000_000_000, "weekly", 60)


@pytest.mark.parametrize(
    ("key_limits", "message"),
    [
        ({"spend_limit_nanousd": 0}, BAD_SPEND_LIMIT),
        (
            {"spend_limit_nanousd": 10**15 + 1},
            BAD_SPEND_LIMIT,
        ),
        ({"spend_limit_nanousd": True}, BAD_SPEND_LIMIT),
        (
            {"spend_limit_nanousd": 1000, "spend_limit_period": "hourly"},
            "spend_limit_period must be one of daily, weekly, monthly, never.",
        ),
        ({"spend_limit_period": "daily"}, "spend_limit_period needs a spend_limit."),
        ({"requests_per_minute": 0}, BAD_RPM),
        (
            {"requests_per_minute": 1_000_001},
            BAD_RPM,
        ),
        ({"requests_per_minute": 2.5}, BAD_RPM),
    ],
)
def test_key_create_rejects_invalid_limits(owner, key_limits, message):
    with pytest.raises(AccessKeyError) as error:
        access_key_create(account=owner.account, name="bad", **key_limits)

    assert str(error.value) == message
    assert AccessKey.objects.for_account(owner.account).count() == 1


def test_api_key_with_limits(owner):
    response = owner.api().post(
        "/api/keys",
        {
            "name": "ci",
            "spend_limit_usd": "25.00",
            "spend_limit_period": "monthly",
            "requests_per_minute": 60,
        },
        format="json",
    )

    assert response.status_code == 201
    body = response.json()
    limits_shown = {
        "spend_limit_usd": "25.000000000",
        "spend_limit_nanousd": 25_000_000_000,
        "spend_limit_period": "monthly",
        "requests_per_minute": 60,
    }
    assert {name: body[name] for name in limits_shown} == limits_shown
    stored = AccessKey.objects.get(pk=body["id"])
    assert (
        stored.spend_limit_nanousd,
        stored.spend_limit_period,
        stored.requests_per_minute,
    ) == (25_000_000_000, "monthly", 60)
    listed = {key["id"]: key for key in owner.api().get("/api/keys").json()}
    assert {name: listed[stored.pk][name] for name in limits_shown} == limits_shown
    assert {name: listed[owner.key.access_key.pk][name] for name in limits_shown} == {
        "spend_limit_usd": None,
        "spend_limit_nanousd": None,
        "spend_limit_period": "never",
        "requests_per_minute": None,
    }


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"spend_limit_usd": "ten"}, "spend_limit_usd: 'ten' is not a USD amount such as 10.00."),
        (
            {"spend_limit_usd": "0.0000000001"},
            "spend_limit_usd: '0.0000000001' has more than nine decimal places.",
        ),
        ({"spend_limit_usd": "0"}, BAD_SPEND_LIMIT),
        (
            {"spend_limit_usd": "1000000.01"},
            BAD_SPEND_LIMIT,
        ),
        ({"spend_limit_period": "daily"}, "spend_limit_period needs a spend_limit."),
        (
            {"spend_limit_usd": "5", "spend_limit_period": "hourly"},
            'spend_limit_period: "hourly" is not a valid choice.',
        ),
        (
            {"requests_per_minute": 0},
            "requests_per_minute: Ensure this value is greater than or equal to 1.",
        ),
    ],
)
def test_api_rejects_invalid_limits(owner, payload, message):
    response = owner.api().post("/api/keys", {"name": "bad", **payload}, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["message"] == message
    assert AccessKey.objects.for_account(owner.account).count() == 1


@pytest.fixture
def owner_client(owner) -> Client:
    client = Client()
    client.force_login(owner.user)
    return client


def test_key_form_with_limits(owner, owner_client):
    response = owner_client.post(
        reverse("key-create"),
        {
            "name": "ci",
            "scopes": ["inference"],
            "spend_limit": "25.00",
            "spend_limit_period": "monthly",
            "requests_per_minute": "60",
        },
    )

    assert response.status_code == 201
    stored = AccessKey.objects.get(name="ci")
    assert (
        stored.spend_limit_nanousd,
        stored.spend_limit_period,
        stored.requests_per_minute,
    ) == (25_000_000_000, "monthly", 60)
    listing = owner_client.get(reverse("keys")).content.decode()
    assert "<td>$25.00 a month, 60 requests/min</td>" in listing
    assert "<td>None</td>" in listing


def test_key_form_period_without_limit(owner, owner_client):
    owner_client.post(
        reverse("key-create"),
        {"name": "ci", "scopes": ["inference"], "spend_limit_period": "daily"},
    )

    stored = AccessKey.objects.get(name="ci")
    assert (stored.spend_limit_nanousd, stored.spend_limit_period) == (None, "never")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"spend_limit": "lots"}, "&#x27;lots&#x27; is not a USD amount such as 10.00."),
        ({"spend_limit": "0"}, "Enter an amount above 0, such as 25.00."),
        ({"requests_per_minute": "0"}, "Ensure this value is greater than or equal to 1."),
    ],
)
def test_key_form_rejects_invalid_limits(owner, owner_client, data, message):
    response = owner_client.post(
        reverse("key-create"), {"name": "bad", "scopes": ["inference"], **data}
    )

    assert response.status_code == 200
    assert message in response.content.decode()
    assert AccessKey.objects.for_account(owner.account).count() == 1
