"""A plain, in-memory reference model of the credit ledger rules.

The property-based tests run the same random operations against the real services and
against this model, and compare balance, debt and every lot's remainder exactly. The
model does not use the database, and states the rules as directly as possible.

Rules:
- Money is integer nano-dollars.
- A lot is spendable while its status is active and `at < expires_at` (usable one
  second before `expires_at`, not at it). A lot past `expires_at` never counts, whether
  or not its expiry has been written yet.
- A debit draws down spendable lots soonest expiry first, then oldest (`created_at`),
  then the lot created first. What the lots cannot cover becomes debt.
- A new lot pays the debt first.
- An expiry run writes, once per lot, the remainder of every lot whose `expires_at` is
  at or before the run's time, and leaves the balance unchanged.
- A batch of debits is applied in order of (`at`, request id), each as one debit.
- A refund takes what it can from the lot while the lot is spendable. The rest, or all
  of it when the lot is out of the balance, becomes debt.
- An open dispute freezes an active lot (out of the balance, untouched). A won dispute
  makes it active again once no other dispute of it is open, and a lost one voids it
  and writes its remainder off. A dispute closed before it opened is recorded closed,
  and its opening then changes nothing.
- Each operation carries an idempotency key, so repeating it changes nothing.

Instants are kept in UTC: an aware time in a repeated hour (fold=1) never compares
equal to the same instant in another zone.
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime

from dateutil.relativedelta import relativedelta

NANOUSD_PER_CENT = 10_000_000
LOT_LIFETIME = relativedelta(years=1)

ACTIVE = "active"
FROZEN = "frozen"
VOIDED = "voided"
OPEN = "open"
WON = "won"
LOST = "lost"


def purchase_expiry(at: datetime) -> datetime:
    """Return the expiry of a lot bought at `at`: one calendar year later, counted in UTC."""
    return at.astimezone(UTC) + LOT_LIFETIME


@dataclass
class ModelLot:
    # Creation order: the database breaks draw-down ties by id, which follows it.
    index: int
    source: str
    original_nanousd: int
    remaining_nanousd: int
    created_at: datetime
    expires_at: datetime
    status: str = ACTIVE
    # Set by the expiry run that wrote this lot's remainder off.
    expired_at: datetime | None = None
    session_id: str | None = None

    def spendable(self, at: datetime) -> bool:
        return self.status == ACTIVE and at < self.expires_at


@dataclass(frozen=True)
class Outcome:
    """What one operation did: whether it applied, its balance change and balance after."""

    applied: bool
    amount_nanousd: int = 0
    balance_after_nanousd: int = 0
    lot: ModelLot | None = None


@dataclass
class ModelDispute:
    lot: ModelLot
    status: str = OPEN


@dataclass
class LedgerModel:
    lots: list[ModelLot] = field(default_factory=list)
    debt_nanousd: int = 0
    # Idempotency key -> the outcome of the operation that first used it.
    applied: dict[str, Outcome] = field(default_factory=dict)
    # Stripe dispute id -> the dispute.
    disputes: dict[str, ModelDispute] = field(default_factory=dict)

    def spendable_nanousd(self, at: datetime) -> int:
        return sum(lot.remaining_nanousd for lot in self.lots if lot.spendable(at))

    def balance_nanousd(self, at: datetime) -> int:
        return self.spendable_nanousd(at) - self.debt_nanousd

    def next_expiry_at(self, at: datetime) -> datetime | None:
        expiries = [lot.expires_at for lot in self.lots if lot.spendable(at)]
        return min(expiries) if expiries else None

    def _repeat(self, key: str) -> Outcome | None:
        previous = self.applied.get(key)
        if previous is None:
            return None
        return Outcome(
            applied=False,
            amount_nanousd=previous.amount_nanousd,
            balance_after_nanousd=previous.balance_after_nanousd,
            lot=previous.lot,
        )

    def _record(self, key: str, outcome: Outcome) -> Outcome:
        self.applied[key] = outcome
        return outcome

    def _lot_open(
        self,
        *,
        key: str,
        source: str,
        amount_nanousd: int,
        at: datetime,
        expires_at: datetime,
        session_id: str | None = None,
    ) -> Outcome:
        lot = ModelLot(
            index=len(self.lots),
            source=source,
            original_nanousd=amount_nanousd,
            remaining_nanousd=amount_nanousd,
            created_at=at.astimezone(UTC),
            expires_at=expires_at.astimezone(UTC),
            session_id=session_id,
        )
        self.lots.append(lot)
        if lot.spendable(at):
            repayment = min(self.debt_nanousd, amount_nanousd)
            lot.remaining_nanousd -= repayment
            self.debt_nanousd -= repayment
        return self._record(
            key,
            Outcome(
                applied=True,
                amount_nanousd=amount_nanousd,
                balance_after_nanousd=self.balance_nanousd(at),
                lot=lot,
            ),
        )

    def purchase(self, *, session_id: str, amount_cents: int, at: datetime) -> Outcome:
        """Open the lot of a paid checkout session, once per session id."""
        key = f"checkout:{session_id}"
        return self._repeat(key) or self._lot_open(
            key=key,
            source="purchase",
            amount_nanousd=amount_cents * NANOUSD_PER_CENT,
            at=at,
            expires_at=purchase_expiry(at),
            session_id=session_id,
        )

    def grant(
        self, *, key: str, amount_nanousd: int, at: datetime, expires_at: datetime | None
    ) -> Outcome:
        """Open a promotional lot, which without an expiry lasts as long as a purchase."""
        if expires_at is not None and expires_at <= at:
            raise ValueError("A grant's expiry must be after the grant.")
        return self._repeat(key) or self._lot_open(
            key=key,
            source="grant",
            amount_nanousd=amount_nanousd,
            at=at,
            expires_at=expires_at or purchase_expiry(at),
        )

    def debit(self, *, request_id: str, amount_nanousd: int, at: datetime) -> Outcome:
        """Charge a request once per request id, turning what the lots cannot cover into debt."""
        key = f"usage:{request_id}"
        repeated = self._repeat(key)
        if repeated is not None:
            return repeated
        outstanding = amount_nanousd
        order = sorted(
            (lot for lot in self.lots if lot.spendable(at) and lot.remaining_nanousd > 0),
            key=lambda lot: (lot.expires_at, lot.created_at, lot.index),
        )
        for lot in order:
            take = min(lot.remaining_nanousd, outstanding)
            lot.remaining_nanousd -= take
            outstanding -= take
            if outstanding == 0:
                break
        self.debt_nanousd += outstanding
        return self._record(
            key,
            Outcome(
                applied=True,
                amount_nanousd=-amount_nanousd,
                balance_after_nanousd=self.balance_nanousd(at),
            ),
        )

    def debit_batch(self, *, charges: list[tuple[str, int, datetime]]) -> list[bool]:
        """Apply (request id, amount, at) charges in order of (at, request id).

        Returns, in the order given, whether each charge's request id was new to the
        ledger before the batch.
        """
        new = [f"usage:{request_id}" not in self.applied for request_id, _amount, _at in charges]
        for request_id, amount, at in sorted(charges, key=lambda charge: (charge[2], charge[0])):
            self.debit(request_id=request_id, amount_nanousd=amount, at=at)
        return new

    def refund(self, *, refund_id: str, lot: ModelLot, amount_cents: int, at: datetime) -> Outcome:
        """Take a refund out of the lot while it is spendable, and the rest into debt."""
        key = f"refund:{refund_id}"
        repeated = self._repeat(key)
        if repeated is not None:
            return repeated
        amount = amount_cents * NANOUSD_PER_CENT
        voided = min(lot.remaining_nanousd, amount) if lot.spendable(at) else 0
        lot.remaining_nanousd -= voided
        self.debt_nanousd += amount - voided
        return self._record(
            key,
            Outcome(
                applied=True,
                amount_nanousd=-amount,
                balance_after_nanousd=self.balance_nanousd(at),
            ),
        )

    def dispute_open(self, *, dispute_id: str, lot: ModelLot, at: datetime) -> Outcome:
        """Freeze an active lot, once per dispute, leaving a dispute already recorded alone."""
        if dispute_id in self.disputes:
            return Outcome(applied=False)
        change = -lot.remaining_nanousd if lot.spendable(at) else 0
        if lot.status == ACTIVE:
            lot.status = FROZEN
        self.disputes[dispute_id] = ModelDispute(lot=lot)
        return self._record(
            f"dispute:{dispute_id}:freeze",
            Outcome(
                applied=True, amount_nanousd=change, balance_after_nanousd=self.balance_nanousd(at)
            ),
        )

    def dispute_close(self, *, dispute_id: str, lot: ModelLot, won: bool, at: datetime) -> Outcome:
        """Settle a dispute once: won unfreezes the lot, lost voids what remains of it."""
        dispute = self.disputes.get(dispute_id)
        if dispute is not None and dispute.status != OPEN:
            return Outcome(applied=False)
        if dispute is None:
            dispute = self.disputes[dispute_id] = ModelDispute(lot=lot)
        lot = dispute.lot
        if won:
            others_open = any(
                other.lot is lot and other.status == OPEN and other is not dispute
                for other in self.disputes.values()
            )
            change = 0
            if lot.status == FROZEN and not others_open:
                lot.status = ACTIVE
                change = lot.remaining_nanousd if lot.spendable(at) else 0
        else:
            change = -lot.remaining_nanousd if lot.spendable(at) else 0
            lot.remaining_nanousd = 0
            lot.status = VOIDED
        dispute.status = WON if won else LOST
        return self._record(
            f"dispute:{dispute_id}:{dispute.status}",
            Outcome(
                applied=True, amount_nanousd=change, balance_after_nanousd=self.balance_nanousd(at)
            ),
        )

    def expire_due(self, *, at: datetime) -> list[ModelLot]:
        """Write off the remainder of every lot due at `at`, and return the lots written."""
        due = [lot for lot in self.lots if lot.expires_at <= at and lot.expired_at is None]
        for lot in due:
            lot.remaining_nanousd = 0
            lot.expired_at = at.astimezone(UTC)
        return due
