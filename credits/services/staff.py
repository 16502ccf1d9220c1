"""Acts of support staff on credits and accounts, each with its audit record.

Every act writes an `AuditRecord` (who, when, why, the state before and after) in the
same transaction as the act, so neither commits without the other. Acts that touch the
ledger lock the account first, like every ledger write. A repeated act changes nothing
and writes no second record.
"""

import logging
import re
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from accounts.models import Account, User
from credits.models import AuditRecord, CreditLot, LedgerTransaction
from credits.money import NANOUSD_PER_USD, parse_usd
from credits.services.ledger import (
    CreditsError,
    account_balance,
    balance_cache_evict_on_commit,
    credit_grant,
    existing_transaction,
    locked_account,
    transaction_record,
)

# gateway.services imports credits.services, so take the module, not its names: the
# module import works whichever of the two packages is loaded first.
from gateway import services as gateway_services

logger = logging.getLogger(__name__)

# USD 1,000,000: a guard against typos, far below what a BigIntegerField holds.
STAFF_GRANT_MAX_NANOUSD = 1_000_000 * NANOUSD_PER_USD
REASON_MAX_LENGTH = AuditRecord._meta.get_field("reason").max_length
# Digits with an optional point and up to nine places: no sign, exponent or separator,
# so parse_usd never meets an input (such as "1e999999") that is slow or overflows.
USD_AMOUNT_PATTERN = re.compile(r"[0-9]{1,10}(\.[0-9]{1,9})?")


def usd_amount_parse(text: str) -> int:
    """Parse a USD amount typed by a person, such as "10.00" or "$0.5", into nano-dollars.

    Raises CreditsError, with a message to show, for anything else.
    """
    cleaned = (text or "").strip().removeprefix("$").strip()
    if not USD_AMOUNT_PATTERN.fullmatch(cleaned):
        raise CreditsError(
            "Enter an amount in USD such as 10.00, with at most nine decimal places."
        )
    return parse_usd(cleaned)


