"""The ledger core: balances, lots, debits and expiry.

Every mutation locks the account row first (`locked_account`), so operations on one
account run one at a time, and carries a unique idempotency key, so a retry changes
nothing. The other service modules build on `locked_account`, `transaction_record` and
`lot_open`.
"""

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis
from dateutil.relativedelta import relativedelta
from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.db.models import Min, Q, Sum
from django.utils import timezone

from accounts.models import Account, User
from credits import tasks as credit_tasks
from credits.models import CheckoutPurchase, CreditLot, LedgerEntry, LedgerTransaction
from credits.money import format_usd_short, nanousd_from_cents

logger = logging.getLogger(__name__)

BALANCE_CACHE_KEY = "credits:balance:{account_id}:g{generation}"
# Every ledger write bumps it, so a balance cached under an older generation is never served.
BALANCE_GENERATION_KEY = "credits:balance-generation:{account_id}"
# A balance a committing write will cache under the next generation, with its token.
BALANCE_PENDING_KEY = "credits:balance-pending:{account_id}"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Caches a committed debit's balance, into a Redis pipeline when one is given.
Publication = Callable[["redis.client.Pipeline | None"], None]


class CreditsError(Exception):
    """A credits operation was rejected; the message is safe to show to the user."""


@dataclass(frozen=True)
class Balance:
    balance_nanousd: int
    spendable_nanousd: int
    debt_nanousd: int
    # The soonest expiry among spendable lots: the balance drops then without a ledger write.
    next_expiry_at: datetime | None


def lot_expiry_for(created_at: datetime) -> datetime:
    """Return the expiry of a lot bought at `created_at`: one calendar year later, in UTC.

    relativedelta clamps 29 February to 28 February in a year that has no leap day.
    The year is counted in UTC, so the expiry depends only on the instant, not on the
    zone the caller spelled it in (wall-clock arithmetic shifts across DST and dates).
    """
    return created_at.astimezone(UTC) + relativedelta(years=settings.CREDITS_LOT_LIFETIME_YEARS)


def account_balance(*, account_id: int, at: datetime | None = None) -> Balance:
    """Compute the balance from the database: spendable lots minus debt (one query).

    The gateway recomputes it after every ledger write, so it is one round trip.
    """
    at = at or timezone.now()
    spendable_lots = Q(credit_lots__status=CreditLot.Status.ACTIVE, credit_lots__expires_at__gt=at)
    debt, remaining, next_expiry = (
        Account.objects.filter(pk=account_id)
        .annotate(
            remaining=Sum("credit_lots__remaining_nanousd", filter=spendable_lots),
            next_expiry=Min("credit_lots__expires_at", filter=spendable_lots),
        )
        .values_list("debt_nanousd", "remaining", "next_expiry")
        .get()
    )
    spendable = remaining or 0
    return Balance(
        balance_nanousd=spendable - debt,
        spendable_nanousd=spendable,
        debt_nanousd=debt,
        next_expiry_at=next_expiry,
    )


def balance_cache_key(*, account_id: int, generation: int | str) -> str:
    return BALANCE_CACHE_KEY.format(account_id=account_id, generation=generation)


def balance_generation(*, account_id: int) -> int:
    return cache.get(BALANCE_GENERATION_KEY.format(account_id=account_id), 0)


def balance_cache_fill(*, account_id: int, generation: int, at: datetime | None = None) -> int:
    """Compute the balance and cache it under `generation`, read before this call.

    A balance computed just before a ledger write commits lands under the generation that
    write then bumps, so it is never served. The entry expires before the next lot does,
    when the balance drops without a ledger write.
    """
    at = at or timezone.now()
    balance = account_balance(account_id=account_id, at=at)
    timeout = settings.GATEWAY_AUTH_CACHE_SECONDS
    if balance.next_expiry_at is not None:
        # Whole seconds, rounded down: the cache stores no fractions.
        timeout = min(timeout, int((balance.next_expiry_at - at).total_seconds()))
    if timeout > 0:
        cache.set(
            balance_cache_key(account_id=account_id, generation=generation),
            balance.balance_nanousd,
            timeout=timeout,
        )
    return balance.balance_nanousd


