"""Reservations under concurrency, and limits as gateway clients see them.

Threads share one limits store, as the processes of a deployment share Redis, so these
tests read the database from worker threads and need committed rows.
"""

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from django.core.cache import cache
from django.db import connections
from django.test import Client
from django.utils import timezone

from credits.models import LedgerTransaction
from credits.services import (
    BALANCE_GENERATION_KEY,
    account_balance,
    balance_cache_key,
    balance_generation,
    credit_grant,
    usage_debit,
)
from gateway import limits, proxy
from gateway.errors import GatewayError
from gateway.limits import (
    Reservation,
    held_nanousd,
    key_spend,
    limits_store,
    reservation_hold,
    reservation_settle,
)
from gateway.models import UsageRecord
from gateway.pricing import Price, TokenUsage
from gateway.services import Attempt, KeyIdentity, access_key_authenticate, access_key_create
from gateway.settlement import Settlement, usage_settle_batch

pytestmark = pytest.mark.django_db(transaction=True)
# Fifty threads each hold a database connection: tests in this group run on one worker,
# so two of them never exceed PostgreSQL's default of 100 connections together.
MANY_CONNECTIONS = pytest.mark.xdist_group("many_connections")

# USD 1.00 input, 4.00 output, 0.10 cache read and 1.25 cache write per million tokens.
PRICE = Price(
    input=1_000_000_000, output=4_000_000_000, cache_read=100_000_000, cache_write=1_250_000_000
)
PLAIN = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
CAPPED = {**PLAIN, "max_tokens": 100}
# Input 258 tokens at 1250 plus the fee 50, output 100 tokens at 4000 plus 50.
WORST = 258 * 1300 + 100 * 4050
T0 = datetime(2025, 3, 4, 12, 0, tzinfo=UTC)
TEN_USD = 10_000_000_000

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE_BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 8,
    "messages": [{"role": "user", "content": "hi"}],
}
# The local upstream counts one input token ("hi") and returns 8 output tokens.
# gpt-4o-mini: fee 9 * 50 = 450, model 150 + 8 * 600 = 4950.
CHAT_COST = 5_400
# claude-haiku-4-5: fee 9 * 50 = 450, model 1000 + 8 * 5000 = 41000.
MESSAGE_COST = 41_450
# claude-haiku-4-5 with max_tokens 8: 258 input tokens at 1250 + 50, 8 at 5000 + 50.
MESSAGE_WORST = 258 * 1300 + 8 * 5050


def empty_store(backend: str, settings):
    """Select the limits store of `backend` and empty it."""
    if backend == "local":
        settings.REDIS_URL = ""
    elif not settings.REDIS_URL:
        pytest.skip("REDIS_URL is not set")
    selected = limits_store()
    expected = limits.RedisLimits if backend == "redis" else limits.LocalLimits
    assert isinstance(selected, expected)
    selected.clear()
    return selected


@pytest.fixture(params=["redis", "local"])
def store(request, settings):
    """The limits store of one backend, empty."""
    selected = empty_store(request.param, settings)
    yield selected
    selected.clear()


@pytest.fixture
def redis_store(settings):
    selected = empty_store("redis", settings)
    yield selected
    selected.clear()


@pytest.fixture
def local_store(settings):
    selected = empty_store("local", settings)
    yield selected
    selected.clear()


@pytest.fixture
def gateway(settings, upstream_url, model_prices):
    """Point built-in inference at the local upstream."""
    settings.OPENAI_BASE_URL = upstream_url + "/v1"
    settings.OPENAI_API_KEY = "upstream-openai-key"
    settings.ANTHROPIC_BASE_URL = upstream_url
    settings.ANTHROPIC_API_KEY = "upstream-anthropic-key"


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


def concurrently(count: int, function: Callable[[], object]) -> list:
    """Run `function` in `count` threads released together; return what each returned."""
    barrier = threading.Barrier(count)

    def run() -> object:
        barrier.wait()
        try:
            return function()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda _: run(), range(count)))


