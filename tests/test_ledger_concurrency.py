"""The ledger under real concurrency, on PostgreSQL.

Each test runs operations from a pool of threads, each with its own database
connection (closed when its task ends), all released at once by an event. The account
row lock must serialise them: no update is lost, a duplicate is applied once, and the
invariants hold at the end.
"""

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TypeVar

import pytest
from django.db import connection
from django.utils import timezone

from credits.models import CheckoutPurchase, CreditLot, LedgerTransaction
from credits.services import (
    Debit,
    account_balance,
    account_balance_cached,
    credit_grant,
    credit_lots_expire_due,
    ledger,
    ledger_violations,
    purchase_lot_create,
    usage_debit,
)

pytestmark = pytest.mark.django_db(transaction=True)

WORKERS = 16
CENT = 10_000_000


T = TypeVar("T")


def race(tasks: list[Callable[[], T]]) -> list[T]:
    """Run every task on the pool, all released together, and return results in task order.

    Each task closes its thread's database connection when it ends, so no connection
    outlives the test database.
    """
    start = threading.Event()

    def run(task: Callable[[], T]) -> T:
        try:
            start.wait(timeout=10)
            return task()
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = [pool.submit(run, task) for task in tasks]
        start.set()
        return [future.result(timeout=60) for future in futures]


class Gateway:
    """Admit a request as the gateway does (cached balance above zero), then charge it.

    Counts the requests in flight, from the balance check until the debit has
    committed, and the most that were ever in flight at once.
    """

    def __init__(self, account_id: int, cost_nanousd: int) -> None:
        self.account_id = account_id
        self.cost_nanousd = cost_nanousd
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    def request(self, request_id: str) -> Debit | None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if account_balance_cached(account_id=self.account_id) <= 0:
                return None
            return usage_debit(
                account_id=self.account_id,
                request_id=request_id,
                amount_nanousd=self.cost_nanousd,
            )
        finally:
            with self.lock:
                self.in_flight -= 1


def test_racing_debits_bound_overshoot_by_in_flight(owner):
    cost = 1_234_567
    # The lot covers 60 debits and part of the 61st, and 200 race for it.
    lot = credit_grant(account=owner.account, amount_nanousd=60 * cost + cost // 2, reason="race")
    gateway = Gateway(owner.account.pk, cost)

    results = race([lambda i=i: gateway.request(f"req_race_{i}") for i in range(200)])

    debits = [result for result in results if result is not None]
    admitted = len(debits)
    assert all(debit.created for debit in debits)
    assert admitted >= 61
    lot.refresh_from_db()
    owner.account.refresh_from_db()
    drawn = lot.original_nanousd - lot.remaining_nanousd
    assert lot.remaining_nanousd == 0
    # No lost update: every debit is in the lot drawn or in the debt.
    assert admitted * cost == drawn + owner.account.debt_nanousd
    usage = LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.USAGE).order_by("id")
    assert sum(usage.values_list("amount_nanousd", flat=True)) == -admitted * cost
    # Serialised by the account lock: each debit saw the balance the one before left.
    assert list(usage.values_list("balance_after_nanousd", flat=True)) == [
        lot.original_nanousd - k * cost for k in range(1, admitted + 1)
    ]
    # Overshoot: an admitted request saw a positive balance, so the debt can only come
    # from the requests that were in flight together.
    overshoot = owner.account.debt_nanousd
    assert 0 < overshoot < gateway.max_in_flight * cost
    assert gateway.max_in_flight <= WORKERS
    assert account_balance(account_id=owner.account.pk).balance_nanousd == -overshoot
    assert account_balance_cached(account_id=owner.account.pk) == -overshoot
    assert ledger_violations(account=owner.account) == []


def test_concurrent_duplicate_debit_charged_once(owner):
    credit_grant(account=owner.account, amount_nanousd=100 * CENT, reason="race")
    cost = 777_777
    request_ids = [f"req_dup_{n}" for n in range(20)]
    tasks = [
        lambda request_id=request_id: usage_debit(
            account_id=owner.account.pk, request_id=request_id, amount_nanousd=cost
        )
        for request_id in request_ids
        for _copy in range(8)
    ]

    results = race(tasks)

    for n, request_id in enumerate(request_ids):
        copies = results[n * 8 : (n + 1) * 8]
        assert [debit.created for debit in copies].count(True) == 1
        transaction_ids = {debit.transaction.pk for debit in copies}
        assert transaction_ids == {
            LedgerTransaction.objects.get(idempotency_key=f"usage:{request_id}").pk
        }
    assert LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.USAGE).count() == 20
    balance = account_balance(account_id=owner.account.pk)
    assert balance.balance_nanousd == 100 * CENT - 20 * cost
    assert balance.debt_nanousd == 0
    assert ledger_violations(account=owner.account) == []