def account_balance_cached(*, account_id: int) -> int:
    """Return the balance in nano-dollars, from the cache while no ledger write or expiry
    has changed it.

    Entries are plain integers, so the gateway's admission script in Redis reads them too.
    """
    generation = balance_generation(account_id=account_id)
    cached = cache.get(balance_cache_key(account_id=account_id, generation=generation))
    if cached is not None:
        return cached
    return balance_cache_fill(account_id=account_id, generation=generation)


# Keys: 1 generation, 2 pending publication. ARGV: 1 the publication's token, 2 balance,
# 3 expiry (epoch ms), 4 cache key of the balance without the generation.
PUBLISH_SCRIPT = """
local generation = redis.call('INCR', KEYS[1])
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  redis.call('SET', ARGV[4] .. generation, ARGV[2], 'PXAT', ARGV[3])
end
return generation
"""
# Serializes the local publication of balances (a cache that is not Redis).
_publish_lock = threading.Lock()
_redis_clients_lock = threading.Lock()
_redis_clients: dict[str, redis.Redis] = {}


def cache_redis_url() -> str | None:
    """Return the URL of the default cache's Redis database, or None when it is not Redis."""
    cache_settings = settings.CACHES["default"]
    if "redis" not in cache_settings["BACKEND"].lower():
        return None
    location = cache_settings["LOCATION"]
    return location[0] if isinstance(location, list | tuple) else location.split(",")[0]


def _cache_redis() -> redis.Redis | None:
    """Return a client of the cache's Redis database, or None when the cache is not Redis."""
    url = cache_redis_url()
    if url is None:
        return None
    with _redis_clients_lock:
        client = _redis_clients.get(url)
        if client is None:
            client = _redis_clients[url] = redis.Redis.from_url(url)
    return client


def balance_cache_evict_on_commit(account_id: int) -> None:
    """Retire the account's cached balance once the current transaction commits.

    Call it with the account row locked. It also cancels a publication still pending from
    an earlier write (`balance_cache_publish_on_commit`), whose balance lacks this one.
    """
    generation_key = BALANCE_GENERATION_KEY.format(account_id=account_id)
    try:
        cache.delete(BALANCE_PENDING_KEY.format(account_id=account_id))
    except redis.RedisError as error:
        # Failing the ledger write would be worse than a stale balance a pending
        # publication may cache until the next write.
        logger.warning(
            "Cancelling the balance publication of account %s failed: %s",
            account_id,
            type(error).__name__,
        )

    def evict() -> None:
        cache.add(generation_key, 0, timeout=None)
        # Entries under older generations are never read again and expire on their own.
        cache.incr(generation_key)

    transaction.on_commit(evict)