def admitted_and_rejected(outcomes: list) -> tuple[list[Reservation], list[GatewayError]]:
    admitted = [outcome for outcome in outcomes if isinstance(outcome, Reservation)]
    rejected = [outcome for outcome in outcomes if isinstance(outcome, GatewayError)]
    assert len(admitted) + len(rejected) == len(outcomes)
    return admitted, rejected


# Concurrency


@MANY_CONNECTIONS
def test_concurrent_holds_stop_at_balance(store, owner):
    credit_grant(account=owner.account, amount_nanousd=10 * WORST, reason="test")
    identity = limited_key(owner)

    outcomes = concurrently(50, lambda: attempt(identity, at=T0, body=CAPPED))

    admitted, rejected = admitted_and_rejected(outcomes)
    assert len(admitted) == 10
    assert {(error.status, error.code) for error in rejected} == {(402, "insufficient_quota")}
    assert held_nanousd(account_id=owner.account.pk, at=T0) == 10 * WORST
    assert account_balance(account_id=owner.account.pk).balance_nanousd == 10 * WORST


@MANY_CONNECTIONS
def test_concurrent_holds_stop_at_spend_limit(store, funded):
    identity = limited_key(funded, spend_limit_nanousd=10 * WORST, spend_limit_period="daily")

    outcomes = concurrently(50, lambda: attempt(identity, at=T0, body=CAPPED))

    admitted, rejected = admitted_and_rejected(outcomes)
    assert len(admitted) == 10
    assert {(error.status, error.code) for error in rejected} == {(429, "spend_limit_exceeded")}
    assert held_nanousd(account_id=funded.account.pk, key_id=identity.key_id, at=T0) == (
        10 * WORST
    )


@MANY_CONNECTIONS
def test_concurrent_requests_stop_at_rpm(store, funded):
    identity = limited_key(funded, requests_per_minute=10)

    outcomes = concurrently(50, lambda: attempt(identity, at=T0))

    admitted, rejected = admitted_and_rejected(outcomes)
    assert len(admitted) == 10
    assert {(error.status, error.code, error.headers["retry-after"]) for error in rejected} == {
        (429, "rate_limit_exceeded", "60")
    }
    # Requests without max_tokens hold nothing.
    assert held_nanousd(account_id=funded.account.pk, at=T0) == 0


def first_of_two_worst_cases(tenant) -> tuple[KeyIdentity, Reservation]:
    """Fund the account with two worst cases and admit a request that reserves one."""
    credit_grant(account=tenant.account, amount_nanousd=2 * WORST, reason="test")
    identity = limited_key(tenant)
    first = attempt(identity, at=T0, body=CAPPED)
    assert isinstance(first, Reservation)
    return identity, first


def charged_and_settled(first: Reservation, *, account_id: int) -> None:
    """Land the first request's charge: its debit commits, then its hold goes."""
    usage_debit(account_id=account_id, request_id="req_first", amount_nanousd=WORST, at=T0)
    reservation_settle(reservation=first, cost_nanousd=WORST, at=T0)


def test_stale_computed_balance_is_refused(redis_store, owner, monkeypatch):
    """A balance computed just before a charge lands is not paired with its freed hold."""
    identity, first = first_of_two_worst_cases(owner)
    generation = balance_generation(account_id=owner.account.pk)
    fills: list[tuple[int, int]] = []
    fill = limits.balance_cache_fill

    def fill_then_charge(*, account_id: int, generation: int) -> int:
        balance = fill(account_id=account_id, generation=generation)
        fills.append((generation, balance))
        if len(fills) == 1:
            charged_and_settled(first, account_id=account_id)
        return balance

    monkeypatch.setattr(limits, "balance_cache_fill", fill_then_charge)
    # Retire the cached balance, so the next request computes it.
    cache.incr(BALANCE_GENERATION_KEY.format(account_id=owner.account.pk))
    double = {**CAPPED, "max_tokens": 100, "n": 2}
    # Two choices need 258 * 1300 + 200 * 4050 = WORST + 405_000: more than is left.
    rejected = attempt(identity, at=T0, body=double)

    assert isinstance(rejected, GatewayError)
    assert (rejected.status, rejected.code) == (402, "insufficient_quota")
    # The charge moved the generation on, so the computed balance was refused; the retry
    # read the balance the charge cached under its new generation.
    assert fills == [(generation + 1, 2 * WORST)]
    assert balance_generation(account_id=owner.account.pk) == generation + 2
    assert cache.get(
        balance_cache_key(account_id=owner.account.pk, generation=generation + 2)
    ) == (WORST)
    assert held_nanousd(account_id=owner.account.pk, at=T0) == 0


