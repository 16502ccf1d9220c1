"""Random sequences of ledger operations match the reference model after every step.

Each example is a random sequence of purchases, grants (some backdated), single and
batched debits, refunds, dispute openings and closings, repeated deliveries of all of
these, expiry runs and time jumps. Each runs at a random instant, spelled in a random
time zone, against the real services and against `tests.ledger_model`. After every
step the test compares balance, debt, every lot and every dispute exactly, and checks
the ledger invariants. Each example runs in a transaction that is rolled back, so the
next one starts from an empty ledger.
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from io import StringIO
from zoneinfo import ZoneInfo

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from accounts.models import Account
from credits.models import CreditLot, LedgerEntry, LedgerTransaction, LotDispute
from credits.services import (
    Balance,
    account_balance,
    credit_grant,
    credit_lots_expire_due,
    ledger_violations,
    lot_dispute_close,
    lot_dispute_open,
    lot_refund_apply,
    purchase_lot_create,
    usage_debit,
)
from credits.services.ledger import UsageCharge, usage_debits_apply
from tests.ledger_model import LedgerModel, ModelLot, Outcome

pytestmark = pytest.mark.django_db

CENT = 10_000_000
USD = 1_000_000_000
ZONES = ["UTC", "America/Los_Angeles", "Asia/Kolkata", "Pacific/Chatham", "Australia/Lord_Howe"]


# Steps of a random sequence. `pick` chooses among earlier lots, disputes or operations,
# modulo how many there are, so every drawn value means something whatever came before.
@dataclass(frozen=True)
class Purchase:
    cents: int


@dataclass(frozen=True)
class Grant:
    amount_nanousd: int
    # None means the default lifetime, a timedelta that long from now, and an int the
    # same expiry as an earlier lot (a tie that the age or the id must break).
    expiry: timedelta | int | None


@dataclass(frozen=True)
class BackdatedGrant:
    """A grant dated `back` before now: older than lots created before it, with a higher id.

    It expires with an earlier lot (`pick`), when that one is still ahead, so the tie on
    the expiry must be broken by age, not by id.
    """

    amount_nanousd: int
    back: timedelta
    pick: int


@dataclass(frozen=True)
class Debit:
    amount_nanousd: int


@dataclass(frozen=True)
class DebitBatch:
    """Charges metered together as (amount, seconds ago), maybe with the first one twice."""

    charges: tuple[tuple[int, int], ...]
    repeat_first: bool


@dataclass(frozen=True)
class Refund:
    pick: int
    cents: int


@dataclass(frozen=True)
class DisputeOpen:
    pick: int


@dataclass(frozen=True)
class DisputeClose:
    """Close an earlier dispute, or (`unseen`) one whose opening has not arrived yet."""

    pick: int
    won: bool
    unseen: bool


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
# Tiny amounts split lots at odd places, and large ones drain several lots into debt.
amounts = st.one_of(
    st.integers(min_value=1, max_value=10_000), st.integers(min_value=CENT, max_value=6 * CENT)
)
steps = st.one_of(
    st.builds(Purchase, cents=st.integers(min_value=1, max_value=5)),
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
    st.builds(
        BackdatedGrant,
        amount_nanousd=amounts,
        back=st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=30)),
        pick=picks,
    ),
    st.builds(Debit, amount_nanousd=amounts),
    st.builds(Debit, amount_nanousd=amounts),
    st.builds(
        DebitBatch,
        charges=st.lists(
            st.tuples(amounts, st.integers(min_value=0, max_value=3600)), min_size=1, max_size=4
        ).map(tuple),
        repeat_first=st.booleans(),
    ),
    st.builds(Refund, pick=picks, cents=st.integers(min_value=1, max_value=6)),
    st.builds(DisputeOpen, pick=picks),
    st.builds(DisputeClose, pick=picks, won=st.booleans(), unseen=st.booleans()),
    st.builds(Retry, pick=picks),
    st.builds(ExpireDue),
    st.builds(
        Advance,
        by=st.one_of(
            st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=2)),
            st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=400)),
        ),
    ),
    st.builds(AdvanceToExpiry, pick=picks, offset_seconds=st.sampled_from([-1, 0, 1, 3600])),
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
        # Database ids of the lots, in the model's order.
        self.lot_ids: list[int] = []
        # Each operation that can be delivered again, as a call that repeats it.
        self.operations: list[Callable[[], None]] = []
        self.dispute_ids: list[str] = []
        self.expiries_written = 0

    @property
    def at(self) -> datetime:
        """Return the current instant spelled in the example's zone, as a caller might."""
        return self.now.astimezone(self.zone)

    def name(self, prefix: str) -> str:
        return f"{prefix}_prop_{len(self.operations)}"

    def purchase_lots(self) -> list[ModelLot]:
        return [lot for lot in self.model.lots if lot.source == "purchase"]

    def apply(self, step) -> None:
        match step:
            case Purchase(cents=cents):
                self.record(self.purchase, self.name("cs"), cents)
            case Grant():
                self.grant(step)
            case BackdatedGrant():
                self.grant_backdated(step)
            case Debit(amount_nanousd=amount):
                self.record(self.debit, self.name("req"), amount)
            case DebitBatch():
                self.debit_batch_start(step)
            case Refund(pick=pick, cents=cents) if self.purchase_lots():
                lots = self.purchase_lots()
                self.record(self.refund, self.name("re"), lots[pick % len(lots)], cents)
            case DisputeOpen(pick=pick) if self.purchase_lots():
                lots = self.purchase_lots()
                dispute_id = self.name("dp")
                self.dispute_ids.append(dispute_id)
                self.record(self.dispute_open, dispute_id, lots[pick % len(lots)])
            case DisputeClose(pick=pick, won=won, unseen=unseen):
                self.dispute_close_start(pick, won, unseen)
            case Retry(pick=pick) if self.operations:
                self.operations[pick % len(self.operations)]()
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

    def record(self, operation: Callable, *args) -> None:
        """Run an operation now, and keep it so that a later step can deliver it again."""
        self.operations.append(lambda: operation(*args))
        operation(*args)

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
        if created:
            self.lot_ids.append(lot.pk)
        self.check_transaction(f"checkout:{session_id}", expected)

    def grant(self, step: Grant) -> None:
        expires_at = None
        if isinstance(step.expiry, timedelta):
            expires_at = self.at + step.expiry
        elif isinstance(step.expiry, int) and self.model.lots:
            earlier = self.model.lots[step.expiry % len(self.model.lots)].expires_at
            expires_at = earlier if earlier > self.now else None
        self.grant_at(step.amount_nanousd, self.at, expires_at)

    def grant_backdated(self, step: BackdatedGrant) -> None:
        if not self.model.lots:
            return
        expires_at = self.model.lots[step.pick % len(self.model.lots)].expires_at
        if expires_at > self.now:
            self.grant_at(step.amount_nanousd, self.at - step.back, expires_at)

    def grant_at(self, amount: int, at: datetime, expires_at: datetime | None) -> None:
        key = f"grant_prop_{len(self.model.lots)}"
        expected = self.model.grant(key=key, amount_nanousd=amount, at=at, expires_at=expires_at)
        lot = credit_grant(
            account=self.account,
            amount_nanousd=amount,
            reason="property test",
            expires_at=expires_at,
            idempotency_key=key,
            at=at,
        )
        self.lot_ids.append(lot.pk)
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

    def debit_batch_start(self, step: DebitBatch) -> None:
        batch = self.name("batch")
        charges = [
            (f"{batch}_{n}", amount, self.at - timedelta(seconds=back))
            for n, (amount, back) in enumerate(step.charges)
        ]
        if step.repeat_first:
            charges.append(charges[0])
        self.record(self.debit_batch, charges)

    def debit_batch(self, charges: list[tuple[str, int, datetime]]) -> None:
        new = self.model.debit_batch(charges=charges)
        debits = usage_debits_apply(
            account_id=self.account.pk,
            charges=[
                UsageCharge(request_id=request_id, amount_nanousd=amount, at=at)
                for request_id, amount, at in charges
            ],
        )
        assert [debit.created for debit in debits] == new
        for (request_id, _amount, _at), debit in zip(charges, debits, strict=True):
            key = f"usage:{request_id}"
            assert debit.transaction.idempotency_key == key
            self.check_transaction(key, self.model.applied[key])

    def lot_id(self, lot: ModelLot) -> int:
        return self.lot_ids[lot.index]

    def refund(self, refund_id: str, lot: ModelLot, cents: int) -> None:
        expected = self.model.refund(refund_id=refund_id, lot=lot, amount_cents=cents, at=self.at)
        _record, created = lot_refund_apply(
            lot_id=self.lot_id(lot),
            refund_id=refund_id,
            charge_id=f"ch_{lot.session_id}",
            amount_cents=cents,
            at=self.at,
        )
        assert created is expected.applied
        self.check_transaction(f"refund:{refund_id}", expected)

    def dispute_open(self, dispute_id: str, lot: ModelLot) -> None:
        expected = self.model.dispute_open(dispute_id=dispute_id, lot=lot, at=self.at)
        _record, created = lot_dispute_open(
            lot_id=self.lot_id(lot),
            dispute_id=dispute_id,
            charge_id=f"ch_{lot.session_id}",
            amount_cents=lot.original_nanousd // CENT,
            at=self.at,
        )
        assert created is expected.applied
        if created:
            self.check_transaction(f"dispute:{dispute_id}:freeze", expected)

    def dispute_close_start(self, pick: int, won: bool, unseen: bool) -> None:
        if unseen or not self.dispute_ids:
            lots = self.purchase_lots()
            if not lots:
                return
            dispute_id = self.name("dp")
            self.dispute_ids.append(dispute_id)
            lot = lots[pick % len(lots)]
            # A retry can deliver its opening later, and that must change nothing.
            self.operations.append(lambda: self.dispute_open(dispute_id, lot))
        else:
            dispute_id = self.dispute_ids[pick % len(self.dispute_ids)]
            lot = self.model.disputes[dispute_id].lot
        self.record(self.dispute_close, dispute_id, lot, won)

    def dispute_close(self, dispute_id: str, lot: ModelLot, won: bool) -> None:
        expected = self.model.dispute_close(dispute_id=dispute_id, lot=lot, won=won, at=self.at)
        _record, created = lot_dispute_close(
            lot_id=self.lot_id(lot),
            dispute_id=dispute_id,
            charge_id=f"ch_{lot.session_id}",
            amount_cents=lot.original_nanousd // CENT,
            won=won,
            at=self.at,
        )
        assert created is expected.applied
        if created:
            outcome = "won" if won else "lost"
            self.check_transaction(f"dispute:{dispute_id}:{outcome}", expected)

    def check_transaction(self, key: str, expected: Outcome) -> None:
        written = LedgerTransaction.objects.get(idempotency_key=key)
        assert (written.amount_nanousd, written.balance_after_nanousd) == (
            expected.amount_nanousd,
            expected.balance_after_nanousd,
        )

    def check(self) -> None:
        """Compare balance, debt, lots and disputes with the model, and check the invariants."""
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
                lot.status,
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
                lot.status,
                lot.original_nanousd,
                lot.remaining_nanousd,
                lot.created_at,
                lot.expires_at,
                lot.expired_at,
                lot.session_id,
            )
            for lot in model.lots
        ]
        if model.disputes:
            assert dict(
                LotDispute.objects.filter(account=self.account).values_list(
                    "stripe_dispute_id", "status"
                )
            ) == {dispute_id: dispute.status for dispute_id, dispute in model.disputes.items()}
        assert (
            LedgerTransaction.objects.filter(account=self.account).count()
            == len(model.applied) + self.expiries_written
        )
        assert ledger_violations(account=self.account, at=self.at) == []


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(
    start=datetime(2025, 11, 2, 1, 30, fold=1, tzinfo=ZoneInfo("America/Los_Angeles")),
    zone=ZoneInfo("America/Los_Angeles"),
    sequence=[
        Purchase(cents=1),
        Grant(amount_nanousd=CENT, expiry=timedelta(hours=1)),
        Debit(amount_nanousd=CENT + 5),
        AdvanceToExpiry(pick=1, offset_seconds=-1),
        Debit(amount_nanousd=7),
        AdvanceToExpiry(pick=1, offset_seconds=0),
        Debit(amount_nanousd=9),
        ExpireDue(),
        Retry(pick=2),
        Purchase(cents=2),
    ],
)
@example(
    start=datetime(2026, 4, 1, 8, 0, tzinfo=UTC),
    zone=ZoneInfo("Asia/Kolkata"),
    sequence=[
        Purchase(cents=3),
        Purchase(cents=2),
        DisputeOpen(pick=0),
        DisputeOpen(pick=0),
        Debit(amount_nanousd=2 * CENT + 1),
        Refund(pick=0, cents=1),
        DisputeClose(pick=0, won=True, unseen=False),
        DisputeClose(pick=1, won=True, unseen=False),
        DisputeClose(pick=1, won=False, unseen=True),
        Retry(pick=7),
        DebitBatch(charges=((CENT, 60), (5, 0)), repeat_first=True),
        Retry(pick=9),
        Purchase(cents=4),
    ],
)
@given(
    start=starts,
    zone=st.sampled_from(ZONES).map(ZoneInfo),
    # Drawing the length first spreads it evenly, because a plain list is mostly short.
    sequence=st.integers(min_value=1, max_value=30).flatmap(
        lambda size: st.lists(steps, min_size=size, max_size=size)
    ),
)
def test_random_operations_match_reference_model(owner, start, zone, sequence):
    with transaction.atomic():
        try:
            run = Run(owner.account, start.astimezone(UTC), zone)
            for step in sequence:
                run.apply(step)
        finally:
            transaction.set_rollback(True)


