from datetime import UTC, datetime, timedelta

import pytest
import redis
from django.core.cache import cache
from django.utils import timezone

from accounts.models import Account
from credits.models import CreditLot, LedgerEntry, LedgerTransaction
from credits.services import (
    CreditsError,
    account_balance,
    account_balance_cached,
    balance_cache_key,
    balance_generation,
    credit_grant,
    credit_lot_expire,
    credit_lots_expire_due,
    ledger,
    ledger_violations,
    lot_expiry_for,
    purchase_lot_create,
    usage_debit,
)

USD = 1_000_000_000


def grant(account, usd: int, *, at: datetime, expires_at: datetime | None = None) -> CreditLot:
    return credit_grant(
        account=account,
        amount_nanousd=usd * USD,
        reason="test",
        at=at,
        expires_at=expires_at,
        idempotency_key=f"grant-{at.isoformat()}-{usd}-{expires_at}",
    )


def assert_ledger_sound(account: Account) -> None:
    account.refresh_from_db()
    assert ledger_violations(account=account) == []


def test_lot_expires_one_calendar_year_later():
    bought = datetime(2025, 3, 10, 12, 30, tzinfo=UTC)
    assert lot_expiry_for(bought) == datetime(2026, 3, 10, 12, 30, tzinfo=UTC)


def test_leap_day_lot_expires_on_28_february():
    bought = datetime(2028, 2, 29, 8, 0, tzinfo=UTC)
    assert lot_expiry_for(bought) == datetime(2029, 2, 28, 8, 0, tzinfo=UTC)


def test_debit_draws_soonest_expiry_first(owner):
    now = timezone.now()
    late = grant(owner.account, 5, at=now, expires_at=now + timedelta(days=300))
    soon = grant(owner.account, 2, at=now, expires_at=now + timedelta(days=10))

    usage_debit(account_id=owner.account.pk, request_id="req_a", amount_nanousd=3 * USD)

    soon.refresh_from_db()
    late.refresh_from_db()
    assert soon.remaining_nanousd == 0
    assert late.remaining_nanousd == 4 * USD
    entries = LedgerEntry.objects.filter(transaction__request_id="req_a").order_by("id")
    assert [(entry.lot_id, entry.amount_nanousd) for entry in entries] == [
        (soon.pk, -2 * USD),
        (late.pk, -1 * USD),
    ]
    assert account_balance(account_id=owner.account.pk).balance_nanousd == 4 * USD
    assert_ledger_sound(owner.account)