def _reason_clean(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise CreditsError("A reason is required.")
    if len(reason) > REASON_MAX_LENGTH:
        raise CreditsError(f"The reason must be at most {REASON_MAX_LENGTH} characters.")
    return reason


def _actor_check(actor: User) -> None:
    if actor is None or not actor.is_active or not actor.is_staff:
        raise CreditsError("Only active support staff can do this.")


def _balance_state(account_id: int, at: datetime) -> dict:
    balance = account_balance(account_id=account_id, at=at)
    return {"balance_nanousd": balance.balance_nanousd, "debt_nanousd": balance.debt_nanousd}


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _lot_state(lot: CreditLot) -> dict:
    return {
        "status": lot.status,
        "remaining_nanousd": lot.remaining_nanousd,
        "expires_at": _iso(lot.expires_at),
        "expiry_reminder_sent_at": _iso(lot.expiry_reminder_sent_at),
    }


def _audit(
    *,
    account: Account,
    action: str,
    actor: User,
    reason: str,
    at: datetime,
    before: dict,
    after: dict,
    lot: CreditLot | None = None,
    ledger_transaction: LedgerTransaction | None = None,
) -> AuditRecord:
    return AuditRecord.objects.create(
        account=account,
        action=action,
        actor=actor,
        actor_email=actor.email,
        reason=reason,
        created_at=at,
        lot=lot,
        ledger_transaction=ledger_transaction,
        before=before,
        after=after,
    )


def _lot_locked(lot_id: int) -> tuple[Account, CreditLot]:
    """Lock the lot's account, then the lot: the order every ledger write uses."""
    account_id = CreditLot.objects.filter(pk=lot_id).values_list("account_id", flat=True).first()
    if account_id is None:
        raise CreditsError(f"Lot {lot_id} not found.")
    account = locked_account(account_id)
    return account, CreditLot.objects.select_for_update().get(pk=lot_id)


@transaction.atomic
def promotional_credit_grant(
    *,
    account: Account,
    amount_nanousd: int,
    reason: str,
    actor: User,
    expires_at: datetime | None = None,
    idempotency_key: str | None = None,
    at: datetime | None = None,
) -> CreditLot:
    """Grant a promotional lot on behalf of support staff, with its audit record.

    `expires_at` defaults to one year after `at`. A repeated `idempotency_key` returns the
    lot it granted and writes nothing.
    """
    _actor_check(actor)
    reason = _reason_clean(reason)
    if isinstance(amount_nanousd, bool) or not isinstance(amount_nanousd, int):
        raise CreditsError("The amount must be a whole number of nano-dollars.")
    if not 0 < amount_nanousd <= STAFF_GRANT_MAX_NANOUSD:
        raise CreditsError("The amount must be more than USD 0 and at most USD 1,000,000.")
    at = at or timezone.now()
    if expires_at is not None and expires_at <= at:
        raise CreditsError("The expiry must be in the future.")
    key = idempotency_key or f"staff-grant:{account.pk}:{at.isoformat()}:{amount_nanousd}"

    locked = locked_account(account.pk)
    existing = existing_transaction(key)
    if existing is not None:
        if existing.account_id != locked.pk or existing.opened_lot is None:
            raise CreditsError("This idempotency key belongs to another operation.")
        return existing.opened_lot
    before = _balance_state(locked.pk, at)
    lot = credit_grant(
        account=locked,
        amount_nanousd=amount_nanousd,
        reason=reason,
        actor=actor,
        expires_at=expires_at,
        idempotency_key=key,
        at=at,
    )
    after = {
        **_balance_state(locked.pk, at),
        "lot_id": lot.pk,
        "original_nanousd": lot.original_nanousd,
        "expires_at": _iso(lot.expires_at),
    }
    _audit(
        account=locked,
        action=AuditRecord.Action.CREDIT_GRANT,
        actor=actor,
        reason=reason,
        at=at,
        before=before,
        after=after,
        lot=lot,
        ledger_transaction=LedgerTransaction.objects.get(idempotency_key=key),
    )
    return lot


@transaction.atomic
def credit_lot_expiry_extend(
    *,
    lot_id: int,
    expires_at: datetime,
    reason: str,
    actor: User,
    at: datetime | None = None,
) -> AuditRecord:
    """Move a lot's expiry later, with its audit record. The ledger does not change.

    Raises CreditsError for a voided lot and for a lot whose expiry is already written.
    A lot past its expiry whose expiry is not written yet becomes spendable again. The
    expiry reminder re-arms for the new date.
    """
    _actor_check(actor)
    reason = _reason_clean(reason)
    at = at or timezone.now()
    account, lot = _lot_locked(lot_id)
    if lot.expired_at is not None:
        raise CreditsError(
            f"Lot {lot.pk} expired on {lot.expired_at:%Y-%m-%d %H:%M} UTC and its "
            "remainder is written off; grant a new lot instead."
        )
    if lot.status == CreditLot.Status.VOIDED:
        raise CreditsError(f"Lot {lot.pk} is voided.")
    if expires_at <= lot.expires_at:
        raise CreditsError(
            f"The new expiry must be later than the current one, "
            f"{lot.expires_at:%Y-%m-%d %H:%M} UTC."
        )
    if expires_at <= at:
        raise CreditsError("The new expiry must be in the future.")

    before = {**_lot_state(lot), **_balance_state(account.pk, at)}
    lot.expires_at = expires_at
    lot.expiry_reminder_sent_at = None
    lot.save(update_fields=["expires_at", "expiry_reminder_sent_at"])
    # The balance cache keeps the old expiry as its validity limit.
    balance_cache_evict_on_commit(account.pk)
    after = {**_lot_state(lot), **_balance_state(account.pk, at)}
    record = _audit(
        account=account,
        action=AuditRecord.Action.LOT_EXPIRY_EXTEND,
        actor=actor,
        reason=reason,
        at=at,
        before=before,
        after=after,
        lot=lot,
    )
    logger.info("Extended the expiry of lot %s of account %s", lot.pk, account.pk)
    return record


@transaction.atomic
def credit_lot_void(
    *, lot_id: int, reason: str, actor: User, at: datetime | None = None
) -> LedgerTransaction:
    """Void a spendable lot: one VOID entry for exactly its remainder, status VOIDED.

    Voiding a voided lot returns its void transaction and writes nothing. Raises
    CreditsError for a lot past its expiry or frozen by a dispute: its remainder is not
    in the balance, and the expiry or the dispute settles it.
    """
    _actor_check(actor)
    reason = _reason_clean(reason)
    at = at or timezone.now()
    account, lot = _lot_locked(lot_id)
    key = f"void:{lot.pk}"
    existing = existing_transaction(key)
    if existing is not None:
        return existing
    if lot.expired_at is not None or at >= lot.expires_at:
        raise CreditsError(f"Lot {lot.pk} has expired, so its expiry writes off the remainder.")
    if lot.status != CreditLot.Status.ACTIVE:
        raise CreditsError(
            f"Lot {lot.pk} is {lot.get_status_display().lower()}, "
            "and only active lots can be voided."
        )

    before = {**_lot_state(lot), **_balance_state(account.pk, at)}
    remainder = lot.remaining_nanousd
    lot.remaining_nanousd = 0
    lot.status = CreditLot.Status.VOIDED
    lot.save(update_fields=["remaining_nanousd", "status"])
    ledger_transaction = transaction_record(
        account=account,
        kind=LedgerTransaction.Kind.VOID,
        idempotency_key=key,
        amount_nanousd=-remainder,
        entries=[(lot, -remainder)],
        at=at,
        # Customers see this text, so the reason stays in the audit record, for staff only.
        description=f"Lot {lot.pk} voided by support",
        actor=actor,
    )
    after = {**_lot_state(lot), **_balance_state(account.pk, at)}
    _audit(
        account=account,
        action=AuditRecord.Action.LOT_VOID,
        actor=actor,
        reason=reason,
        at=at,
        before=before,
        after=after,
        lot=lot,
        ledger_transaction=ledger_transaction,
    )
    logger.info("Voided lot %s of account %s, remainder %s", lot.pk, account.pk, remainder)
    return ledger_transaction


def _frozen_set(
    *, account: Account, frozen: bool, reason: str, actor: User, at: datetime | None
) -> AuditRecord | None:
    _actor_check(actor)
    reason = _reason_clean(reason)
    at = at or timezone.now()
    locked = locked_account(account.pk)
    if locked.is_frozen == frozen:
        return None
    locked.is_frozen = frozen
    locked.save(update_fields=["is_frozen"])
    # The gateway caches each key's identity with the account's frozen flag.
    gateway_services.access_keys_cache_evict(account_id=locked.pk)
    account.is_frozen = frozen
    action = AuditRecord.Action.ACCOUNT_FREEZE if frozen else AuditRecord.Action.ACCOUNT_UNFREEZE
    record = _audit(
        account=locked,
        action=action,
        actor=actor,
        reason=reason,
        at=at,
        before={"is_frozen": not frozen},
        after={"is_frozen": frozen},
    )
    logger.info("Set account %s frozen=%s", locked.pk, frozen)
    return record


@transaction.atomic
def account_freeze(
    *, account: Account, reason: str, actor: User, at: datetime | None = None
) -> AuditRecord | None:
    """Freeze an account: its keys stop working at once and it cannot buy credits.

    Returns None, writing nothing, when the account is frozen already.
    """
    return _frozen_set(account=account, frozen=True, reason=reason, actor=actor, at=at)


@transaction.atomic
def account_unfreeze(
    *, account: Account, reason: str, actor: User, at: datetime | None = None
) -> AuditRecord | None:
    """Unfreeze an account. Returns None, writing nothing, when it is not frozen."""
    return _frozen_set(account=account, frozen=False, reason=reason, actor=actor, at=at)
