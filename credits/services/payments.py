"""Refunds and disputes of purchases, as Stripe reports them.

Each step is one operation on the ledger with its own idempotency key, so a webhook
delivered twice, or two events racing, changes the ledger once:

- `refund:<re_id>`: a refund (kind REFUND). It voids what it can from the lot's
  remainder while the lot is spendable; the rest becomes debt. Stripe's
  `charge.refunded` event carries the charge's cumulative `amount_refunded`, not which
  refund is new, so the refunds are listed from Stripe and each one is applied once.
- `dispute:<dp_id>:freeze`: a dispute opens (kind FREEZE) and the lot is frozen: usage
  and the balance skip it until the dispute closes.
- `dispute:<dp_id>:won`: the dispute is won (kind UNFREEZE) and the lot is spendable again.
- `dispute:<dp_id>:lost`: the dispute is lost (kind VOID): one entry voids exactly what
  remains of the lot, and the lot is voided.

How a freeze shows in the ledger: freezing moves no money, so the FREEZE transaction
has no entries. Its amount is the change to the balance: minus the lot's remainder, or
zero if the lot had already left the balance by expiring. The UNFREEZE puts back what
remains then. A customer can explain every balance as the sum of the transaction
amounts: the remainder leaves at the freeze, not at the void. So the VOID of a frozen
lot has an amount of zero, as an expiry has, and `ledger_violations` accepts both.

A refund of a lot that is out of the balance (frozen, voided or past its expiry) becomes
debt in full and leaves the lot alone: its remainder is settled by the dispute or the
expiry, and voiding it would change nothing the customer can spend. A won dispute then
gives the remainder back, so the outcome equals a refund of the spendable lot.
"""

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import stripe
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from credits.models import CheckoutPurchase, CreditLot, LedgerTransaction, LotDispute, LotRefund
from credits.money import format_usd_short, nanousd_from_cents
from credits.services.checkout import checkout_session_fulfil
from credits.services.ledger import (
    CreditsError,
    existing_transaction,
    locked_account,
    transaction_record,
)

logger = logging.getLogger(__name__)

# Refund statuses whose money has left, or is leaving, the merchant's balance. A refund
# that is failed, canceled or still needs action is applied once it changes status.
APPLIED_REFUND_STATUSES = frozenset({"succeeded", "pending"})
# Closed dispute statuses: an inquiry that closes without a chargeback counts as won.
DISPUTE_WON_STATUSES = frozenset({"won", "warning_closed"})
DISPUTE_LOST_STATUSES = frozenset({"lost"})
# Stripe's largest page; a charge rarely has more than a few refunds.
REFUND_PAGE_SIZE = 100


def _stripe_options() -> dict:
    return {"api_key": settings.STRIPE_SECRET_KEY}