def balance_cache_publish_on_commit(
    *, account_id: int, balance_nanousd: int, valid_until: datetime | None
) -> None:
    """Retire the cached balance once the transaction commits, and cache its successor.

    Inside `balance_publications_deferred`, the commit queues this step for the caller
    instead of running it.

    Call it with the account row locked, after the transaction's last change to the
    account's lots and debt, with the balance those leave. Readers then go from the old
    balance straight to the new one, with no cache miss in between, which would send the
    next gateway request to the database.

    The publication is pending until the commit. A later write takes the account's lock
    after this one commits and replaces or cancels it, so a publication that runs late,
    after a later write's, only retires the cached balance.
    """
    now_ms = int(time.time() * 1000)
    expires_ms = now_ms + settings.GATEWAY_AUTH_CACHE_SECONDS * 1000
    if valid_until is not None:
        expires_ms = min(expires_ms, (valid_until - EPOCH) // timedelta(milliseconds=1))
    if expires_ms <= now_ms:
        # A lot expires now: the balance is computed again when it is next read.
        balance_cache_evict_on_commit(account_id)
        return
    token = secrets.token_hex(8)
    pending_key = BALANCE_PENDING_KEY.format(account_id=account_id)
    client = _cache_redis()
    if client is None:
        _publish_local(account_id, token, balance_nanousd, expires_ms)
        return
    pending = cache.make_key(pending_key)
    try:
        # Outlives the transaction, whose commit reads it.
        client.set(pending, token, px=settings.GATEWAY_AUTH_CACHE_SECONDS * 1000)
    except redis.RedisError as error:
        logger.warning(
            "Publishing the balance of account %s failed, retiring it instead: %s",
            account_id,
            type(error).__name__,
        )
        balance_cache_evict_on_commit(account_id)
        return

    def publish(pipeline: redis.client.Pipeline | None = None) -> None:
        (pipeline or client).eval(
            PUBLISH_SCRIPT,
            2,
            cache.make_key(BALANCE_GENERATION_KEY.format(account_id=account_id)),
            pending,
            token,
            balance_nanousd,
            expires_ms,
            cache.make_key(balance_cache_key(account_id=account_id, generation="")),
        )

    _publish_on_commit(publish)


def _publish_local(account_id: int, token: str, balance_nanousd: int, expires_ms: int) -> None:
    """`balance_cache_publish_on_commit` on a cache that is not Redis (one process)."""
    pending_key = BALANCE_PENDING_KEY.format(account_id=account_id)
    generation_key = BALANCE_GENERATION_KEY.format(account_id=account_id)
    cache.set(pending_key, token, timeout=None)

    def publish(pipeline: redis.client.Pipeline | None = None) -> None:
        with _publish_lock:
            cache.add(generation_key, 0, timeout=None)
            generation = cache.incr(generation_key)
            if cache.get(pending_key) != token:
                return
            cache.delete(pending_key)
            timeout = (expires_ms - int(time.time() * 1000)) // 1000
            if timeout > 0:
                key = balance_cache_key(account_id=account_id, generation=generation)
                cache.set(key, balance_nanousd, timeout=timeout)

    _publish_on_commit(publish)


class DeferredPublications:
    """Balance publications of committed debits, for the caller to run."""

    def __init__(self) -> None:
        self.publications: list[Publication] = []
        self.open = True

    def run(self, pipeline: redis.client.Pipeline | None = None) -> None:
        """Run every publication, into `pipeline` when it is given (Redis only)."""
        for publication in self.publications:
            publication(pipeline)
        self.publications.clear()


_deferred = threading.local()


@contextmanager
def balance_publications_deferred() -> Iterator[DeferredPublications]:
    """Collect the balance publications of debits committed in the block instead of running
    them.

    The caller runs them together with its own Redis commands in one transaction: the
    gateway drops the settled requests' reservations in the same step, so no request
    admitted in between counts a charge twice (once in the balance, once reserved).
    """
    deferred = DeferredPublications()
    previous = getattr(_deferred, "current", None)
    _deferred.current = deferred
    try:
        yield deferred
    finally:
        _deferred.current = previous
        deferred.open = False


def _publish_on_commit(publish: "Publication") -> None:
    """Run `publish` when the transaction commits, or queue it for the deferring caller."""
    deferred: DeferredPublications | None = getattr(_deferred, "current", None)
    if deferred is None:
        transaction.on_commit(publish)
        return

    def queue() -> None:
        # A commit after the block ended (an outer transaction) runs it at once.
        if deferred.open:
            deferred.publications.append(publish)
        else:
            publish()

    transaction.on_commit(queue)


def locked_account(account_id: int) -> Account:
    return Account.objects.select_for_update().get(pk=account_id)


def existing_transaction(idempotency_key: str) -> LedgerTransaction | None:
    return LedgerTransaction.objects.filter(idempotency_key=idempotency_key).first()


def transaction_record(
    *,
    account: Account,
    kind: str,
    idempotency_key: str,
    amount_nanousd: int,
    entries: list[tuple[CreditLot | None, int]],
    at: datetime,
    opened_lot: CreditLot | None = None,
    request_id: str = "",
    description: str = "",
    actor: User | None = None,
) -> LedgerTransaction:
    """Write a transaction and its entries; the caller has already updated lots and debt."""
    balance_after = account_balance(account_id=account.pk, at=at).balance_nanousd
    ledger_transaction = LedgerTransaction.objects.create(
        account=account,
        kind=kind,
        idempotency_key=idempotency_key,
        amount_nanousd=amount_nanousd,
        balance_after_nanousd=balance_after,
        created_at=at,
        opened_lot=opened_lot,
        request_id=request_id,
        description=description,
        actor=actor,
    )
    LedgerEntry.objects.bulk_create(
        LedgerEntry(
            transaction=ledger_transaction,
            account=account,
            lot=lot,
            amount_nanousd=amount,
            created_at=at,
        )
        for lot, amount in entries
        if amount != 0
    )
    balance_cache_evict_on_commit(account.pk)
    low_balance_check_queue(account=account, balance_nanousd=balance_after)
    return ledger_transaction


def low_balance_check_queue(*, account: Account, balance_nanousd: int) -> None:
    """Queue the low-balance check when the alert state must change; free otherwise.

    The check and its email run in Celery after the transaction commits.
    """
    if account.low_balance_alert_due(balance_nanousd=balance_nanousd):
        check = credit_tasks.account_low_balance_check
        transaction.on_commit(lambda: check.delay(account.pk), robust=True)


def lot_open(
    *,
    account: Account,
    source: str,
    amount_nanousd: int,
    idempotency_key: str,
    kind: str,
    at: datetime,
    expires_at: datetime,
    description: str,
    actor: User | None = None,
    **lot_fields,
) -> CreditLot:
    """Create a lot on a locked account, paying any debt out of it first."""
    lot = CreditLot.objects.create(
        account=account,
        source=source,
        original_nanousd=amount_nanousd,
        remaining_nanousd=amount_nanousd,
        created_at=at,
        expires_at=expires_at,
        granted_by=actor,
        **lot_fields,
    )
    entries: list[tuple[CreditLot | None, int]] = []
    repayment = min(account.debt_nanousd, amount_nanousd) if expires_at > at else 0
    if repayment:
        lot.remaining_nanousd -= repayment
        lot.save(update_fields=["remaining_nanousd"])
        account.debt_nanousd -= repayment
        account.save(update_fields=["debt_nanousd"])
        entries = [(lot, -repayment), (None, repayment)]
    transaction_record(
        account=account,
        kind=kind,
        idempotency_key=idempotency_key,
        amount_nanousd=amount_nanousd,
        entries=entries,
        at=at,
        opened_lot=lot,
        description=description,
        actor=actor,
    )
    return lot


@transaction.atomic
def credit_grant(
    *,
    account: Account,
    amount_nanousd: int,
    reason: str,
    actor: User | None = None,
    expires_at: datetime | None = None,
    idempotency_key: str | None = None,
    at: datetime | None = None,
) -> CreditLot:
    """Grant a promotional lot; `reason` is required and kept on the lot and the ledger."""
    if amount_nanousd <= 0:
        raise CreditsError("A grant must be a positive amount.")
    if not reason.strip():
        raise CreditsError("A grant needs a reason.")
    at = at or timezone.now()
    expires_at = expires_at or lot_expiry_for(at)
    if expires_at <= at:
        raise CreditsError("A grant's expiry must be in the future.")
    key = idempotency_key or f"grant:{account.pk}:{at.isoformat()}:{amount_nanousd}"

    locked = locked_account(account.pk)
    existing = existing_transaction(key)
    if existing is not None:
        assert existing.opened_lot is not None
        return existing.opened_lot
    lot = lot_open(
        account=locked,
        source=CreditLot.Source.GRANT,
        amount_nanousd=amount_nanousd,
        idempotency_key=key,
        kind=LedgerTransaction.Kind.GRANT,
        at=at,
        expires_at=expires_at,
        description=reason.strip(),
        actor=actor,
        reason=reason.strip(),
    )
    logger.info("Granted lot %s of %s nanousd to account %s", lot.pk, amount_nanousd, account.pk)
    return lot


@dataclass(frozen=True)
class Debit:
    transaction: LedgerTransaction
    created: bool


@dataclass(frozen=True)
class UsageCharge:
    """One request's cost, to be drawn from an account's lots."""

    request_id: str
    amount_nanousd: int
    at: datetime
    description: str = ""


def usage_debit(
    *,
    account_id: int,
    request_id: str,
    amount_nanousd: int,
    description: str = "",
    at: datetime | None = None,
) -> Debit:
    """Charge a request to the account, once per request id.

    Draws from the lot that expires soonest (then oldest, then lowest id), one entry per
    lot touched; whatever the lots cannot cover becomes debt.
    """
    charge = UsageCharge(
        request_id=request_id,
        amount_nanousd=amount_nanousd,
        at=at or timezone.now(),
        description=description,
    )
    try:
        return usage_debits_apply(account_id=account_id, charges=[charge])[0]
    except IntegrityError:
        # A concurrent debit of the same request id won the race on the unique key.
        existing = existing_transaction(f"usage:{request_id}")
        if existing is None:
            raise
        return Debit(transaction=existing, created=False)


@transaction.atomic
def usage_debits_apply(*, account_id: int, charges: list[UsageCharge]) -> list[Debit]:
    """Charge several requests of one account under one lock, once per request id.

    The gateway meters in batches; this costs about eight queries however many charges
    there are. Charges are applied in order of `at`, each as `usage_debit` describes,
    and the debits are returned in the order given.
    """
    for charge in charges:
        if charge.amount_nanousd <= 0:
            raise CreditsError("A debit must be a positive amount.")
    account = locked_account(account_id)
    keys = {charge.request_id: f"usage:{charge.request_id}" for charge in charges}
    done = {
        ledger_transaction.idempotency_key: ledger_transaction
        for ledger_transaction in LedgerTransaction.objects.filter(
            idempotency_key__in=keys.values()
        )
    }

    # 1. Draw each new charge from the lots, in memory; the rest becomes debt.
    earliest = min(charge.at for charge in charges)
    lots = list(
        CreditLot.objects.select_for_update()
        .filter(account=account, remaining_nanousd__gt=0)
        .spendable(at=earliest)
        .draw_down_order()
    )
    debt_before = account.debt_nanousd
    touched: dict[int, CreditLot] = {}
    pending: list[tuple[LedgerTransaction, list[tuple[CreditLot | None, int]]]] = []
    for charge in sorted(charges, key=lambda item: (item.at, item.request_id)):
        key = keys[charge.request_id]
        if key in done:
            continue
        outstanding = charge.amount_nanousd
        entries: list[tuple[CreditLot | None, int]] = []
        for lot in lots:
            if outstanding == 0:
                break
            if lot.remaining_nanousd == 0 or charge.at >= lot.expires_at:
                continue
            take = min(lot.remaining_nanousd, outstanding)
            lot.remaining_nanousd -= take
            touched[lot.pk] = lot
            entries.append((lot, -take))
            outstanding -= take
        if outstanding:
            account.debt_nanousd += outstanding
            entries.append((None, -outstanding))
        balance_after = (
            sum(lot.remaining_nanousd for lot in lots if charge.at < lot.expires_at)
            - account.debt_nanousd
        )
        ledger_transaction = LedgerTransaction(
            account=account,
            kind=LedgerTransaction.Kind.USAGE,
            idempotency_key=key,
            amount_nanousd=-charge.amount_nanousd,
            balance_after_nanousd=balance_after,
            created_at=charge.at,
            request_id=charge.request_id,
            description=charge.description,
        )
        done[key] = ledger_transaction
        pending.append((ledger_transaction, entries))
    if not pending:
        return [
            Debit(transaction=done[keys[charge.request_id]], created=False) for charge in charges
        ]

    # 2. Write everything in bulk.
    LedgerTransaction.objects.bulk_create([item for item, _entries in pending])
    LedgerEntry.objects.bulk_create(
        LedgerEntry(
            transaction=ledger_transaction,
            account=account,
            lot=lot,
            amount_nanousd=amount,
            created_at=ledger_transaction.created_at,
        )
        for ledger_transaction, entries in pending
        for lot, amount in entries
    )
    CreditLot.objects.bulk_update(list(touched.values()), ["remaining_nanousd"])
    if account.debt_nanousd != debt_before:
        account.save(update_fields=["debt_nanousd"])
    last_balance = pending[-1][0].balance_after_nanousd
    last_at = pending[-1][0].created_at
    balance_cache_publish_on_commit(
        account_id=account.pk,
        balance_nanousd=last_balance,
        valid_until=min(
            (lot.expires_at for lot in lots if lot.remaining_nanousd and last_at < lot.expires_at),
            default=None,
        ),
    )
    low_balance_check_queue(account=account, balance_nanousd=last_balance)

    created = {id(item) for item, _entries in pending}
    return [
        Debit(
            transaction=done[keys[charge.request_id]],
            created=id(done[keys[charge.request_id]]) in created,
        )
        for charge in charges
    ]


@transaction.atomic
def credit_lot_expire(*, lot_id: int, at: datetime | None = None) -> LedgerTransaction | None:
    """Write the expiry of a lot past `expires_at`: one entry for exactly its remainder.

    Returns None when the lot has not expired yet or its expiry is already written.
    """
    at = at or timezone.now()
    lot = CreditLot.objects.get(pk=lot_id)
    if at < lot.expires_at:
        return None
    account = locked_account(lot.account_id)
    lot = CreditLot.objects.select_for_update().get(pk=lot_id)
    key = f"expire:{lot.pk}"
    if lot.expired_at is not None or existing_transaction(key) is not None:
        return None

    remainder = lot.remaining_nanousd
    lot.remaining_nanousd = 0
    lot.expired_at = at
    lot.save(update_fields=["remaining_nanousd", "expired_at"])
    # The balance already excluded this lot, so the balance change is zero.
    ledger_transaction = transaction_record(
        account=account,
        kind=LedgerTransaction.Kind.EXPIRY,
        idempotency_key=key,
        amount_nanousd=0,
        entries=[(lot, -remainder)],
        at=at,
        description=f"Lot {lot.pk} expired with USD {format_usd_short(remainder)} unspent",
    )
    logger.info("Expired lot %s of account %s, remainder %s", lot.pk, account.pk, remainder)
    return ledger_transaction


def credit_lots_due_for_expiry(*, at: datetime) -> list[int]:
    return list(
        CreditLot.objects.filter(expires_at__lte=at, expired_at__isnull=True)
        .order_by("expires_at", "id")
        .values_list("id", flat=True)
    )


def credit_lots_expire_due(*, at: datetime | None = None) -> int:
    """Expire every lot past its expiry; return how many expiries were written."""
    at = at or timezone.now()
    written = 0
    for lot_id in credit_lots_due_for_expiry(at=at):
        if credit_lot_expire(lot_id=lot_id, at=at) is not None:
            written += 1
    return written


@transaction.atomic
def purchase_lot_create(
    *,
    account_id: int,
    session_id: str,
    amount_cents: int,
    currency: str,
    payment_intent_id: str,
    at: datetime | None = None,
) -> tuple[CreditLot, bool]:
    """Create the lot of a paid Checkout Session, once per session id.

    Returns the lot and whether this call created it.
    """
    at = at or timezone.now()
    account = locked_account(account_id)
    existing = CreditLot.objects.filter(stripe_checkout_session_id=session_id).first()
    if existing is not None:
        return existing, False
    lot = lot_open(
        account=account,
        source=CreditLot.Source.PURCHASE,
        amount_nanousd=nanousd_from_cents(amount_cents),
        idempotency_key=f"checkout:{session_id}",
        kind=LedgerTransaction.Kind.PURCHASE,
        at=at,
        expires_at=lot_expiry_for(at),
        description=f"Purchase of USD {format_usd_short(nanousd_from_cents(amount_cents))}",
        stripe_checkout_session_id=session_id,
        stripe_payment_intent_id=payment_intent_id,
        amount_cents=amount_cents,
        currency=currency,
    )
    CheckoutPurchase.objects.filter(stripe_session_id=session_id).update(
        status=CheckoutPurchase.Status.FULFILLED, lot=lot
    )
    logger.info("Created lot %s from checkout session for account %s", lot.pk, account.pk)
    return lot, True


def ledger_violations(*, account: Account, at: datetime | None = None) -> list[str]:
    """List every broken ledger invariant of one account; empty when the ledger is sound.

    Checks that each lot's original plus its entries equals its remainder, that the debt
    equals minus the sum of lot-less entries, and that each transaction's amount equals
    its entries plus the lot it opened. Costs three queries per account.
    """
    at = at or timezone.now()
    violations: list[str] = []
    lot_sums = dict(
        LedgerEntry.objects.filter(account=account, lot__isnull=False)
        .values_list("lot_id")
        .annotate(total=Sum("amount_nanousd"))
        .values_list("lot_id", "total")
    )
    for lot in CreditLot.objects.filter(account=account):
        expected = lot.original_nanousd + (lot_sums.get(lot.pk) or 0)
        if expected != lot.remaining_nanousd:
            violations.append(
                f"lot {lot.pk}: original {lot.original_nanousd} plus entries is {expected}, "
                f"but remaining is {lot.remaining_nanousd}"
            )
        if lot.expires_at <= at and lot.expired_at is not None and lot.remaining_nanousd != 0:
            violations.append(f"lot {lot.pk}: expired with {lot.remaining_nanousd} remaining")

    debt_entries = (
        LedgerEntry.objects.filter(account=account, lot__isnull=True).aggregate(
            total=Sum("amount_nanousd")
        )["total"]
        or 0
    )
    if -debt_entries != account.debt_nanousd:
        violations.append(
            f"account {account.pk}: debt is {account.debt_nanousd}, entries say {-debt_entries}"
        )

    transactions = LedgerTransaction.objects.filter(account=account).select_related("opened_lot")
    entry_sums = dict(
        LedgerEntry.objects.filter(account=account)
        .values_list("transaction_id")
        .annotate(total=Sum("amount_nanousd"))
        .values_list("transaction_id", "total")
    )
    for ledger_transaction in transactions:
        opened = (
            ledger_transaction.opened_lot.original_nanousd if ledger_transaction.opened_lot else 0
        )
        entries = entry_sums.get(ledger_transaction.pk) or 0
        # An expiry moves a remainder that the balance had already dropped.
        if ledger_transaction.kind == LedgerTransaction.Kind.EXPIRY:
            continue
        # A dispute's freeze or unfreeze takes a lot out of the balance or puts it back
        # without touching the lot: the amount is that change, and there are no entries.
        if ledger_transaction.kind in (
            LedgerTransaction.Kind.FREEZE,
            LedgerTransaction.Kind.UNFREEZE,
        ):
            if entries or opened:
                violations.append(
                    f"transaction {ledger_transaction.pk}: a {ledger_transaction.kind} "
                    f"must have no entries, but they sum to {entries}"
                )
            continue
        # Voiding a frozen lot (a lost dispute) removes a remainder that the freeze had
        # already taken out of the balance, so, like an expiry, its amount is zero.
        if (
            ledger_transaction.kind == LedgerTransaction.Kind.VOID
            and ledger_transaction.amount_nanousd == 0
            and entries <= 0
        ):
            continue
        if opened + entries != ledger_transaction.amount_nanousd:
            violations.append(
                f"transaction {ledger_transaction.pk}: amount {ledger_transaction.amount_nanousd} "
                f"but entries and opened lot sum to {opened + entries}"
            )
    return violations
