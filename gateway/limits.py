"""Per-key limits and per-request reservations, enforced atomically across processes.

Before a request is forwarded, one atomic step checks, in this order:

1. that the balance is positive (else 402, out of credit); with Redis the step reads the
   cached balance itself, together with the holds, so no charge that lands between two
   reads can be missed;
2. the key's requests per minute: admitted requests in a sliding 60-second window;
3. the key's spend limit: spend settled in the current period (UTC day, ISO week from
   Monday, calendar month, or ever) plus the reservations the key holds;
4. the account's credit: the cached balance minus the reservations the account holds.

A request that states `max_tokens` (or `max_completion_tokens`) reserves its worst-case
cost on the account, and on the key when the key has a spend limit. It is admitted only
when that reservation fits. A request without an output limit reserves nothing and is
admitted while some room is left. Once the response is metered, `reservation_settle`
drops the reservation and counts the real cost. Reservations also lapse on their own after
GATEWAY_RESERVATION_TTL_SECONDS, so a process that dies mid-request cannot leak them.
Concurrent requests therefore overshoot a balance or a spend limit by at most the cost of
the unreserved requests in flight.

With Redis (`REDIS_URL` set) the state lives in the cache's Redis database and each step
is one Lua script, so every process sees every other's requests. The script also checks
the version tokens the request's routes were resolved under, so the event loop can admit
a request from the process's memory in one round trip (`reservation_hold_cached`).
Without Redis (the single-process `make run` default) it lives in this process behind a
lock, with the same semantics. Spend counters are a cache of `UsageRecord.cost_nanousd`:
a counter that is missing (a flushed or restarted store, a new period) is rebuilt with
one query.

Amounts are integer nano-dollars. Lua numbers are doubles, which hold every integer below
2**53 (about USD 9 million) exactly; amounts passed to the scripts are capped below that,
and the settled spend is only ever added with Redis's own 64-bit INCRBY.
"""

import asyncio
import logging
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis
import redis.asyncio
from dateutil.relativedelta import relativedelta
from django.conf import settings
from django.core.cache import cache
from django.db.models import Sum
from django.utils import timezone
from redis.commands.core import AsyncScript

from credits.money import format_usd_short
from credits.services import (
    BALANCE_GENERATION_KEY,
    account_balance_cached,
    balance_cache_fill,
    balance_cache_key,
    cache_redis_url,
)
from credits.services.ledger import DeferredPublications
from gateway.errors import GatewayError
from gateway.models import AccessKey, UsageRecord
from gateway.pricing import Price, TokenUsage, request_cost
from gateway.services import KeyIdentity
from gateway.usage import estimate_tokens, request_text

logger = logging.getLogger(__name__)

# Every integer below this is exact as a Lua number (a double).
EXACT_LIMIT = 2**53 - 1
REQUEST_WINDOW_MS = 60_000
# The text estimate (about four characters a token) can be off by a factor of two for
# code or other languages, and messages carry framing tokens of their own.
INPUT_ESTIMATE_FACTOR = 2
INPUT_ESTIMATE_MARGIN_TOKENS = 256
# Counters of a spend limit that never resets expire a week after they were built and are
# then rebuilt, so counters of keys no longer in use do not stay in Redis.
LIFETIME_COUNTER_TTL_MS = 7 * 24 * 3600 * 1000
# Counters of a calendar period outlive the period by a day, for late settlements.
PERIOD_COUNTER_GRACE_MS = 24 * 3600 * 1000
SETTLE_COUNT_TTL_MS = 24 * 3600 * 1000
# Retries when a settlement lands between reading the balance and the admission step.
STALE_RETRIES = 3
ADMIT_ROUNDS = 8
REDIS_TIMEOUT_SECONDS = 5

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PERIOD_NAMES = {
    AccessKey.SpendLimitPeriod.DAILY: "daily",
    AccessKey.SpendLimitPeriod.WEEKLY: "weekly",
    AccessKey.SpendLimitPeriod.MONTHLY: "monthly",
    AccessKey.SpendLimitPeriod.NEVER: "lifetime",
}


def epoch_ms(at: datetime) -> int:
    """Return milliseconds since 1970 as an exact integer."""
    return (at - _EPOCH) // timedelta(milliseconds=1)