def _stripe_id(value: Any) -> str:
    """Return the id of an expandable Stripe field: an id, an object or nothing."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return value.get("id") or ""
    return ""


def _cents_check(amount_cents: int, currency: str) -> None:
    if isinstance(amount_cents, bool) or not isinstance(amount_cents, int) or amount_cents <= 0:
        raise CreditsError("The amount must be a positive number of cents.")
    if currency.lower() != "usd":
        raise CreditsError("Only USD payments can be refunded or disputed.")


def purchase_lot_for_charge(*, charge_id: str, payment_intent_id: str = "") -> CreditLot | None:
    """Return the purchase lot a charge paid for, by charge id, else by payment intent."""
    lots = CreditLot.objects.filter(source=CreditLot.Source.PURCHASE)
    lot = lots.filter(stripe_charge_id=charge_id).first() if charge_id else None
    if lot is None and payment_intent_id:
        lot = lots.filter(stripe_payment_intent_id=payment_intent_id).first()
    return lot


def _purchase_lot_find(*, charge_id: str, payment_intent_id: str) -> CreditLot | None:
    """Find the lot a charge paid for, fulfilling its purchase first if that was missed.

    A refund or dispute can arrive before the purchase's own webhook, or after it was
    lost. The charge carries the account id in its metadata (copied from the payment
    intent), so that account's open purchases are fulfilled from Stripe's state first.
    """
    lot = purchase_lot_for_charge(charge_id=charge_id, payment_intent_id=payment_intent_id)
    if lot is not None or not charge_id:
        return lot
    charge = stripe.Charge.retrieve(charge_id, **_stripe_options())
    reference = str((charge.get("metadata") or {}).get("tollbooth_account_id") or "")
    if not reference.isdigit():
        return None
    open_sessions = CheckoutPurchase.objects.filter(
        account_id=int(reference), status=CheckoutPurchase.Status.OPEN
    ).values_list("stripe_session_id", flat=True)
    for session_id in list(open_sessions):
        checkout_session_fulfil(session_id=session_id)
    return purchase_lot_for_charge(
        charge_id=charge_id, payment_intent_id=_stripe_id(charge.get("payment_intent"))
    )


# --- Refunds ---------------------------------------------------------------------------


def lot_refund_apply(
    *,
    lot_id: int,
    refund_id: str,
    charge_id: str,
    amount_cents: int,
    currency: str = "usd",
    at: datetime | None = None,
) -> tuple[LotRefund, bool]:
    """Apply one Stripe refund to a purchase lot, once per refund id.

    Voids up to the lot's remainder while the lot is spendable and puts the shortfall
    into debt (an entry without a lot). Returns the refund record and whether this call
    applied it.
    """
    _cents_check(amount_cents, currency)
    if not refund_id:
        raise CreditsError("A refund needs its Stripe id.")
    try:
        with transaction.atomic():
            return _lot_refund_apply_locked(
                lot_id=lot_id,
                refund_id=refund_id,
                charge_id=charge_id,
                amount_cents=amount_cents,
                at=at or timezone.now(),
            )
    except IntegrityError:
        # A concurrent application of the same refund won the race on the unique id.
        existing = LotRefund.objects.filter(stripe_refund_id=refund_id).first()
        if existing is None:
            raise
        return existing, False


def _lot_refund_apply_locked(
    *, lot_id: int, refund_id: str, charge_id: str, amount_cents: int, at: datetime
) -> tuple[LotRefund, bool]:
    account_id = CreditLot.objects.values_list("account_id", flat=True).get(pk=lot_id)
    account = locked_account(account_id)
    key = f"refund:{refund_id}"
    if existing_transaction(key) is not None:
        return LotRefund.objects.get(stripe_refund_id=refund_id), False
    lot = CreditLot.objects.select_for_update().get(pk=lot_id)

    amount = nanousd_from_cents(amount_cents)
    voided = min(lot.remaining_nanousd, amount) if lot.is_spendable(at=at) else 0
    debt = amount - voided
    entries: list[tuple[CreditLot | None, int]] = []
    if voided:
        lot.remaining_nanousd -= voided
        lot.save(update_fields=["remaining_nanousd"])
        entries.append((lot, -voided))
    if debt:
        account.debt_nanousd += debt
        account.save(update_fields=["debt_nanousd"])
        entries.append((None, -debt))
    ledger_transaction = transaction_record(
        account=account,
        kind=LedgerTransaction.Kind.REFUND,
        idempotency_key=key,
        amount_nanousd=-amount,
        entries=entries,
        at=at,
        description=f"Refund of USD {format_usd_short(amount)} for lot {lot.pk}",
    )
    refund = LotRefund.objects.create(
        account=account,
        lot=lot,
        stripe_refund_id=refund_id,
        stripe_charge_id=charge_id,
        amount_cents=amount_cents,
        voided_nanousd=voided,
        debt_nanousd=debt,
        ledger_transaction=ledger_transaction,
        created_at=at,
    )
    logger.info(
        "Applied refund %s to lot %s of account %s: voided %s, debt %s",
        refund_id,
        lot.pk,
        account.pk,
        voided,
        debt,
    )
    return refund, True


def charge_refunds_apply(*, charge_id: str) -> list[LotRefund]:
    """Apply every refund of a charge not applied yet, as listed by Stripe.

    Oldest first, each under its own idempotency key. Returns the refunds this call
    applied; a charge that paid for no Tollbooth purchase applies nothing.
    """
    listed = stripe.Refund.list(charge=charge_id, limit=REFUND_PAGE_SIZE, **_stripe_options())
    # Stripe lists newest first.
    refunds = list(listed.auto_paging_iter())[::-1]
    applied: list[LotRefund] = []
    lot: CreditLot | None = None
    for refund in refunds:
        if refund.get("status") not in APPLIED_REFUND_STATUSES:
            status = refund.get("status")
            logger.info("Refund %s has status %s, not applied yet", refund["id"], status)
            continue
        if LotRefund.objects.filter(stripe_refund_id=refund["id"]).exists():
            continue
        if lot is None:
            lot = _purchase_lot_find(
                charge_id=charge_id, payment_intent_id=_stripe_id(refund.get("payment_intent"))
            )
            if lot is None:
                logger.warning("Charge %s paid for no purchase lot; refunds ignored", charge_id)
                return applied
        record, created = lot_refund_apply(
            lot_id=lot.pk,
            refund_id=refund["id"],
            charge_id=charge_id,
            amount_cents=int(refund["amount"]),
            currency=refund.get("currency") or "",
        )
        if created:
            applied.append(record)
    return applied


# --- Disputes --------------------------------------------------------------------------


def lot_dispute_open(
    *,
    lot_id: int,
    dispute_id: str,
    charge_id: str,
    amount_cents: int,
    currency: str = "usd",
    reason: str = "",
    at: datetime | None = None,
) -> tuple[LotDispute, bool]:
    """Freeze a lot because its payment is disputed, once per dispute id.

    Writes a FREEZE transaction without entries whose amount is the balance change.
    Does nothing for a dispute already recorded, including one whose close was
    processed before its opening. Returns the dispute record and whether this call
    froze the lot.
    """
    _cents_check(amount_cents, currency)
    at = at or timezone.now()
    with transaction.atomic():
        account_id = CreditLot.objects.values_list("account_id", flat=True).get(pk=lot_id)
        account = locked_account(account_id)
        existing = LotDispute.objects.filter(stripe_dispute_id=dispute_id).first()
        if existing is not None:
            return existing, False
        lot = CreditLot.objects.select_for_update().get(pk=lot_id)

        change = -lot.remaining_nanousd if lot.is_spendable(at=at) else 0
        if lot.status == CreditLot.Status.ACTIVE:
            lot.status = CreditLot.Status.FROZEN
            lot.save(update_fields=["status"])
        ledger_transaction = transaction_record(
            account=account,
            kind=LedgerTransaction.Kind.FREEZE,
            idempotency_key=f"dispute:{dispute_id}:freeze",
            amount_nanousd=change,
            entries=[],
            at=at,
            description=f"Lot {lot.pk} frozen while its payment is disputed",
        )
        record = LotDispute.objects.create(
            account=account,
            lot=lot,
            stripe_dispute_id=dispute_id,
            stripe_charge_id=charge_id,
            amount_cents=amount_cents,
            reason=reason,
            created_at=at,
            freeze_transaction=ledger_transaction,
        )
    logger.info("Froze lot %s of account %s for dispute %s", lot.pk, account.pk, dispute_id)
    return record, True


def lot_dispute_close(
    *,
    lot_id: int,
    dispute_id: str,
    charge_id: str,
    amount_cents: int,
    won: bool,
    currency: str = "usd",
    reason: str = "",
    at: datetime | None = None,
) -> tuple[LotDispute, bool]:
    """Settle a lot's dispute once: won unfreezes the lot, lost voids what remains of it.

    Won writes an UNFREEZE without entries whose amount is the balance change; the lot
    stays frozen while another dispute of it is open. Lost writes a VOID with one entry
    for exactly the remainder and marks the lot voided. Returns the dispute record and
    whether this call closed it.
    """
    _cents_check(amount_cents, currency)
    at = at or timezone.now()
    outcome = LotDispute.Status.WON if won else LotDispute.Status.LOST
    with transaction.atomic():
        account_id = CreditLot.objects.values_list("account_id", flat=True).get(pk=lot_id)
        account = locked_account(account_id)
        record = LotDispute.objects.filter(stripe_dispute_id=dispute_id).first()
        if record is not None and record.status != LotDispute.Status.OPEN:
            return record, False
        lot = CreditLot.objects.select_for_update().get(pk=lot_id)
        key = f"dispute:{dispute_id}:{outcome}"

        if won:
            still_disputed = (
                LotDispute.objects.filter(lot=lot, status=LotDispute.Status.OPEN)
                .exclude(stripe_dispute_id=dispute_id)
                .exists()
            )
            change = 0
            if lot.status == CreditLot.Status.FROZEN and not still_disputed:
                lot.status = CreditLot.Status.ACTIVE
                lot.save(update_fields=["status"])
                change = lot.remaining_nanousd if lot.is_spendable(at=at) else 0
            ledger_transaction = transaction_record(
                account=account,
                kind=LedgerTransaction.Kind.UNFREEZE,
                idempotency_key=key,
                amount_nanousd=change,
                entries=[],
                at=at,
                description=f"Lot {lot.pk} unfrozen: the dispute of its payment was won",
            )
        else:
            remainder = lot.remaining_nanousd
            # A frozen or expired lot is out of the balance already.
            change = -remainder if lot.is_spendable(at=at) else 0
            lot.remaining_nanousd = 0
            lot.status = CreditLot.Status.VOIDED
            lot.save(update_fields=["remaining_nanousd", "status"])
            ledger_transaction = transaction_record(
                account=account,
                kind=LedgerTransaction.Kind.VOID,
                idempotency_key=key,
                amount_nanousd=change,
                entries=[(lot, -remainder)],
                at=at,
                description=f"Lot {lot.pk} voided: the dispute of its payment was lost",
            )

        if record is None:
            record = LotDispute(
                account=account,
                lot=lot,
                stripe_dispute_id=dispute_id,
                stripe_charge_id=charge_id,
                amount_cents=amount_cents,
                reason=reason,
                created_at=at,
            )
        record.status = outcome
        record.closed_at = at
        record.close_transaction = ledger_transaction
        record.save()
    logger.info("Closed dispute %s of lot %s as %s", dispute_id, lot.pk, outcome)
    return record, True


def _dispute_retrieve(dispute_id: str) -> tuple[Any, CreditLot | None]:
    dispute = stripe.Dispute.retrieve(dispute_id, **_stripe_options())
    lot = _purchase_lot_find(
        charge_id=_stripe_id(dispute.get("charge")),
        payment_intent_id=_stripe_id(dispute.get("payment_intent")),
    )
    if lot is None:
        logger.warning("Dispute %s is of no purchase lot; ignored", dispute_id)
    return dispute, lot


def stripe_dispute_open(*, dispute_id: str) -> LotDispute | None:
    """Freeze the lot of a disputed purchase, reading the dispute as retrieved from Stripe.

    Returns None when the disputed charge paid for no Tollbooth purchase.
    """
    dispute, lot = _dispute_retrieve(dispute_id)
    if lot is None:
        return None
    record, _created = lot_dispute_open(
        lot_id=lot.pk,
        dispute_id=dispute["id"],
        charge_id=_stripe_id(dispute.get("charge")),
        amount_cents=int(dispute["amount"]),
        currency=dispute.get("currency") or "",
        reason=dispute.get("reason") or "",
    )
    return record


def stripe_dispute_close(*, dispute_id: str) -> LotDispute | None:
    """Settle a closed dispute by the status Stripe reports for it now.

    Returns None when the dispute is not closed at Stripe or is of no Tollbooth purchase.
    """
    dispute, lot = _dispute_retrieve(dispute_id)
    status = dispute.get("status")
    if status not in DISPUTE_WON_STATUSES | DISPUTE_LOST_STATUSES:
        logger.warning("Dispute %s is %s at Stripe, not closed; ignored", dispute_id, status)
        return None
    if lot is None:
        return None
    record, _created = lot_dispute_close(
        lot_id=lot.pk,
        dispute_id=dispute["id"],
        charge_id=_stripe_id(dispute.get("charge")),
        amount_cents=int(dispute["amount"]),
        won=status in DISPUTE_WON_STATUSES,
        currency=dispute.get("currency") or "",
        reason=dispute.get("reason") or "",
    )
    return record