def test_concurrent_duplicate_fulfilment_one_lot(owner):
    # Debt of 3 cents, to be paid once, out of the first lot only.
    usage_debit(account_id=owner.account.pk, request_id="req_debt", amount_nanousd=3 * CENT)
    sessions = [f"cs_race_{n}" for n in range(10)]
    for session_id in sessions:
        CheckoutPurchase.objects.create(
            account=owner.account, stripe_session_id=session_id, amount_cents=500
        )
    tasks = [
        lambda session_id=session_id: purchase_lot_create(
            account_id=owner.account.pk,
            session_id=session_id,
            amount_cents=500,
            currency="usd",
            payment_intent_id=f"pi_{session_id}",
        )
        for session_id in sessions
        for _copy in range(6)
    ]

    results = race(tasks)

    assert CreditLot.objects.filter(account=owner.account).count() == 10
    for n, session_id in enumerate(sessions):
        copies = results[n * 6 : (n + 1) * 6]
        assert [created for _lot, created in copies].count(True) == 1
        lot = CreditLot.objects.get(stripe_checkout_session_id=session_id)
        assert {copy_lot.pk for copy_lot, _created in copies} == {lot.pk}
        purchase = CheckoutPurchase.objects.get(stripe_session_id=session_id)
        assert (purchase.status, purchase.lot_id) == (CheckoutPurchase.Status.FULFILLED, lot.pk)
    assert LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.PURCHASE).count() == 10
    remaining = sorted(
        CreditLot.objects.filter(account=owner.account).values_list("remaining_nanousd", flat=True)
    )
    assert remaining == [500 * CENT - 3 * CENT] + [500 * CENT] * 9
    balance = account_balance(account_id=owner.account.pk)
    assert (balance.balance_nanousd, balance.debt_nanousd) == (10 * 500 * CENT - 3 * CENT, 0)
    assert ledger_violations(account=owner.account) == []


def test_mixed_concurrent_operations_keep_ledger_sound(owner):
    now = timezone.now()
    stale = credit_grant(
        account=owner.account,
        amount_nanousd=7 * CENT,
        reason="stale",
        at=now - timedelta(days=2),
        expires_at=now - timedelta(seconds=1),
    )
    credit_grant(account=owner.account, amount_nanousd=5 * CENT, reason="live")
    cost = 3_333_333
    tasks: list[Callable[[], object]] = []
    for n in range(120):
        tasks.append(
            lambda n=n: usage_debit(
                account_id=owner.account.pk, request_id=f"req_mix_{n}", amount_nanousd=cost
            )
        )
        if n % 12 == 0:
            tasks.append(
                lambda n=n: purchase_lot_create(
                    account_id=owner.account.pk,
                    session_id=f"cs_mix_{n}",
                    amount_cents=5,
                    currency="usd",
                    payment_intent_id=f"pi_mix_{n}",
                )
            )
        if n % 30 == 0:
            tasks.append(credit_lots_expire_due)

    race(tasks)

    stale.refresh_from_db()
    owner.account.refresh_from_db()
    assert stale.remaining_nanousd == 0
    assert stale.expired_at is not None
    assert LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.EXPIRY).count() == 1
    bought = 5 * CENT + 10 * 5 * CENT
    spent = 120 * cost
    balance = account_balance(account_id=owner.account.pk)
    assert balance.balance_nanousd == bought - spent
    assert balance.debt_nanousd == owner.account.debt_nanousd
    assert ledger_violations(account=owner.account) == []


def test_cached_balance_never_predates_a_debit(funded, monkeypatch):
    """A reader that computed the balance before a debit must not cache it after the debit.

    The reader thread pauses between reading the database and writing the cache, and the
    debit commits (and evicts) in that gap.
    """
    account_id = funded.account.pk
    computed, resume = threading.Event(), threading.Event()
    real_balance = ledger.account_balance

    def paused_balance(**kwargs):
        balance = real_balance(**kwargs)
        if threading.current_thread().name.startswith("reader"):
            computed.set()
            resume.wait(timeout=10)
        return balance

    monkeypatch.setattr(ledger, "account_balance", paused_balance)

    def read() -> int:
        try:
            return account_balance_cached(account_id=account_id)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reader") as pool:
        stale = pool.submit(read)
        assert computed.wait(timeout=10)
        usage_debit(account_id=account_id, request_id="req_gap", amount_nanousd=4_321)
        resume.set()
        assert stale.result(timeout=10) == 10 * 100 * CENT

    assert account_balance_cached(account_id=account_id) == 10 * 100 * CENT - 4_321