def ceil_seconds(milliseconds: int) -> int:
    """Round a wait up to whole seconds, at least one, as `retry-after` states it."""
    return max(1, -(-milliseconds // 1000))


@dataclass(frozen=True)
class SpendPeriod:
    """The UTC calendar period a spend limit counts in; both ends None for `never`."""

    kind: str
    start: datetime | None
    end: datetime | None

    @property
    def slug(self) -> str:
        if self.start is None:
            return "all"
        return f"{self.kind[0]}{self.start:%Y%m%d}"


def spend_period(*, period: str, at: datetime) -> SpendPeriod:
    """Return the period containing `at`: a UTC day, an ISO week or a calendar month."""
    day = at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == AccessKey.SpendLimitPeriod.DAILY:
        return SpendPeriod(period, day, day + timedelta(days=1))
    if period == AccessKey.SpendLimitPeriod.WEEKLY:
        start = day - timedelta(days=day.weekday())
        return SpendPeriod(period, start, start + timedelta(days=7))
    if period == AccessKey.SpendLimitPeriod.MONTHLY:
        start = day.replace(day=1)
        return SpendPeriod(period, start, start + relativedelta(months=1))
    return SpendPeriod(AccessKey.SpendLimitPeriod.NEVER, None, None)


def spend_counter_ttl_ms(period: SpendPeriod, *, at: datetime) -> int:
    if period.end is None:
        return LIFETIME_COUNTER_TTL_MS
    return max(1, epoch_ms(period.end) - epoch_ms(at)) + PERIOD_COUNTER_GRACE_MS


def key_spend_recorded(*, account_id: int, key_id: int, period: SpendPeriod) -> int:
    """Sum the recorded cost of a key's requests in a period (one query)."""
    records = UsageRecord.objects.filter(account_id=account_id, access_key_id=key_id)
    if period.start is not None:
        records = records.filter(created_at__gte=period.start, created_at__lt=period.end)
    return records.aggregate(total=Sum("cost_nanousd"))["total"] or 0


def _positive_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def worst_case_cost(*, body: dict, price: Price | None) -> int:
    """Return the most a request can cost on one route, or 0 when it states no output limit.

    Input is the text estimate doubled plus a margin, priced at the dearest input rate,
    because cache writes cost more than plain input. Output is the limit times `n`
    choices.

    NOTE: images and tool definitions are not in the input estimate, so a request that
    sends many of them can cost more than its reservation.
    """
    limits = [_positive_int(body.get(name)) for name in ("max_tokens", "max_completion_tokens")]
    output_limit = max((limit for limit in limits if limit is not None), default=None)
    if output_limit is None:
        return 0
    choices = _positive_int(body.get("n")) or 1
    input_tokens = (
        estimate_tokens(request_text(body)) * INPUT_ESTIMATE_FACTOR + INPUT_ESTIMATE_MARGIN_TOKENS
    )
    usage = TokenUsage(input_tokens=input_tokens, output_tokens=output_limit * choices)
    dearest = None
    if price is not None:
        dearest = Price(
            input=max(price.input, price.cache_read, price.cache_write),
            output=price.output,
            cache_read=0,
            cache_write=0,
        )
    return request_cost(usage=usage, price=dearest).total_nanousd


@dataclass(frozen=True)
class Reservation:
    """The worst-case cost an admitted request reserves until it is settled."""

    reservation_id: str
    account_id: int
    key_id: int
    # Worst-case cost held on the account, and on the key when it has a spend limit.
    hold_nanousd: int
    # The key's spend limit period; the settle time picks the counter within it.
    spend_limit_period: str


@dataclass(frozen=True)
class Outcome:
    """The result of the admission step, with the amounts the step read."""

    status: str
    retry_after_ms: int = 0
    spent_nanousd: int = 0
    key_held_nanousd: int = 0
    account_held_nanousd: int = 0
    balance_nanousd: int = 0
    # The balance generation a cache miss was found under.
    generation: int = 0


ADMITTED = "ok"
# The balance is not cached under the current generation; the caller computes it.
BALANCE_MISS = "miss"
# A ledger write landed since the caller computed the balance it passed.
STALE = "stale"
# A version token the caller's routes were resolved under has changed.
VERSIONS_CHANGED = "versions"
REBUILD = "rebuild"
OUT_OF_CREDIT = "empty"
OVER_REQUESTS = "rpm"
OVER_SPEND = "spend"
OVER_BALANCE = "balance"
# Statuses after which nothing was held and the step can be run again.
RETRY_STATUSES = frozenset({BALANCE_MISS, STALE, VERSIONS_CHANGED, REBUILD})


@dataclass(frozen=True)
class AdmitArgs:
    reservation_id: str
    account_id: int
    key_id: int
    now_ms: int
    hold_nanousd: int
    # None reads the cached balance inside the step.
    balance_nanousd: int | None
    # The generation `balance_nanousd` was computed under; None skips the check.
    generation: int | None
    spend_limit_nanousd: int | None
    spend_slug: str
    requests_per_minute: int | None
    hold_ttl_ms: int
    # (cache key, token) pairs the request was routed under; the step refuses to run when
    # one has changed since. Only the Redis store checks them.
    versions: tuple[tuple[str, int], ...] = ()


# Keys: 1 account holds (zset id -> expiry ms), 2 account held (hash id -> nanousd),
# 3 key holds, 4 key held, 5 key spend counter, 6 key window (zset id -> admitted ms),
# 7 balance generation, 8... version tokens. ARGV: 1 now ms, 2 id, 3 hold, 4 balance
# ('' = the cached one), 5 its generation ('' = unchecked), 6 cache key of the balance
# without the generation, 7 spend limit ('' = none), 8 requests per minute ('' = none),
# 9 hold ttl ms, 10 window ms, 11... the expected version tokens.
# The cached balance's key depends on the generation, so the script builds it (a key not
# declared in KEYS, which a single Redis server allows).
ADMIT_SCRIPT = """
for index = 8, #KEYS do
  if redis.call('GET', KEYS[index]) ~= ARGV[index + 3] then
    return {'versions'}
  end
end

local generation = redis.call('GET', KEYS[7]) or '0'
local raw = ARGV[4]
if raw == '' then
  raw = redis.call('GET', ARGV[6] .. generation)
  if not raw then
    return {'miss', generation}
  end
elseif ARGV[5] ~= '' and ARGV[5] ~= generation then
  return {'stale'}
end
local balance = tonumber(raw)
if balance <= 0 then
  return {'empty', raw}
end
balance = math.min(balance, 9007199254740991)

local now = tonumber(ARGV[1])
local hold = tonumber(ARGV[3])
local limit = tonumber(ARGV[7])
local rpm = tonumber(ARGV[8])
local ttl = tonumber(ARGV[9])
local window = tonumber(ARGV[10])

local function held(zset, hash)
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', zset, '-inf', now)) do
    redis.call('ZREM', zset, member)
    redis.call('HDEL', hash, member)
  end
  local total = 0
  for _, amount in ipairs(redis.call('HVALS', hash)) do
    total = total + tonumber(amount)
  end
  return total
end

if rpm then
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - window)
  if redis.call('ZCARD', KEYS[6]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[6], 0, 0, 'WITHSCORES')
    return {'rpm', tonumber(oldest[2]) + window - now}
  end
end

if limit then
  local spent = redis.call('GET', KEYS[5])
  if not spent then
    return {'rebuild'}
  end
  spent = tonumber(spent)
  local key_held = held(KEYS[3], KEYS[4])
  if spent + key_held >= limit or spent + key_held + hold > limit then
    return {'spend', spent, key_held}
  end
end

local account_held = held(KEYS[1], KEYS[2])
if account_held >= balance or account_held + hold > balance then
  return {'balance', account_held, raw}
end

if hold > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  if limit then
    redis.call('ZADD', KEYS[3], now + ttl, ARGV[2])
    redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
    redis.call('PEXPIRE', KEYS[3], ttl)
    redis.call('PEXPIRE', KEYS[4], ttl)
  end
end
if rpm then
  redis.call('ZADD', KEYS[6], now, ARGV[2])
  redis.call('PEXPIRE', KEYS[6], window)
end
return {'ok'}
"""


def _outcome(reply: list) -> Outcome:
    """Read the admission script's reply."""
    status = reply[0].decode()
    if status == OVER_REQUESTS:
        return Outcome(status, retry_after_ms=int(reply[1]))
    if status == OVER_SPEND:
        return Outcome(status, spent_nanousd=int(reply[1]), key_held_nanousd=int(reply[2]))
    if status == OVER_BALANCE:
        return Outcome(status, account_held_nanousd=int(reply[1]), balance_nanousd=int(reply[2]))
    if status == OUT_OF_CREDIT:
        return Outcome(status, balance_nanousd=int(reply[1]))
    if status == BALANCE_MISS:
        return Outcome(status, generation=int(reply[1]))
    return Outcome(status)


# Keys: 1 account holds, 2 account held, 3 account settle count, 4 key holds, 5 key held,
# 6 key spend counter. ARGV: 1 id, 2 cost, 3 release ('1' or '0'), 4 settle count ttl ms.
# A missing counter is left missing: its rebuild reads the usage record instead.
SETTLE_SCRIPT = """
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('HDEL', KEYS[5], ARGV[1])
end
if ARGV[2] ~= '0' then
  if redis.call('EXISTS', KEYS[6]) == 1 then
    redis.call('INCRBY', KEYS[6], ARGV[2])
  end
  redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
end
return 1
"""

# Keys: 1 account settle count, 2 key spend counter. ARGV: 1 expected settle count
# ('' = unchecked), 2 spent, 3 counter ttl ms. Refuses when a settlement happened since
# the caller started counting, because its cost may be missing from the sum.
SEED_SCRIPT = """
if ARGV[1] ~= '' and (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3], 'NX')
return 1
"""


class RedisLimits:
    """Limits state in Redis; every check-and-hold is one Lua script."""

    def __init__(self, url: str, prefix: str) -> None:
        # Bounded waits: a Redis that hangs turns into a 503, not a request that never ends.
        self.client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS
        )
        self.url = url
        self.prefix = prefix
        self._admit = self.client.register_script(ADMIT_SCRIPT)
        # One client per event loop for the asynchronous admission step.
        self._loop_clients: dict[
            asyncio.AbstractEventLoop, tuple[redis.asyncio.Redis, AsyncScript]
        ] = {}
        self._settle = self.client.register_script(SETTLE_SCRIPT)
        self._seed = self.client.register_script(SEED_SCRIPT)

    def _account(self, account_id: int) -> str:
        # The hash tag keeps one account's keys in one cluster slot, as scripts require.
        return f"{self.prefix}:limits:{{a{account_id}}}"

    def _keys(self, account_id: int, key_id: int, spend_slug: str) -> list[str]:
        account = self._account(account_id)
        key = f"{account}:k{key_id}"
        return [
            f"{account}:holds",
            f"{account}:held",
            f"{account}:settles",
            f"{key}:holds",
            f"{key}:held",
            f"{key}:spend:{spend_slug}",
            f"{key}:window",
        ]

    def settle_count(self, *, account_id: int) -> str:
        value = self.client.get(f"{self._account(account_id)}:settles")
        return value.decode() if value is not None else "0"

    def _hold_scopes(self, reservation: Reservation, *, with_key: bool) -> list[tuple[str, str]]:
        keys = self._keys(reservation.account_id, reservation.key_id, "")
        return [(keys[0], keys[1])] + ([(keys[3], keys[4])] if with_key else [])

    def hold_replace(
        self, *, reservation: Reservation, amount_nanousd: int, with_key: bool, until_ms: int
    ) -> None:
        pipeline = self.client.pipeline(transaction=True)
        for holds, amounts in self._hold_scopes(reservation, with_key=with_key):
            pipeline.zadd(holds, {reservation.reservation_id: until_ms})
            pipeline.hset(amounts, reservation.reservation_id, amount_nanousd)
            pipeline.pexpireat(holds, until_ms)
            pipeline.pexpireat(amounts, until_ms)
        pipeline.execute()

    def _admit_call(self, args: AdmitArgs) -> tuple[list[str], list[object]]:
        """Return the admission script's keys and arguments."""
        keys = self._keys(args.account_id, args.key_id, args.spend_slug)
        return (
            [
                keys[0],
                keys[1],
                keys[3],
                keys[4],
                keys[5],
                keys[6],
                cache.make_key(BALANCE_GENERATION_KEY.format(account_id=args.account_id)),
                *(cache.make_key(key) for key, _token in args.versions),
            ],
            [
                args.now_ms,
                args.reservation_id,
                args.hold_nanousd,
                "" if args.balance_nanousd is None else args.balance_nanousd,
                "" if args.generation is None else args.generation,
                cache.make_key(balance_cache_key(account_id=args.account_id, generation="")),
                "" if args.spend_limit_nanousd is None else args.spend_limit_nanousd,
                "" if args.requests_per_minute is None else args.requests_per_minute,
                args.hold_ttl_ms,
                REQUEST_WINDOW_MS,
                *(token for _key, token in args.versions),
            ],
        )

    def admit(self, args: AdmitArgs) -> Outcome:
        keys, arguments = self._admit_call(args)
        return _outcome(self._admit(keys=keys, args=arguments))

    def _loop_client(self) -> tuple[redis.asyncio.Redis, AsyncScript]:
        """Return this event loop's client and its admission script."""
        loop = asyncio.get_running_loop()
        entry = self._loop_clients.get(loop)
        if entry is None:
            for stale in [other for other in self._loop_clients if other.is_closed()]:
                self._loop_clients.pop(stale, None)
            client = redis.asyncio.Redis.from_url(
                self.url,
                socket_timeout=REDIS_TIMEOUT_SECONDS,
                socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            )
            entry = self._loop_clients[loop] = (client, client.register_script(ADMIT_SCRIPT))
        return entry

    async def admit_async(self, args: AdmitArgs) -> Outcome:
        """Run the admission step on the event loop, with no thread in between."""
        _client, script = self._loop_client()
        keys, arguments = self._admit_call(args)
        return _outcome(await script(keys=keys, args=arguments))

    async def hold_replace_async(
        self, *, reservation: Reservation, amount_nanousd: int, with_key: bool, until_ms: int
    ) -> None:
        client, _script = self._loop_client()
        pipeline = client.pipeline(transaction=True)
        for holds, amounts in self._hold_scopes(reservation, with_key=with_key):
            pipeline.zadd(holds, {reservation.reservation_id: until_ms})
            pipeline.hset(amounts, reservation.reservation_id, amount_nanousd)
            pipeline.pexpireat(holds, until_ms)
            pipeline.pexpireat(amounts, until_ms)
        await pipeline.execute()

    def spend_seed(
        self,
        *,
        account_id: int,
        key_id: int,
        spend_slug: str,
        spent_nanousd: int,
        ttl_ms: int,
        expected_settles: str | None,
    ) -> bool:
        keys = self._keys(account_id, key_id, spend_slug)
        seeded = self._seed(
            keys=[keys[2], keys[5]], args=[expected_settles or "", spent_nanousd, ttl_ms]
        )
        return seeded == 1

    def settle(
        self, items: list["HoldSettlement"], publications: DeferredPublications | None = None
    ) -> None:
        """Cache the committed balances and settle every item, in one atomic step."""
        pipeline = self.client.pipeline(transaction=True)
        if publications is not None:
            publications.run(pipeline)
        for item in items:
            reservation = item.reservation
            self._settle(
                keys=self._keys(reservation.account_id, reservation.key_id, item.spend_slug)[:6],
                args=[
                    reservation.reservation_id,
                    item.cost_nanousd,
                    "1" if item.release else "0",
                    SETTLE_COUNT_TTL_MS,
                ],
                client=pipeline,
            )
        pipeline.execute()

    def spend_counted(self, *, account_id: int, key_id: int, spend_slug: str) -> int | None:
        value = self.client.get(self._keys(account_id, key_id, spend_slug)[5])
        return int(value) if value is not None else None

    def held(self, *, account_id: int, key_id: int | None, now_ms: int) -> int:
        keys = self._keys(account_id, key_id or 0, "")
        holds, amounts = (keys[3], keys[4]) if key_id is not None else (keys[0], keys[1])
        live = self.client.zrangebyscore(holds, f"({now_ms}", "+inf")
        if not live:
            return 0
        return sum(int(amount) for amount in self.client.hmget(amounts, live) if amount)

    def clear(self) -> None:
        """Forget every counter and hold; spend counters are rebuilt from usage records."""
        for name in self.client.scan_iter(match=f"{self.prefix}:limits:*", count=1000):
            self.client.delete(name)


class LocalLimits:
    """Limits state in this process, for a single-process deployment without Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # scope ("a<account>" or "k<key>") -> reservation id -> (nanousd, expiry ms)
        self._holds: dict[str, dict[str, tuple[int, int]]] = {}
        # key id -> (period slug, spent nanousd); one period per key is enough.
        self._spend: dict[int, tuple[str, int]] = {}
        # key id -> admitted ms, oldest first
        self._windows: dict[int, list[int]] = {}
        self._settles: dict[int, int] = {}

    def _held(self, scope: str, now_ms: int) -> int:
        holds = self._holds.get(scope, {})
        for reservation_id in [rid for rid, (_, until) in holds.items() if until <= now_ms]:
            del holds[reservation_id]
        return sum(amount for amount, _ in holds.values())

    def hold_replace(
        self, *, reservation: Reservation, amount_nanousd: int, with_key: bool, until_ms: int
    ) -> None:
        scopes = [f"a{reservation.account_id}"] + ([f"k{reservation.key_id}"] if with_key else [])
        with self._lock:
            for scope in scopes:
                self._holds.setdefault(scope, {})[reservation.reservation_id] = (
                    amount_nanousd,
                    until_ms,
                )

    def settle_count(self, *, account_id: int) -> str:
        with self._lock:
            return str(self._settles.get(account_id, 0))

    def admit(self, args: AdmitArgs) -> Outcome:
        now = args.now_ms
        with self._lock:
            # Read under the lock: a settlement commits its charge before it takes the lock
            # to drop its hold, so the balance read here never lacks a charge whose hold
            # is gone.
            balance = args.balance_nanousd
            if balance is None:
                balance = account_balance_cached(account_id=args.account_id)
            if balance <= 0:
                return Outcome(OUT_OF_CREDIT, balance_nanousd=balance)
            window = self._windows.setdefault(args.key_id, [])
            if args.requests_per_minute is not None:
                window[:] = [admitted for admitted in window if admitted > now - REQUEST_WINDOW_MS]
                if len(window) >= args.requests_per_minute:
                    return Outcome(
                        OVER_REQUESTS, retry_after_ms=window[0] + REQUEST_WINDOW_MS - now
                    )
            limit = args.spend_limit_nanousd
            if limit is not None:
                slug, spent = self._spend.get(args.key_id, ("", 0))
                if slug != args.spend_slug:
                    return Outcome(REBUILD)
                key_held = self._held(f"k{args.key_id}", now)
                if spent + key_held >= limit or spent + key_held + args.hold_nanousd > limit:
                    return Outcome(OVER_SPEND, spent_nanousd=spent, key_held_nanousd=key_held)
            account_held = self._held(f"a{args.account_id}", now)
            if account_held >= balance or account_held + args.hold_nanousd > balance:
                return Outcome(
                    OVER_BALANCE, account_held_nanousd=account_held, balance_nanousd=balance
                )
            if args.hold_nanousd > 0:
                entry = (args.hold_nanousd, now + args.hold_ttl_ms)
                self._holds.setdefault(f"a{args.account_id}", {})[args.reservation_id] = entry
                if limit is not None:
                    self._holds.setdefault(f"k{args.key_id}", {})[args.reservation_id] = entry
            if args.requests_per_minute is not None:
                window.append(now)
            return Outcome(ADMITTED)

    def spend_seed(
        self,
        *,
        account_id: int,
        key_id: int,
        spend_slug: str,
        spent_nanousd: int,
        ttl_ms: int,
        expected_settles: str | None,
    ) -> bool:
        with self._lock:
            settles = str(self._settles.get(account_id, 0))
            if expected_settles is not None and settles != expected_settles:
                return False
            if self._spend.get(key_id, ("", 0))[0] != spend_slug:
                self._spend[key_id] = (spend_slug, spent_nanousd)
            return True

    def settle(
        self, items: list["HoldSettlement"], publications: DeferredPublications | None = None
    ) -> None:
        with self._lock:
            if publications is not None:
                publications.run()
            for item in items:
                reservation = item.reservation
                if item.release:
                    for scope in (f"a{reservation.account_id}", f"k{reservation.key_id}"):
                        self._holds.get(scope, {}).pop(reservation.reservation_id, None)
                if item.cost_nanousd:
                    slug, spent = self._spend.get(reservation.key_id, ("", 0))
                    if slug == item.spend_slug:
                        self._spend[reservation.key_id] = (slug, spent + item.cost_nanousd)
                    account_id = reservation.account_id
                    self._settles[account_id] = self._settles.get(account_id, 0) + 1

    def spend_counted(self, *, account_id: int, key_id: int, spend_slug: str) -> int | None:
        with self._lock:
            slug, spent = self._spend.get(key_id, ("", 0))
            return spent if slug == spend_slug else None

    def held(self, *, account_id: int, key_id: int | None, now_ms: int) -> int:
        with self._lock:
            scope = f"k{key_id}" if key_id is not None else f"a{account_id}"
            return self._held(scope, now_ms)

    def clear(self) -> None:
        """Forget every counter and hold, as a restart would."""
        with self._lock:
            self._holds.clear()
            self._spend.clear()
            self._windows.clear()
            self._settles.clear()


_local_store = LocalLimits()
_redis_stores: dict[str, RedisLimits] = {}
_redis_stores_lock = threading.Lock()


async def reservation_hold_cost(
    *, reservation: Reservation, identity: KeyIdentity, cost_nanousd: int, at: datetime
) -> None:
    """Hold a finished request's real cost until its charge is written.

    Charges are written in batches a few milliseconds after the response. Holding the
    known cost in the meantime keeps the next request of a fast client, admitted before
    the charge lands, from spending the same credit or spend limit twice. Settling the
    attempt drops this hold as it drops any other.
    """
    until_ms = epoch_ms(at) + settings.GATEWAY_RESERVATION_TTL_SECONDS * 1000
    hold = {
        "reservation": reservation,
        "amount_nanousd": cost_nanousd,
        "with_key": identity.spend_limit_nanousd is not None,
        "until_ms": until_ms,
    }
    store = limits_store()
    if isinstance(store, RedisLimits):
        await store.hold_replace_async(**hold)
    else:
        store.hold_replace(**hold)


def limits_store() -> RedisLimits | LocalLimits:
    """Return the store of the configured backend: Redis when REDIS_URL is set.

    Limits live in the cache's Redis database, so whatever keeps caches apart (one
    database per deployment or per test worker) keeps limits apart too.
    """
    if not settings.REDIS_URL:
        return _local_store
    url = cache_redis_url() or settings.REDIS_URL
    prefix = settings.CACHES["default"].get("KEY_PREFIX") or "tollbooth"
    with _redis_stores_lock:
        store = _redis_stores.get(url)
        if store is None:
            store = _redis_stores[url] = RedisLimits(url, prefix)
    return store


def _reservation_new(
    *, identity: KeyIdentity, body: dict, prices: list[Price | None], at: datetime
) -> tuple[Reservation, SpendPeriod]:
    """Price the request's worst case on the dearest of its routes."""
    hold = max((worst_case_cost(body=body, price=price) for price in prices), default=0)
    period = spend_period(period=identity.spend_limit_period, at=at)
    reservation = Reservation(
        reservation_id="rsv_" + secrets.token_hex(12),
        account_id=identity.account_id,
        key_id=identity.key_id,
        hold_nanousd=hold,
        spend_limit_period=period.kind,
    )
    return reservation, period