def test_local_balance_read_blocks_settlement(local_store, owner, monkeypatch):
    """The local store reads the balance under the lock that dropping a hold takes."""
    identity, first = first_of_two_worst_cases(owner)
    balance_cached = limits.account_balance_cached
    charged = threading.Event()
    settled = threading.Event()

    def charge() -> None:
        try:
            usage_debit(account_id=owner.account.pk, request_id="req_first", amount_nanousd=WORST)
            charged.set()
            reservation_settle(reservation=first, cost_nanousd=WORST, at=T0)
            settled.set()
        finally:
            connections.close_all()

    def read_then_charge(*, account_id: int) -> int:
        balance = balance_cached(account_id=account_id)
        worker = threading.Thread(target=charge)
        worker.start()
        assert charged.wait(10)
        # The hold cannot go while this read is in progress.
        assert not settled.wait(0.3)
        return balance

    monkeypatch.setattr(limits, "account_balance_cached", read_then_charge)
    double = {**CAPPED, "max_tokens": 100, "n": 2}
    rejected = attempt(identity, at=T0, body=double)

    assert isinstance(rejected, GatewayError)
    assert (rejected.status, rejected.code) == (402, "insufficient_quota")
    assert settled.wait(10)
    assert held_nanousd(account_id=owner.account.pk, at=T0) == 0


# Through the gateway


def post(path: str, body: dict, *, key: str):
    return Client().post(
        path,
        json.dumps(body).encode(),
        content_type="application/json",
        headers={"authorization": f"Bearer {key}"},
    )


def usage_charges() -> list[tuple[str, int]]:
    return list(
        LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.USAGE)
        .order_by("id")
        .values_list("request_id", "amount_nanousd")
    )


def test_rpm_429_openai_shape_uncharged(store, gateway, funded):
    created = access_key_create(account=funded.account, name="rpm", requests_per_minute=1)
    first = post(CHAT, CHAT_BODY, key=created.raw_key)
    assert first.status_code == 200
    charged = [(first["x-request-id"], -CHAT_COST)]
    assert usage_charges() == charged

    second = post(CHAT, CHAT_BODY, key=created.raw_key)

    assert second.status_code == 429
    retry_after = int(second["retry-after"])
    assert 58 <= retry_after <= 60
    assert second.json() == {
        "error": {
            "message": f"This access key allows 1 request per minute; retry in {retry_after} s.",
            "type": "requests",
            "code": "rate_limit_exceeded",
            "param": None,
        }
    }
    assert second["x-request-id"].startswith("req_")
    assert usage_charges() == charged
    assert UsageRecord.objects.count() == 1
    assert account_balance(account_id=funded.account.pk).balance_nanousd == TEN_USD - CHAT_COST


