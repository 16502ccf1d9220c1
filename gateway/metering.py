"""Batched metering: attempts queue up and are recorded and charged many at a time.

Writing one request's usage record and ledger debit costs about a dozen queries and a
commit. Every debit of an account also waits for that account's row lock, so charged
one by one, an account's requests would queue behind each other's commits. The queue hands
whatever has accumulated to the metering process (or, without it, a worker thread) as a
single transaction, so the cost per request falls as the load rises, and an idle
gateway still charges within milliseconds.

NOTE: the queue lives in the server process. Attempts queued when the process is
killed (not stopped: a stop drains the queue) are lost, so their requests go uncharged.
"""

import asyncio
import logging
import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from django.conf import settings

from gateway import metering_process
from gateway.limits import Reservation
from gateway.services import Attempt
from gateway.settlement import Settlement, usage_settle_batch

logger = logging.getLogger(__name__)

# The largest batch written in one transaction.
BATCH_MAX = 500
METERING_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-meter")


@dataclass
class QueuedAttempt:
    settlement: Settlement
    done: asyncio.Future


class MeteringProcess:
    """A child process that records and charges batches sent to it over a pipe.

    Charging is Python work (the ORM) that would otherwise share the server process's
    GIL with request handling. In a process of its own it runs on another core, and the
    server's threads only wait on the pipe. One batch is in flight at a time.
    """

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, child_connection = context.Pipe()
        self._process = context.Process(
            target=metering_process.main,
            args=(child_connection, settings.GATEWAY_METERING_NICENESS),
            name="gateway-metering",
            daemon=True,
        )
        self._process.start()
        child_connection.close()
        self._lock = threading.Lock()

    def settle(self, settlements: list[Settlement]) -> list[int]:
        """Send a batch and wait for the ids of its usage records."""
        with self._lock:
            self._connection.send(settlements)
            record_ids, error = self._connection.recv()
        if error is not None:
            raise MeteringError(error)
        return record_ids

    def alive(self) -> bool:
        return self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def stop(self) -> None:
        with self._lock:
            self._connection.send(None)
        self._process.join(timeout=30)
        self._connection.close()


class MeteringError(Exception):
    """The metering process failed to write a batch; the message names the error."""


_process: MeteringProcess | None = None


def metering_process_start() -> None:
    """Start the metering process; the ASGI server calls this when it starts.

    Only with Redis: without it, cached balances and reservations live in the server
    process's memory, which a child process could not update.
    """
    global _process
    if settings.GATEWAY_METERING_PROCESS and settings.REDIS_URL and _process is None:
        _process = MeteringProcess()
        logger.info("Started the metering process")


def metering_process_stop() -> None:
    """Stop the metering process after the queues have drained."""
    global _process
    if _process is not None:
        _process.stop()
        _process = None
        logger.info("Stopped the metering process")


def settle(settlements: list[Settlement]) -> list[int]:
    """Record and charge a batch in the metering process, or here when there is none."""
    process = _process
    if process is not None and process.alive():
        return process.settle(settlements)
    if process is not None:
        logger.error("The metering process is gone; metering in the server process")
    return [record.pk for record in usage_settle_batch(settlements)]


class MeteringQueue:
    """Collect attempts on one event loop and write them in batches, one batch at a time."""

    def __init__(self) -> None:
        self._items: list[QueuedAttempt] = []
        # Set when a caller waits for a charge before responding; the batch goes at once.
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
        """Queue an attempt; the returned future resolves to its usage record's id.

        `urgent` skips the batch window, for a caller that delays its response until the
        charge is written (a stream's terminal event).
        """
        done = asyncio.get_running_loop().create_future()
        self._items.append(QueuedAttempt(Settlement(attempt, reservation, final), done))
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
            settlements = [item.settlement for item in batch]
            try:
                records = await loop.run_in_executor(METERING_EXECUTOR, settle, settlements)
            except Exception as error:
                # Not swallowed: every waiter of the batch receives the error.
                logger.exception(
                    "Metering a batch of %s attempts failed; first request %s",
                    len(batch),
                    batch[0].settlement.attempt.request_id,
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


async def metering_queues_drain() -> None:
    """Wait until the queue of the running event loop has written everything."""
    queue = _queues.get(asyncio.get_running_loop())
    if queue is not None:
        await queue.drain()