def _admit_args(
    reservation: Reservation,
    *,
    identity: KeyIdentity,
    period: SpendPeriod,
    at: datetime,
    balance: int | None = None,
    generation: int | None = None,
    versions: tuple[tuple[str, int], ...] = (),
) -> AdmitArgs:
    return AdmitArgs(
        reservation_id=reservation.reservation_id,
        account_id=reservation.account_id,
        key_id=reservation.key_id,
        now_ms=epoch_ms(at),
        hold_nanousd=min(reservation.hold_nanousd, EXACT_LIMIT),
        balance_nanousd=balance,
        generation=generation,
        spend_limit_nanousd=identity.spend_limit_nanousd,
        spend_slug=period.slug,
        requests_per_minute=identity.requests_per_minute,
        hold_ttl_ms=settings.GATEWAY_RESERVATION_TTL_SECONDS * 1000,
        versions=versions,
    )


def _limits_unavailable(identity: KeyIdentity, error: Exception) -> GatewayError:
    logger.error("Limits store unreachable for key %s: %s", identity.key_id, type(error).__name__)
    return GatewayError(
        503,
        "The gateway cannot check this key's limits right now; retry shortly.",
        openai_type="api_error",
        code="limits_unavailable",
    )


def _admission_error(
    outcome: Outcome,
    *,
    identity: KeyIdentity,
    reservation: Reservation,
    period: SpendPeriod,
    at: datetime,
) -> GatewayError | None:
    """Return the error for a rejected request, or None when it was admitted."""
    if outcome.status == OUT_OF_CREDIT:
        return GatewayError(
            402,
            f"Out of credit: the balance is USD {format_usd_short(outcome.balance_nanousd)}. "
            f"Buy credits at {settings.PUBLIC_URL}/credits/ or with "
            "POST /api/credits/checkout-session.",
            openai_type="insufficient_quota",
            code="insufficient_quota",
        )
    if outcome.status == OVER_REQUESTS:
        logger.info("Access key %s is over its requests per minute", identity.key_id)
        seconds = ceil_seconds(outcome.retry_after_ms)
        return GatewayError(
            429,
            f"This access key allows {identity.requests_per_minute} "
            f"request{'' if identity.requests_per_minute == 1 else 's'} per minute; "
            f"retry in {seconds} s.",
            openai_type="requests",
            code="rate_limit_exceeded",
            headers={"retry-after": str(seconds)},
        )
    if outcome.status == OVER_SPEND:
        logger.info("Access key %s is over its spend limit", identity.key_id)
        return _spend_limit_error(
            identity, outcome, hold=reservation.hold_nanousd, period=period, at=at
        )
    if outcome.status == OVER_BALANCE:
        logger.info("Account %s has no credit left after reservations", identity.account_id)
        return _balance_error(outcome, hold=reservation.hold_nanousd)
    return None


