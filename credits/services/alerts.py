"""Credit email alerts: a balance below the account's threshold, and lots about to expire.

Owners and admins of the account get them. The low-balance alert goes out once each
time the balance drops below the threshold (`Account.low_balance_alerted_at`); the
expiry reminder once per lot (`CreditLot.expiry_reminder_sent_at`). Each send first
claims its marker in a short write and mails after it, so no row stays locked while the
mail server responds. A failed send releases the claim, so the next run tries again.
"""

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import EmailMessage, get_connection
from django.db import transaction
from django.template.loader import render_to_string
from django.utils import timezone

from accounts.models import Account, Membership
from credits import tasks as credit_tasks
from credits.models import CreditLot
from credits.money import NANOUSD_PER_USD, format_usd_short
from credits.services.ledger import CreditsError, account_balance, locked_account

logger = logging.getLogger(__name__)

EXPIRY_REMINDER_AHEAD = timedelta(days=7)
# USD 1,000,000: a guard against typos, far below what a BigIntegerField holds.
LOW_BALANCE_THRESHOLD_MAX_NANOUSD = 1_000_000 * NANOUSD_PER_USD
ALERT_ROLES = (Membership.Role.OWNER, Membership.Role.ADMIN)


def _usd(nanousd: int) -> str:
    """Format for an email: "$4.50", "-$2.50", or up to nine places when not whole cents."""
    text = format_usd_short(nanousd)
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


def alert_recipients(*, account_id: int) -> list[str]:
    """Return the email addresses of the account's active owners and admins."""
    return list(
        Membership.objects.filter(
            account_id=account_id, role__in=ALERT_ROLES, user__is_active=True
        )
        .order_by("user__email")
        .values_list("user__email", flat=True)
        .distinct()
    )


def _mail(*, recipients: list[str], template: str, context: dict) -> None:
    """Send one plain-text message per recipient, so no recipient gets the others' addresses."""
    subject = render_to_string(f"email/{template}_subject.txt", context).strip()
    body = render_to_string(f"email/{template}_body.txt", context)
    messages = [
        EmailMessage(subject=subject, body=body, to=[recipient]) for recipient in recipients
    ]
    if messages:
        get_connection().send_messages(messages)


@transaction.atomic
def account_low_balance_threshold_set(
    *, account: Account, threshold_nanousd: int | None
) -> Account:
    """Set the balance below which owners and admins get an email; None turns it off.

    A new threshold re-arms the alert. When the balance is already below it, the check
    runs once this commits, so the email goes out at once instead of with the next
    charge. Setting the threshold the account already has changes nothing.
    """
    if threshold_nanousd is not None and (
        isinstance(threshold_nanousd, bool)
        or not isinstance(threshold_nanousd, int)
        or not 0 <= threshold_nanousd <= LOW_BALANCE_THRESHOLD_MAX_NANOUSD
    ):
        raise CreditsError("The low-balance threshold must be from USD 0 to USD 1,000,000.")
    locked = locked_account(account.pk)
    if locked.low_balance_threshold_nanousd == threshold_nanousd:
        return locked
    locked.low_balance_threshold_nanousd = threshold_nanousd
    locked.low_balance_alerted_at = None
    locked.save(update_fields=["low_balance_threshold_nanousd", "low_balance_alerted_at"])
    if threshold_nanousd is not None:
        balance = account_balance(account_id=locked.pk).balance_nanousd
        if locked.low_balance_alert_due(balance_nanousd=balance):
            check = credit_tasks.account_low_balance_check
            transaction.on_commit(lambda: check.delay(locked.pk), robust=True)
    logger.info("Set the low-balance threshold of account %s", locked.pk)
    return locked


def account_low_balance_check(*, account_id: int, at: datetime | None = None) -> bool:
    """Update the low-balance alert to match the balance; return whether it sent email.

    Below the threshold and armed: claim the alert and mail the owners and admins. At or
    above it after an alert: re-arm. Anything else changes nothing, so a rerun is a no-op.
    """
    at = at or timezone.now()
    with transaction.atomic():
        account = locked_account(account_id)
        balance = account_balance(account_id=account_id, at=at)
        if not account.low_balance_alert_due(balance_nanousd=balance.balance_nanousd):
            return False
        if account.low_balance_alerted_at is not None:
            account.low_balance_alerted_at = None
            account.save(update_fields=["low_balance_alerted_at"])
            logger.info("Re-armed the low-balance alert of account %s", account_id)
            return False
        account.low_balance_alerted_at = at
        account.save(update_fields=["low_balance_alerted_at"])

    context = {
        "account": account,
        "balance": _usd(balance.balance_nanousd),
        "threshold": _usd(account.low_balance_threshold_nanousd or 0),
        "debt": _usd(balance.debt_nanousd),
        "has_debt": balance.debt_nanousd > 0,
        "credits_url": f"{settings.PUBLIC_URL}/credits/",
    }
    try:
        _mail(
            recipients=alert_recipients(account_id=account_id),
            template="low_balance",
            context=context,
        )
    except Exception:
        # Release the claim so that the next check (or the hourly sweep) sends it.
        Account.objects.filter(pk=account_id, low_balance_alerted_at=at).update(
            low_balance_alerted_at=None
        )
        logger.warning("Sending the low-balance alert of account %s failed", account_id)
        raise
    logger.info("Sent the low-balance alert of account %s", account_id)
    return True


def accounts_with_low_balance_threshold() -> list[int]:
    """Return the ids of accounts that set a low-balance threshold, for the periodic sweep."""
    return list(
        Account.objects.filter(low_balance_threshold_nanousd__isnull=False)
        .order_by("id")
        .values_list("id", flat=True)
    )


def _reminder_due(*, at: datetime):
    return CreditLot.objects.filter(
        status=CreditLot.Status.ACTIVE,
        remaining_nanousd__gt=0,
        expired_at__isnull=True,
        expiry_reminder_sent_at__isnull=True,
        expires_at__gt=at,
        expires_at__lte=at + EXPIRY_REMINDER_AHEAD,
    )


def credit_lots_due_for_expiry_reminder(*, at: datetime) -> list[int]:
    """Return the lots with credit left that expire within a week and were not reminded."""
    return list(_reminder_due(at=at).order_by("expires_at", "id").values_list("id", flat=True))


def credit_lot_expiry_reminder_send(*, lot_id: int, at: datetime | None = None) -> bool:
    """Tell the owners and admins that a lot expires within a week, once per lot.

    Returns False, sending nothing, when the lot was reminded already or is not due
    (spent, voided, frozen, expired, or more than a week from its expiry).
    """
    at = at or timezone.now()
    # The conditional update claims the reminder atomically: of two concurrent runs,
    # exactly one updates the row.
    claimed = _reminder_due(at=at).filter(pk=lot_id).update(expiry_reminder_sent_at=at)
    if not claimed:
        return False
    lot = CreditLot.objects.select_related("account").get(pk=lot_id)
    context = {
        "account": lot.account,
        "lot": lot,
        "remaining": _usd(lot.remaining_nanousd),
        "expires_at": lot.expires_at,
        "credits_url": f"{settings.PUBLIC_URL}/credits/",
    }
    try:
        _mail(
            recipients=alert_recipients(account_id=lot.account_id),
            template="lot_expiry",
            context=context,
        )
    except Exception:
        CreditLot.objects.filter(pk=lot_id, expiry_reminder_sent_at=at).update(
            expiry_reminder_sent_at=None
        )
        logger.warning("Sending the expiry reminder of lot %s failed", lot_id)
        raise
    logger.info("Sent the expiry reminder of lot %s to account %s", lot_id, lot.account_id)
    return True