def test_spend_limit_429_anthropic_shape_uncharged(store, gateway, funded):
    # The first request's hold fits; its cost plus the next one's hold does not.
    created = access_key_create(
        account=funded.account,
        name="budget",
        spend_limit_nanousd=400_000,
        spend_limit_period="daily",
    )
    identity = access_key_authenticate(raw_key=created.raw_key)
    assert MESSAGE_WORST <= 400_000 < MESSAGE_COST + MESSAGE_WORST
    first = post(MESSAGES, MESSAGE_BODY, key=created.raw_key)
    assert first.status_code == 200
    charged = [(first["request-id"], -MESSAGE_COST)]

    before = timezone.now()
    second = post(MESSAGES, MESSAGE_BODY, key=created.raw_key)

    assert second.status_code == 429
    midnight = before.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    midnight += timedelta(days=1)
    assert second.json() == {
        "type": "error",
        "error": {
            "type": "rate_limit_error",
            "message": "This access key has reached its daily spend limit of USD 0.0004: "
            "USD 0.00004145 spent, and this request may cost up to USD 0.0003758. "
            f"It resets at {midnight:%Y-%m-%dT%H:%M:%SZ}.",
        },
    }
    seconds_left = (midnight - before).total_seconds()
    assert seconds_left - 5 <= int(second["retry-after"]) <= seconds_left + 1
    assert second["request-id"] == second["x-request-id"]
    assert usage_charges() == charged
    assert UsageRecord.objects.count() == 1
    assert account_balance(account_id=funded.account.pk).balance_nanousd == (
        TEN_USD - MESSAGE_COST
    )
    assert key_spend(identity=identity) == MESSAGE_COST
    assert held_nanousd(account_id=funded.account.pk) == 0


def test_spend_limit_429_openai_shape(store, gateway, funded):
    created = access_key_create(
        account=funded.account,
        name="budget",
        spend_limit_nanousd=CHAT_COST,
        spend_limit_period="never",
    )
    assert post(CHAT, CHAT_BODY, key=created.raw_key).status_code == 200

    second = post(CHAT, CHAT_BODY, key=created.raw_key)

    assert second.status_code == 429
    assert "retry-after" not in second
    assert second.json() == {
        "error": {
            "message": "This access key has reached its lifetime spend limit of "
            "USD 0.0000054: USD 0.0000054 spent. The limit does not reset.",
            "type": "insufficient_quota",
            "code": "spend_limit_exceeded",
            "param": None,
        }
    }
    assert UsageRecord.objects.count() == 1


def test_worst_case_over_balance_402(store, gateway, owner, settings):
    credit_grant(account=owner.account, amount_nanousd=100_000, reason="test")

    rejected = post(MESSAGES, MESSAGE_BODY, key=owner.key.raw_key)

    assert rejected.status_code == 402
    assert rejected.json() == {
        "type": "error",
        "error": {
            "type": "billing_error",
            "message": "Not enough credit: the balance is USD 0.0001, and this request may "
            "cost up to USD 0.0003758 (its input estimate and max_tokens at the model's "
            f"prices); lower max_tokens or buy credits at {settings.PUBLIC_URL}/credits/ or "
            "with POST /api/credits/checkout-session.",
        },
    }
    assert usage_charges() == []
    assert UsageRecord.objects.count() == 0

    accepted = post(CHAT, CHAT_BODY, key=owner.key.raw_key)

    assert accepted.status_code == 200
    assert usage_charges() == [(accepted["x-request-id"], -CHAT_COST)]
    assert account_balance(account_id=owner.account.pk).balance_nanousd == 100_000 - CHAT_COST


def test_hold_lasts_until_settled(store, gateway, funded):
    raw_key = access_key_create(
        account=funded.account, name="budget", spend_limit_nanousd=TEN_USD
    ).raw_key
    identity = access_key_authenticate(raw_key=raw_key)
    slow = {**MESSAGE_BODY, "x_upstream": {"delay-ms": 1500}}
    seen: list[int] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        response = pool.submit(post, MESSAGES, slow, key=raw_key)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            held = held_nanousd(account_id=funded.account.pk, key_id=identity.key_id)
            if held:
                seen.append(held)
            time.sleep(0.02)
        assert response.result().status_code == 200

    assert seen == [MESSAGE_WORST]
    assert held_nanousd(account_id=funded.account.pk) == 0
    assert held_nanousd(account_id=funded.account.pk, key_id=identity.key_id) == 0
    assert key_spend(identity=identity) == MESSAGE_COST