def reservation_hold(
    *,
    identity: KeyIdentity,
    body: dict,
    prices: list[Price | None],
    at: datetime | None = None,
) -> Reservation:
    """Check the account's credit and the key's limits, and hold the worst-case cost.

    `prices` are those of every route the request may take; the dearest worst case is
    held. Raises GatewayError: 402 when the balance is used up or the credit left after
    other reservations does not cover the request, 429 over the requests per minute or
    the spend limit, 503 when the limits store cannot be reached.
    """
    at = at or timezone.now()
    reservation, period = _reservation_new(identity=identity, body=body, prices=prices, at=at)
    try:
        outcome = _admit(limits_store(), reservation, identity=identity, period=period, at=at)
    except redis.RedisError as error:
        raise _limits_unavailable(identity, error) from error
    rejection = _admission_error(
        outcome, identity=identity, reservation=reservation, period=period, at=at
    )
    if rejection is not None:
        raise rejection
    return reservation


async def reservation_hold_cached(
    *,
    identity: KeyIdentity,
    body: dict,
    prices: list[Price | None],
    versions: tuple[tuple[str, int], ...],
) -> Reservation | None:
    """Run `reservation_hold`'s step in one round trip to Redis, on the event loop.

    `versions` are the tokens the routes were resolved under. Returns None, having held
    nothing, when there is no Redis or the step needs more than the caches have: a
    balance to compute, a spend counter to rebuild, or a token that changed. The caller
    then runs `reservation_hold` in a worker thread.
    """
    store = limits_store()
    if not isinstance(store, RedisLimits):
        return None
    at = timezone.now()
    reservation, period = _reservation_new(identity=identity, body=body, prices=prices, at=at)
    args = _admit_args(reservation, identity=identity, period=period, at=at, versions=versions)
    try:
        outcome = await store.admit_async(args)
    except redis.RedisError as error:
        raise _limits_unavailable(identity, error) from error
    if outcome.status in RETRY_STATUSES:
        return None
    rejection = _admission_error(
        outcome, identity=identity, reservation=reservation, period=period, at=at
    )
    if rejection is not None:
        raise rejection
    return reservation