def test_overshoot_debt_paid_from_next_purchase(owner):
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
    assert one.getvalue() == "Ledger sound: 1 account checked\n"
    assert ledger_violations(account=owner.account) == []


def test_check_ledger_fails_on_lot_mismatch(owner, outsider, capsys):
    lot = credit_grant(account=owner.account, amount_nanousd=USD, reason="promo")
    usage_debit(account_id=owner.account.pk, request_id="req_bad", amount_nanousd=300)
    CreditLot.objects.filter(pk=lot.pk).update(remaining_nanousd=USD)

    with pytest.raises(CommandError, match=r"^1 ledger violations in 2 accounts\.$"):
        call_command("check_ledger")

    assert capsys.readouterr().err == (
        f"lot {lot.pk}: original {USD} plus entries is {USD - 300}, but remaining is {USD}\n"
    )
    call_command("check_ledger", account="outsider")


def test_check_ledger_fails_on_debt_mismatch(owner):
    usage_debit(account_id=owner.account.pk, request_id="req_debt", amount_nanousd=900)
    Account.objects.filter(pk=owner.account.pk).update(debt_nanousd=100)

    with pytest.raises(CommandError, match=r"^1 ledger violations in 1 accounts\.$"):
        call_command("check_ledger", account="acme")


def test_check_ledger_fails_on_deleted_entry(funded):
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
