"""Recording and charging a batch of attempts, in the server or the metering process."""

from dataclasses import dataclass

from django.db import close_old_connections

from credits.services import account_balance_cached, balance_publications_deferred
from gateway.limits import HoldSettlement, Reservation, reservation_release, reservations_settle
from gateway.models import UsageRecord
from gateway.services import Attempt, usage_records_batch


@dataclass(frozen=True)
class Settlement:
    """One attempt to record and charge, as sent to the metering process."""

    attempt: Attempt
    reservation: Reservation | None
    # The attempt that ends its request drops the request's reservation.
    final: bool


def usage_settle_batch(items: list[Settlement]) -> list[UsageRecord]:
    """Record and charge a batch, then settle each request's reservation.

    If recording fails, the holds are released at once rather than left to lapse.
    """
    close_old_connections()
    try:
        # The new balances are cached in the same Redis step that drops the reservations.
        with balance_publications_deferred() as publications:
            records = usage_records_batch(attempts=[item.attempt for item in items])
    except Exception:
        for item in items:
            if item.reservation is not None:
                reservation_release(reservation=item.reservation)
        raise
    reservations_settle(
        [
            HoldSettlement(
                item.reservation, record.cost_nanousd, record.created_at, release=item.final
            )
            for item, record in zip(items, records, strict=True)
            if item.reservation is not None and (item.final or record.cost_nanousd)
        ],
        publications,
    )

    # Settling cached each debited account's new balance, so this is mostly a cache hit.
    # Where a later write cancelled that, the balance is computed here, off the request
    # path, so the account's next request needs no database query.
    for account_id in {item.attempt.account_id for item in items}:
        account_balance_cached(account_id=account_id)
    return records
