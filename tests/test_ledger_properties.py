"""Random sequences of ledger operations match the reference model after every step.

Each example runs purchases, grants, debits, retries, expiry runs and time jumps at
random instants, spelled in a random time zone, against the real services and against
`tests.ledger_model`, then compares balance, debt and every lot exactly and checks the
ledger invariants. Each example runs in a transaction that is rolled back, so the next
one starts from an empty ledger.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from io import StringIO
from zoneinfo import ZoneInfo

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.models import Account
from credits.models import CreditLot, LedgerEntry, LedgerTransaction
from credits.services import (
    Balance,
    account_balance,
    credit_grant,
    credit_lots_expire_due,
    ledger_violations,
    purchase_lot_create,
    usage_debit,
)
from tests.ledger_model import LedgerModel, Outcome

pytestmark = pytest.mark.django_db

CENT = 10_000_000
USD = 1_000_000_000
ZONES = ["UTC", "America/Los_Angeles", "Asia/Kolkata", "Pacific/Chatham", "Australia/Lord_Howe"]


# Steps of a random sequence. `pick` chooses among earlier lots or operations, modulo
# how many there are, so every drawn value means something whatever came before.
@dataclass(frozen=True)
class Purchase:
    cents: int


@dataclass(frozen=True)
class Grant:
    amount_nanousd: int
    # None: the default lifetime; a timedelta: that long from now; an int: the same
    # expiry as an earlier lot (a tie that the age or the id must break).
    expiry: timedelta | int | None


@dataclass(frozen=True)
class Debit:
    amount_nanousd: int


@dataclass(frozen=True)
class Retry:
    pick: int


@dataclass(frozen=True)
class ExpireDue:
    pass


@dataclass(frozen=True)
class Advance:
    by: timedelta


@dataclass(frozen=True)
class AdvanceToExpiry:
    pick: int
    offset_seconds: int


picks = st.integers(min_value=0, max_value=63)
# Tiny amounts split lots at odd places; large ones drain several lots into debt.
amounts = st.one_of(
    st.integers(min_value=1, max_value=10_000), st.integers(min_value=CENT, max_value=6 * CENT)
)
steps = st.one_of(
    st.builds(Purchase, cents=st.integers(min_value=1, max_value=5)),
    st.builds(
        Grant,
        amount_nanousd=amounts,
        expiry=st.one_of(
            st.none(),
            st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=500)),
            picks,
        ),
    ),
    st.builds(Debit, amount_nanousd=amounts),
    st.builds(Debit, amount_nanousd=amounts),
    st.builds(Retry, pick=picks),
    st.builds(ExpireDue),
    st.builds(Advance, by=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=400))),
    st.builds(
        AdvanceToExpiry, pick=picks, offset_seconds=st.sampled_from([-1, 0, 1, 3600])
    ),
)
starts = st.one_of(
    st.datetimes(
        min_value=datetime(2020, 1, 1),
        max_value=datetime(2035, 12, 31),
        timezones=st.just(UTC),
    ),
    st.sampled_from(
        [
            datetime(2028, 2, 29, 0, 30, tzinfo=ZoneInfo("Asia/Kolkata")),
            datetime(2024, 12, 31, 23, 30, tzinfo=ZoneInfo("Pacific/Chatham")),
            datetime(2025, 3, 8, 12, 0, tzinfo=ZoneInfo("America/Los_Angeles")),
            datetime(2025, 11, 2, 1, 30, fold=1, tzinfo=ZoneInfo("America/Los_Angeles")),
        ]
    ),
)


class Run:
    """Apply steps to the services and the model, and compare them after each one."""

    def __init__(self, account: Account, start: datetime, zone: ZoneInfo) -> None:
        self.account = account
        self.zone = zone
        self.now = start
        self.model = LedgerModel()
        # Replayable operations, in order: ("purchase", session id, cents) or
        # ("debit", request id, amount).
        self.operations: list[tuple[str, str, int]] = []
        self.expiries_written = 0

    @property
    def at(self) -> datetime:
        """Return the current instant spelled in the example's zone, as a caller might."""
        return self.now.astimezone(self.zone)

    def apply(self, step) -> None:
        match step:
            case Purchase(cents=cents):
                session_id = f"cs_prop_{len(self.operations)}"
                self.operations.append(("purchase", session_id, cents))
                self.purchase(session_id, cents)
            case Grant():
                self.grant(step)
            case Debit(amount_nanousd=amount):
                request_id = f"req_prop_{len(self.operations)}"
                self.operations.append(("debit", request_id, amount))
                self.debit(request_id, amount)
            case Retry(pick=pick) if self.operations:
                kind, name, value = self.operations[pick % len(self.operations)]
                if kind == "purchase":
                    self.purchase(name, value)
                else:
                    self.debit(name, value)
            case ExpireDue():
                due = self.model.expire_due(at=self.at)
                assert credit_lots_expire_due(at=self.at) == len(due)
                self.expiries_written += len(due)
            case Advance(by=by):
                self.now += by
            case AdvanceToExpiry(pick=pick, offset_seconds=offset) if self.model.lots:
                lot = self.model.lots[pick % len(self.model.lots)]
                target = lot.expires_at + timedelta(seconds=offset)
                self.now = max(self.now, target)
        self.check()

    def purchase(self, session_id: str, cents: int) -> None:
        expected = self.model.purchase(session_id=session_id, amount_cents=cents, at=self.at)
        lot, created = purchase_lot_create(
            account_id=self.account.pk,
            session_id=session_id,
            amount_cents=cents,
            currency="usd",
            payment_intent_id=f"pi_{session_id}",
            at=self.at,
        )
        assert created is expected.applied
        self.check_transaction(f"checkout:{session_id}", expected)

    def grant(self, step: Grant) -> None:
        key = f"grant_prop_{len(self.model.lots)}"
        expires_at = None
        if isinstance(step.expiry, timedelta):
            expires_at = self.at + step.expiry
        elif isinstance(step.expiry, int) and self.model.lots:
            earlier = self.model.lots[step.expiry % len(self.model.lots)].expires_at
            expires_at = earlier if earlier > self.now else None
        expected = self.model.grant(
            key=key, amount_nanousd=step.amount_nanousd, at=self.at, expires_at=expires_at
        )
        credit_grant(
            account=self.account,
            amount_nanousd=step.amount_nanousd,
            reason="property test",
            expires_at=expires_at,
            idempotency_key=key,
            at=self.at,
        )
        self.check_transaction(key, expected)

    def debit(self, request_id: str, amount: int) -> None:
        expected = self.model.debit(request_id=request_id, amount_nanousd=amount, at=self.at)
        debit = usage_debit(
            account_id=self.account.pk,
            request_id=request_id,
            amount_nanousd=amount,
            description="property test",
            at=self.at,
        )
        assert debit.created is expected.applied
        self.check_transaction(f"usage:{request_id}", expected)

    def check_transaction(self, key: str, expected: Outcome) -> None:
        written = LedgerTransaction.objects.get(idempotency_key=key)
        assert (written.amount_nanousd, written.balance_after_nanousd) == (
            expected.amount_nanousd,
            expected.balance_after_nanousd,
        )

    def check(self) -> None:
        """Compare balance, debt and every lot with the model; check the invariants."""
        model = self.model
        self.account.refresh_from_db()
        assert self.account.debt_nanousd == model.debt_nanousd
        assert account_balance(account_id=self.account.pk, at=self.at) == Balance(
            balance_nanousd=model.balance_nanousd(self.now),
            spendable_nanousd=model.spendable_nanousd(self.now),
            debt_nanousd=model.debt_nanousd,
            next_expiry_at=model.next_expiry_at(self.now),
        )
        lots = CreditLot.objects.filter(account=self.account).order_by("id")
        assert [
            (
                lot.source,
                lot.original_nanousd,
                lot.remaining_nanousd,
                lot.created_at,
                lot.expires_at,
                lot.expired_at,
                lot.stripe_checkout_session_id,
            )
            for lot in lots
        ] == [
            (
                lot.source,
                lot.original_nanousd,
                lot.remaining_nanousd,
                lot.created_at,
                lot.expires_at,
                lot.expired_at,
                lot.session_id,
            )
            for lot in model.lots
        ]
        assert (
            LedgerTransaction.objects.filter(account=self.account).count()
            == len(model.applied) + self.expiries_written
        )
        assert ledger_violations(account=self.account, at=self.at) == []