def test_debit_ties_break_by_age_then_id(owner):
    now = timezone.now()
    expiry = now + timedelta(days=30)
    older = grant(owner.account, 1, at=now - timedelta(hours=1), expires_at=expiry)
    newer = grant(owner.account, 1, at=now, expires_at=expiry)

    usage_debit(account_id=owner.account.pk, request_id="req_tie", amount_nanousd=USD // 2)

    older.refresh_from_db()
    newer.refresh_from_db()
    assert older.remaining_nanousd == USD // 2
    assert newer.remaining_nanousd == USD


def test_same_request_id_is_charged_once(funded):
    first = usage_debit(account_id=funded.account.pk, request_id="req_once", amount_nanousd=150)
    second = usage_debit(account_id=funded.account.pk, request_id="req_once", amount_nanousd=150)

    assert first.created is True
    assert second.created is False
    assert second.transaction.pk == first.transaction.pk
    assert account_balance(account_id=funded.account.pk).balance_nanousd == 10 * USD - 150


def test_overshoot_becomes_debt_paid_from_next_lot(owner):
    now = timezone.now()
    grant(owner.account, 1, at=now)

    usage_debit(account_id=owner.account.pk, request_id="req_big", amount_nanousd=USD + 700)

    owner.account.refresh_from_db()
    assert owner.account.debt_nanousd == 700
    assert account_balance(account_id=owner.account.pk).balance_nanousd == -700

    lot = grant(owner.account, 5, at=now + timedelta(seconds=1))

    lot.refresh_from_db()
    owner.account.refresh_from_db()
    assert owner.account.debt_nanousd == 0
    assert lot.remaining_nanousd == 5 * USD - 700
    assert account_balance(account_id=owner.account.pk).balance_nanousd == 5 * USD - 700
    assert_ledger_sound(owner.account)


def test_expired_lot_is_not_spendable_before_task_runs(owner):
    now = timezone.now()
    grant(owner.account, 3, at=now - timedelta(days=2), expires_at=now - timedelta(seconds=1))
    live = grant(owner.account, 1, at=now)

    assert account_balance(account_id=owner.account.pk).balance_nanousd == USD

    usage_debit(account_id=owner.account.pk, request_id="req_exp", amount_nanousd=USD // 4)
    live.refresh_from_db()
    assert live.remaining_nanousd == 3 * USD // 4


def test_lot_expires_exactly_at_expiry(owner):
    now = timezone.now()
    expiry = now + timedelta(days=1)
    grant(owner.account, 2, at=now, expires_at=expiry)

    before = account_balance(account_id=owner.account.pk, at=expiry - timedelta(seconds=1))
    at_expiry = account_balance(account_id=owner.account.pk, at=expiry)

    assert before.balance_nanousd == 2 * USD
    assert at_expiry.balance_nanousd == 0


def test_expiry_writes_remainder_once(owner):
    now = timezone.now()
    lot = grant(owner.account, 2, at=now - timedelta(days=1), expires_at=now + timedelta(hours=1))
    usage_debit(account_id=owner.account.pk, request_id="req_pre", amount_nanousd=USD // 2)
    later = now + timedelta(hours=2)

    assert credit_lots_expire_due(at=later) == 1
    assert credit_lots_expire_due(at=later) == 0
    assert credit_lot_expire(lot_id=lot.pk, at=later) is None

    lot.refresh_from_db()
    assert lot.remaining_nanousd == 0
    assert lot.expired_at == later
    expiry = LedgerTransaction.objects.get(kind=LedgerTransaction.Kind.EXPIRY)
    assert expiry.idempotency_key == f"expire:{lot.pk}"
    assert list(expiry.entries.values_list("lot_id", "amount_nanousd")) == [
        (lot.pk, -(3 * USD // 2))
    ]
    assert_ledger_sound(owner.account)


def test_lot_not_yet_expired_is_left_alone(funded):
    lot = CreditLot.objects.get(account=funded.account)
    assert credit_lot_expire(lot_id=lot.pk) is None
    lot.refresh_from_db()
    assert lot.remaining_nanousd == 10 * USD


def test_purchase_lot_is_created_once_per_session(owner):
    lot, created = purchase_lot_create(
        account_id=owner.account.pk,
        session_id="cs_test_1",
        amount_cents=500,
        currency="usd",
        payment_intent_id="pi_1",
    )
    again, created_again = purchase_lot_create(
        account_id=owner.account.pk,
        session_id="cs_test_1",
        amount_cents=500,
        currency="usd",
        payment_intent_id="pi_1",
    )

    assert created is True
    assert created_again is False
    assert again.pk == lot.pk
    assert lot.original_nanousd == 5 * USD
    assert lot.expires_at == lot_expiry_for(lot.created_at)
    assert CreditLot.objects.count() == 1
    assert account_balance(account_id=owner.account.pk).balance_nanousd == 5 * USD


def test_grant_requires_reason_and_positive_amount(owner):
    with pytest.raises(CreditsError, match="reason"):
        credit_grant(account=owner.account, amount_nanousd=USD, reason="  ")
    with pytest.raises(CreditsError, match="positive"):
        credit_grant(account=owner.account, amount_nanousd=0, reason="promo")
    assert CreditLot.objects.count() == 0


def test_cached_balance_is_evicted_on_debit(funded, django_capture_on_commit_callbacks):
    assert account_balance_cached(account_id=funded.account.pk) == 10 * USD
    with django_capture_on_commit_callbacks(execute=True):
        usage_debit(account_id=funded.account.pk, request_id="req_cache", amount_nanousd=1234)
    assert account_balance_cached(account_id=funded.account.pk) == 10 * USD - 1234


def test_debit_caches_new_balance(funded, django_capture_on_commit_callbacks):
    account_id = funded.account.pk
    with django_capture_on_commit_callbacks(execute=True):
        usage_debit(account_id=account_id, request_id="req_cache", amount_nanousd=1234)

    generation = balance_generation(account_id=account_id)
    # Cached by the debit itself, so the next read finds it without a query.
    assert cache.get(balance_cache_key(account_id=account_id, generation=generation)) == (
        10 * USD - 1234
    )


def test_late_publication_only_retires_cache(funded, django_capture_on_commit_callbacks):
    account_id = funded.account.pk
    with django_capture_on_commit_callbacks(execute=False) as late:
        usage_debit(account_id=account_id, request_id="req_late", amount_nanousd=1234)
    # A later write, which took the account's lock after the debit committed, publishes
    # first.
    with django_capture_on_commit_callbacks(execute=True):
        credit_grant(account=funded.account, amount_nanousd=5 * USD, reason="later")
    generation = balance_generation(account_id=account_id)

    for callback in late:
        callback()

    # The debit's balance lacks the grant: the generation moves on, and nothing is cached.
    assert balance_generation(account_id=account_id) == generation + 1
    assert cache.get(balance_cache_key(account_id=account_id, generation=generation + 1)) is None
    assert account_balance_cached(account_id=account_id) == 15 * USD - 1234


def test_ledger_check_reports_tampering(funded):
    CreditLot.objects.filter(account=funded.account).update(remaining_nanousd=1)
    violations = ledger_violations(account=funded.account)
    assert len(violations) == 1
    assert "remaining is 1" in violations[0]


def test_debit_survives_failed_publication(
    funded, django_capture_on_commit_callbacks, monkeypatch
):
    """Redis failing inside the debit's transaction retires the cache, not the debit."""

    class BrokenRedis:
        def set(self, *args, **kwargs):
            raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(ledger, "_cache_redis", BrokenRedis)
    account_id = funded.account.pk
    generation = balance_generation(account_id=account_id)

    with django_capture_on_commit_callbacks(execute=True):
        usage_debit(account_id=account_id, request_id="req_broken", amount_nanousd=1234)

    assert balance_generation(account_id=account_id) == generation + 1
    assert cache.get(balance_cache_key(account_id=account_id, generation=generation + 1)) is None
    assert account_balance_cached(account_id=account_id) == 10 * USD - 1234
