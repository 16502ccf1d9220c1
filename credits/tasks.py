import logging

from celery import shared_task

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