def _admit(
    store: RedisLimits | LocalLimits,
    reservation: Reservation,
    *,
    identity: KeyIdentity,
    period: SpendPeriod,
    at: datetime,
) -> Outcome:
    """Run the admission step, computing a missing balance or spend counter on the way.

    A balance computed here is passed with the generation it was computed under; when a
    ledger write lands in between, the step is retried with the cached balance (at most
    STALE_RETRIES times, then the computed balance is used unchecked).
    """
    stale = 0
    balance = generation = None
    for _ in range(ADMIT_ROUNDS):
        outcome = store.admit(
            _admit_args(
                reservation,
                identity=identity,
                period=period,
                at=at,
                balance=balance,
                generation=generation if stale < STALE_RETRIES else None,
            )
        )
        if outcome.status == BALANCE_MISS:
            generation = outcome.generation
            balance = balance_cache_fill(account_id=reservation.account_id, generation=generation)
        elif outcome.status == STALE:
            stale += 1
            balance = generation = None
        elif outcome.status == REBUILD:
            # Read before the sum: a settlement in between makes the seed refuse.
            expected = store.settle_count(account_id=reservation.account_id)
            spent = key_spend_recorded(
                account_id=reservation.account_id, key_id=reservation.key_id, period=period
            )
            seeded = store.spend_seed(
                account_id=reservation.account_id,
                key_id=reservation.key_id,
                spend_slug=period.slug,
                spent_nanousd=spent,
                ttl_ms=spend_counter_ttl_ms(period, at=at),
                expected_settles=expected if stale < STALE_RETRIES else None,
            )
            stale += 0 if seeded else 1
        else:
            return outcome
    raise redis.RedisError("the admission step did not settle")