def test_upstream_error_releases_hold(store, gateway, funded):
    raw_key = access_key_create(
        account=funded.account,
        name="budget",
        spend_limit_nanousd=TEN_USD,
        spend_limit_period="daily",
    ).raw_key
    identity = access_key_authenticate(raw_key=raw_key)

    response = post(MESSAGES, {**MESSAGE_BODY, "x_upstream": {"status": 500}}, key=raw_key)

    assert response.status_code == 500
    record = UsageRecord.objects.get()
    assert (record.status, record.cost_nanousd) == (UsageRecord.Status.UPSTREAM_ERROR, 0)
    assert usage_charges() == []
    assert held_nanousd(account_id=funded.account.pk) == 0
    assert key_spend(identity=identity) == 0


def test_concurrent_gateway_requests_no_overshoot(store, gateway, owner):
    credit_grant(account=owner.account, amount_nanousd=5 * MESSAGE_WORST, reason="test")
    # Each answer takes long enough that all requests are admitted before any settles.
    slow = {**MESSAGE_BODY, "x_upstream": {"delay-ms": 2000}}

    responses = concurrently(15, lambda: post(MESSAGES, slow, key=owner.key.raw_key))

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 5 + [402] * 10
    assert len(usage_charges()) == 5
    assert account_balance(account_id=owner.account.pk).balance_nanousd == (
        5 * MESSAGE_WORST - 5 * MESSAGE_COST
    )
    assert held_nanousd(account_id=owner.account.pk) == 0


def test_repeat_requests_skip_worker_thread(redis_store, gateway, funded, monkeypatch):
    threaded: list[str] = []
    request_admit = proxy.request_admit

    def counted(**kwargs):
        threaded.append(kwargs["raw_key"])
        return request_admit(**kwargs)

    monkeypatch.setattr(proxy, "request_admit", counted)
    responses = [post(CHAT, CHAT_BODY, key=funded.key.raw_key) for _ in range(3)]

    assert [response.status_code for response in responses] == [200, 200, 200]
    # Only the first request, whose key this process had not seen, went to a thread.
    assert threaded == [funded.key.raw_key]
    assert usage_charges() == [(response["x-request-id"], -CHAT_COST) for response in responses]
    assert account_balance(account_id=funded.account.pk).balance_nanousd == (
        TEN_USD - 3 * CHAT_COST
    )
    assert held_nanousd(account_id=funded.account.pk) == 0


def test_settlement_caches_balance_with_release(redis_store, funded, monkeypatch):
    """The new balance and the dropped reservation become visible in one step."""
    account_id = funded.account.pk
    identity = limited_key(funded)
    reservation = attempt(identity, at=timezone.now(), body=CAPPED)
    assert isinstance(reservation, Reservation)
    charged = Attempt(
        request_id="req_settled",
        account_id=account_id,
        key_id=identity.key_id,
        provider="openai",
        model="m",
        surface="openai",
        key_source=UsageRecord.KeySource.BUILTIN,
        status=UsageRecord.Status.SUCCEEDED,
        http_status=200,
        streamed=False,
        usage=TokenUsage(input_tokens=10, output_tokens=5),
        latency_ms=5,
        price=PRICE,
    )
    # 10 input tokens at 1000 + 50 and 5 output tokens at 4000 + 50.
    cost = 10 * 1050 + 5 * 4050
    between: list[tuple[int | None, int]] = []
    settle = limits.RedisLimits.settle

    def observed(self, items, publications=None):
        # The debit has committed; the cache must still show the old balance and hold.
        generation = balance_generation(account_id=account_id)
        cached = cache.get(balance_cache_key(account_id=account_id, generation=generation))
        between.append((cached, held_nanousd(account_id=account_id)))
        settle(self, items, publications)

    monkeypatch.setattr(limits.RedisLimits, "settle", observed)

    usage_settle_batch([Settlement(charged, reservation, final=True)])

    assert LedgerTransaction.objects.get(request_id="req_settled").amount_nanousd == -cost
    assert between == [(TEN_USD, WORST)]
    generation = balance_generation(account_id=account_id)
    assert cache.get(balance_cache_key(account_id=account_id, generation=generation)) == (
        TEN_USD - cost
    )
    assert held_nanousd(account_id=account_id) == 0
