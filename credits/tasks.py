import logging

from celery import shared_task
from django.utils import timezone

from credits import services

logger = logging.getLogger(__name__)


@shared_task
def credit_lots_expire_due() -> int:
    """Write the expiry of every lot past `expires_at`; a rerun writes nothing more."""
    written = services.credit_lots_expire_due()
    logger.info("Lot expiry wrote %s expiries", written)
    return written


@shared_task
def credit_lot_expire(lot_id: int) -> None:
    services.credit_lot_expire(lot_id=lot_id)


@shared_task
def checkout_sessions_reconcile() -> int:
    """Fulfil open checkout sessions that Stripe reports paid (a missed webhook)."""
    return services.checkout_sessions_reconcile()


@shared_task
def account_low_balance_check(account_id: int) -> bool:
    """Mail the low-balance alert if it is due, or re-arm it. A rerun sends nothing more."""
    return services.account_low_balance_check(account_id=account_id)


@shared_task
def accounts_low_balance_check_all() -> int:
    """Queue the check of every account with a threshold, so that a lost check still runs."""
    account_ids = services.accounts_with_low_balance_threshold()
    for account_id in account_ids:
        account_low_balance_check.delay(account_id)
    return len(account_ids)


@shared_task
def credit_lot_expiry_reminder_send(lot_id: int) -> bool:
    """Mail the reminder that a lot expires within a week, once per lot."""
    return services.credit_lot_expiry_reminder_send(lot_id=lot_id)


@shared_task
def credit_lot_expiry_reminders_queue() -> int:
    """Queue the reminder of every lot that expires within a week and was not reminded."""
    lot_ids = services.credit_lots_due_for_expiry_reminder(at=timezone.now())
    for lot_id in lot_ids:
        credit_lot_expiry_reminder_send.delay(lot_id)
    logger.info("Queued %s lot expiry reminders", len(lot_ids))
    return len(lot_ids)