def _spend_limit_error(
    identity: KeyIdentity, outcome: Outcome, *, hold: int, period: SpendPeriod, at: datetime
) -> GatewayError:
    limit = identity.spend_limit_nanousd or 0
    parts = [f"USD {format_usd_short(outcome.spent_nanousd)} spent"]
    if outcome.key_held_nanousd:
        parts.append(
            f"USD {format_usd_short(outcome.key_held_nanousd)} held for requests in flight "
            "or not yet charged"
        )
    message = (
        f"This access key has reached its {PERIOD_NAMES[period.kind]} spend limit of "
        f"USD {format_usd_short(limit)}: {', '.join(parts)}"
    )
    if hold:
        message += f", and this request may cost up to USD {format_usd_short(hold)}"
    headers = {}
    if period.end is None:
        message += ". The limit does not reset."
    else:
        message += f". It resets at {period.end:%Y-%m-%dT%H:%M:%SZ}."
        # Waiting helps for sure only when settled spend alone blocks the request;
        # holds in flight settle within seconds.
        if outcome.spent_nanousd >= limit or outcome.spent_nanousd + hold > limit:
            headers["retry-after"] = str(ceil_seconds(epoch_ms(period.end) - epoch_ms(at)))
    return GatewayError(
        429,
        message,
        openai_type="insufficient_quota",
        code="spend_limit_exceeded",
        headers=headers,
    )