@settings(
    max_examples=70,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    start=starts,
    zone=st.sampled_from(ZONES).map(ZoneInfo),
    sequence=st.lists(steps, min_size=1, max_size=30),
)
def test_random_operations_match_the_reference_model_after_every_step(
    owner, start, zone, sequence
):
    with transaction.atomic():
        try:
            run = Run(owner.account, start.astimezone(UTC), zone)
            for step in sequence:
                run.apply(step)
        finally:
            transaction.set_rollback(True)


def test_overshoot_debt_is_paid_first_out_of_the_next_purchase(owner):
    start = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
    run = Run(owner.account, start, ZoneInfo("UTC"))
    for step in [
        Purchase(cents=1),
        Debit(amount_nanousd=CENT + 700),
        Advance(by=timedelta(seconds=5)),
        Purchase(cents=2),
    ]:
        run.apply(step)

    first, second = CreditLot.objects.filter(account=owner.account).order_by("id")
    assert (first.remaining_nanousd, second.remaining_nanousd) == (0, 2 * CENT - 700)
    owner.account.refresh_from_db()
    assert owner.account.debt_nanousd == 0
    repayment = LedgerTransaction.objects.get(idempotency_key="checkout:cs_prop_2")
    assert list(repayment.entries.values_list("lot_id", "amount_nanousd")) == [
        (second.pk, -700),
        (None, 700),
    ]
    assert repayment.balance_after_nanousd == 2 * CENT - 700


