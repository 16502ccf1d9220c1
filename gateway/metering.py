"""Batched metering: attempts queue up and are recorded and charged many at a time.

Writing one request's usage record and ledger debit costs about a dozen queries and a
commit, and every debit of an account waits for that account's row lock, so charging
requests one by one caps an account at a few dozen requests a second. The queue hands
whatever has accumulated to one worker thread as a single transaction, so the cost per
request falls as the load rises, and an idle gateway still charges within milliseconds.

NOTE: the queue lives in the server process. Attempts queued when the process is
killed (not stopped: a stop drains the queue) are lost, so their requests go uncharged.
"""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from django.conf import settings
from django.db import close_old_connections

from gateway.limits import Reservation, reservation_release, reservation_settle
from gateway.models import UsageRecord
from gateway.services import Attempt, usage_records_batch

logger = logging.getLogger(__name__)

# The largest batch written in one transaction.
BATCH_MAX = 500
METERING_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-meter")


@dataclass
class QueuedAttempt:
    attempt: Attempt
    reservation: Reservation | None
    # The attempt that ends its request drops the request's reservation.
    final: bool
    done: asyncio.Future


def usage_settle_batch(items: list[QueuedAttempt]) -> list[UsageRecord]:
    """Record and charge a batch, then settle each request's reservation.

    If recording fails, the holds are released at once rather than left to lapse.
    """
    close_old_connections()
    try:
        records = usage_records_batch(attempts=[item.attempt for item in items])
    except Exception:
        for item in items:
            if item.reservation is not None:
                reservation_release(reservation=item.reservation)
        raise
    for item, record in zip(items, records, strict=True):
        if item.reservation is not None and (item.final or record.cost_nanousd):
            reservation_settle(
                reservation=item.reservation,
                cost_nanousd=record.cost_nanousd,
                at=record.created_at,
                release=item.final,
            )
    return records


class MeteringQueue:
    """Collect attempts on one event loop and write them in batches, one batch at a time."""

    def __init__(self) -> None:
        self._items: list[QueuedAttempt] = []
        # Set when someone waits for a charge before answering; the batch goes at once.
        self._urgent = False
        self._worker: asyncio.Task | None = None

    def submit(
        self,
        *,
        attempt: Attempt,
        reservation: Reservation | None,
        final: bool,
        urgent: bool = False,
    ) -> asyncio.Future:
        """Queue an attempt; the returned future resolves to its usage record.

        `urgent` skips the batch window, for a caller that holds its response until the
        charge is written (a stream's terminal event).
        """
        done = asyncio.get_running_loop().create_future()
        self._items.append(QueuedAttempt(attempt, reservation, final, done))
        self._urgent = self._urgent or urgent
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._run())
        return done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._items:
            window = settings.GATEWAY_METER_BATCH_WINDOW_MS
            if window and not self._urgent and len(self._items) < BATCH_MAX:
                # Let a batch gather: under load this turns many small writes into one.
                await asyncio.sleep(window / 1000)
            self._urgent = False
            batch, self._items = self._items[:BATCH_MAX], self._items[BATCH_MAX:]
            try:
                records = await loop.run_in_executor(METERING_EXECUTOR, usage_settle_batch, batch)
            except Exception as error:
                # Not swallowed: every waiter of the batch receives the error.
                logger.exception(
                    "Metering a batch of %s attempts failed; first request %s",
                    len(batch),
                    batch[0].attempt.request_id,
                )
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(error)
                continue
            for item, record in zip(batch, records, strict=True):
                if not item.done.done():
                    item.done.set_result(record)

    async def drain(self) -> None:
        """Wait until everything queued so far is written."""
        while self._items or (self._worker is not None and not self._worker.done()):
            if self._worker is None or self._worker.done():
                self._worker = asyncio.ensure_future(self._run())
            await asyncio.gather(self._worker, return_exceptions=True)


_queues: dict[asyncio.AbstractEventLoop, MeteringQueue] = {}


def metering_queue() -> MeteringQueue:
    """Return the queue of the running event loop."""
    loop = asyncio.get_running_loop()
    queue = _queues.get(loop)
    if queue is None:
        for stale in [other for other in _queues if other.is_closed()]:
            _queues.pop(stale, None)
        queue = _queues[loop] = MeteringQueue()
    return queue