def _balance_error(outcome: Outcome, *, hold: int) -> GatewayError:
    held = outcome.account_held_nanousd
    balance = outcome.balance_nanousd
    message = f"Not enough credit: the balance is USD {format_usd_short(balance)}"
    if held:
        message += (
            f", of which USD {format_usd_short(held)} is held for requests in flight "
            "or not yet charged"
        )
    if hold:
        message += (
            f", and this request may cost up to USD {format_usd_short(hold)} "
            "(its input estimate and max_tokens at the model's prices); lower max_tokens"
        )
    else:
        message += "; retry when they are charged"
    message += (
        f" or buy credits at {settings.PUBLIC_URL}/credits/ or with "
        "POST /api/credits/checkout-session."
    )
    return GatewayError(402, message, openai_type="insufficient_quota", code="insufficient_quota")


@dataclass(frozen=True)
class HoldSettlement:
    """A metered attempt's cost to count against its key, and whether to drop its hold."""

    reservation: Reservation
    cost_nanousd: int
    # The usage record's `created_at`, which decides the spend period.
    at: datetime
    release: bool = True

    @property
    def spend_slug(self) -> str:
        return spend_period(period=self.reservation.spend_limit_period, at=self.at).slug


def reservations_settle(
    items: list[HoldSettlement], publications: DeferredPublications | None = None
) -> None:
    """Count metered attempts' costs against their keys and drop the reservations marked
    `release`.

    Call it after the attempts' usage records are committed: a spend counter rebuilt in
    between then already includes the cost. `publications` are the balances those
    commits cache, run in the same atomic step. A store that cannot be reached is logged
    and skipped: the reservations lapse on their own and a missing counter is rebuilt.
    """
    if not items and (publications is None or not publications.publications):
        return
    try:
        limits_store().settle(items, publications)
    except redis.RedisError as error:
        logger.warning(
            "Settling %s reservations failed, first %s: %s",
            len(items),
            items[0].reservation.reservation_id if items else None,
            type(error).__name__,
        )
        if publications is not None and publications.publications:
            # The balances still have to move on; the reservations lapse on their own.
            try:
                publications.run()
            except redis.RedisError as publish_error:
                logger.warning(
                    "Caching %s committed balances failed: %s",
                    len(publications.publications),
                    type(publish_error).__name__,
                )