def test_check_ledger_passes_a_sound_ledger(owner, outsider):
    credit_grant(account=owner.account, amount_nanousd=USD, reason="promo")
    usage_debit(account_id=owner.account.pk, request_id="req_sound", amount_nanousd=2 * USD)
    purchase_lot_create(
        account_id=owner.account.pk,
        session_id="cs_sound",
        amount_cents=500,
        currency="usd",
        payment_intent_id="pi_sound",
    )
    everyone, one = StringIO(), StringIO()

    call_command("check_ledger", stdout=everyone)
    call_command("check_ledger", account="acme", stdout=one)

    assert everyone.getvalue() == "Ledger sound: 2 accounts checked\n"
    assert one.getvalue() == "Ledger sound: 1 accounts checked\n"
    assert ledger_violations(account=owner.account) == []


def test_check_ledger_fails_when_a_lot_disagrees_with_its_entries(owner, outsider, capsys):
    lot = credit_grant(account=owner.account, amount_nanousd=USD, reason="promo")
    usage_debit(account_id=owner.account.pk, request_id="req_bad", amount_nanousd=300)
    CreditLot.objects.filter(pk=lot.pk).update(remaining_nanousd=USD)

    with pytest.raises(CommandError, match=r"^1 ledger violations in 2 accounts\.$"):
        call_command("check_ledger")

    assert capsys.readouterr().err == (
        f"lot {lot.pk}: original {USD} plus entries is {USD - 300}, but remaining is {USD}\n"
    )
    call_command("check_ledger", account="outsider")


def test_check_ledger_fails_when_debt_disagrees_with_its_entries(owner):
    usage_debit(account_id=owner.account.pk, request_id="req_debt", amount_nanousd=900)
    Account.objects.filter(pk=owner.account.pk).update(debt_nanousd=100)

    with pytest.raises(CommandError, match=r"^1 ledger violations in 1 accounts\.$"):
        call_command("check_ledger", account="acme")


def test_check_ledger_fails_when_an_entry_is_deleted(funded):
    usage_debit(account_id=funded.account.pk, request_id="req_gone", amount_nanousd=5_000)
    LedgerEntry.objects.filter(transaction__request_id="req_gone").delete()

    violations = ledger_violations(account=funded.account)

    lot = CreditLot.objects.get(account=funded.account)
    debit = LedgerTransaction.objects.get(request_id="req_gone")
    assert violations == [
        f"lot {lot.pk}: original {10 * USD} plus entries is {10 * USD}, "
        f"but remaining is {10 * USD - 5_000}",
        f"transaction {debit.pk}: amount -5000 but entries and opened lot sum to 0",
    ]
    with pytest.raises(CommandError, match=r"^2 ledger violations in 1 accounts\.$"):
        call_command("check_ledger")