def reservation_settle(
    *, reservation: Reservation, cost_nanousd: int, at: datetime, release: bool = True
) -> None:
    """Settle one attempt (see `reservations_settle`)."""
    reservations_settle([HoldSettlement(reservation, cost_nanousd, at, release)])


def reservation_release(*, reservation: Reservation) -> None:
    """Drop a hold without counting anything, for a request that was never metered."""
    reservation_settle(reservation=reservation, cost_nanousd=0, at=timezone.now())


def key_spend(*, identity: KeyIdentity, at: datetime | None = None) -> int:
    """Return the key's settled spend in its current period, rebuilding the counter if needed."""
    at = at or timezone.now()
    period = spend_period(period=identity.spend_limit_period, at=at)
    store = limits_store()
    counted = store.spend_counted(
        account_id=identity.account_id, key_id=identity.key_id, spend_slug=period.slug
    )
    if counted is not None:
        return counted
    return key_spend_recorded(
        account_id=identity.account_id, key_id=identity.key_id, period=period
    )


def held_nanousd(*, account_id: int, key_id: int | None = None, at: datetime | None = None) -> int:
    """Return what live reservations hold on an account, or on one key of it."""
    at = at or timezone.now()
    return limits_store().held(account_id=account_id, key_id=key_id, now_ms=epoch_ms(at))
