"""Access keys, key lookup for the gateway and the REST API, and usage metering."""

import hashlib
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import Account, User
from credits.services.ledger import UsageCharge, usage_debits_apply
from gateway.models import AccessKey, ModelPrice, UsageRecord
from gateway.pricing import Price, TokenUsage, request_cost

logger = logging.getLogger(__name__)

KEY_PREFIX = "tb_"
# Each process also keeps key identities in memory this long, which bounds how late a
# revoke, freeze or limit change takes effect in other processes (the Redis copies are
# evicted at once).
LOCAL_IDENTITY_SECONDS = 1.0
LOCAL_IDENTITY_MAX = 10_000
ACCESS_KEY_CACHE_KEY = "gateway:access-key:{key_hash}"
# USD 1,000,000: far above any key's budget, and exact in the limit checks (below 2**53).
SPEND_LIMIT_MAX_NANOUSD = 10**15
REQUESTS_PER_MINUTE_MAX = 1_000_000


class AccessKeyError(Exception):
    """An access key operation was rejected; the message is safe to show."""


def access_key_hash(raw_key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough: brute force is out of reach.
    return hashlib.sha256(raw_key.encode()).hexdigest()


@dataclass(frozen=True)
class CreatedAccessKey:
    access_key: AccessKey
    raw_key: str


@transaction.atomic
def access_key_create(
    *,
    account: Account,
    name: str,
    scopes: list[str] | None = None,
    created_by: User | None = None,
    expires_at: datetime | None = None,
    allowed_providers: list[str] | None = None,
    allowed_models: list[str] | None = None,
    spend_limit_nanousd: int | None = None,
    spend_limit_period: str = AccessKey.SpendLimitPeriod.NEVER,
    requests_per_minute: int | None = None,
) -> CreatedAccessKey:
    """Create a key; the raw key is returned here once and only its hash is stored."""
    name = name.strip()
    if not name:
        raise AccessKeyError("name is required.")
    if len(name) > 120:
        raise AccessKeyError("name must be at most 120 characters.")
    scopes = list(dict.fromkeys(scopes or [AccessKey.Scope.INFERENCE]))
    unknown = sorted(set(scopes) - set(AccessKey.Scope.values))
    if unknown or not scopes:
        raise AccessKeyError(
            f"scopes must be a non-empty list of {', '.join(AccessKey.Scope.values)}."
        )
    if expires_at is not None and expires_at <= timezone.now():
        raise AccessKeyError("expires_at must be in the future.")
    _limits_validate(
        spend_limit_nanousd=spend_limit_nanousd,
        spend_limit_period=spend_limit_period,
        requests_per_minute=requests_per_minute,
    )

    raw_key = KEY_PREFIX + secrets.token_urlsafe(32)
    access_key = AccessKey.objects.create(
        account=account,
        name=name,
        prefix=raw_key[:11],
        last_four=raw_key[-4:],
        key_hash=access_key_hash(raw_key),
        scopes=scopes,
        created_by=created_by,
        expires_at=expires_at,
        allowed_providers=allowed_providers or [],
        allowed_models=allowed_models or [],
        spend_limit_nanousd=spend_limit_nanousd,
        spend_limit_period=spend_limit_period,
        requests_per_minute=requests_per_minute,
    )
    logger.info("Created access key %s for account %s", access_key.prefix, account.pk)
    return CreatedAccessKey(access_key=access_key, raw_key=raw_key)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _limits_validate(
    *, spend_limit_nanousd: object, spend_limit_period: object, requests_per_minute: object
) -> None:
    if spend_limit_nanousd is not None and not (
        _is_int(spend_limit_nanousd) and 0 < spend_limit_nanousd <= SPEND_LIMIT_MAX_NANOUSD
    ):
        raise AccessKeyError("spend_limit must be more than USD 0 and at most USD 1,000,000.")
    if spend_limit_period not in AccessKey.SpendLimitPeriod.values:
        raise AccessKeyError(
            f"spend_limit_period must be one of {', '.join(AccessKey.SpendLimitPeriod.values)}."
        )
    if spend_limit_nanousd is None and spend_limit_period != AccessKey.SpendLimitPeriod.NEVER:
        raise AccessKeyError("spend_limit_period needs a spend_limit.")
    if requests_per_minute is not None and not (
        _is_int(requests_per_minute) and 0 < requests_per_minute <= REQUESTS_PER_MINUTE_MAX
    ):
        raise AccessKeyError(
            f"requests_per_minute must be a whole number from 1 to {REQUESTS_PER_MINUTE_MAX}."
        )


@transaction.atomic
def access_key_revoke(*, access_key: AccessKey) -> AccessKey:
    """Revoke a key; it stops working within `LOCAL_IDENTITY_SECONDS` of the commit."""
    if access_key.revoked_at is None:
        access_key.revoked_at = timezone.now()
        access_key.save(update_fields=["revoked_at"])
        key_hash = access_key.key_hash

        def evict() -> None:
            cache.delete(ACCESS_KEY_CACHE_KEY.format(key_hash=key_hash))
            _local_identities.pop(key_hash, None)

        transaction.on_commit(evict)
        logger.info(
            "Revoked access key %s of account %s", access_key.prefix, access_key.account_id
        )
    return access_key


def access_keys_cache_evict(*, account_id: int) -> None:
    """Drop the cached identities of the account's keys once the transaction commits.

    Call it after changing what an identity caches about the account (`is_frozen`), so
    the gateway applies the change on the next request, not when the cache entry times out.
    """
    key_hashes = AccessKey.objects.filter(account_id=account_id, revoked_at__isnull=True)
    keys = [
        ACCESS_KEY_CACHE_KEY.format(key_hash=key_hash)
        for key_hash in key_hashes.values_list("key_hash", flat=True)
    ]
    if keys:
        transaction.on_commit(lambda: cache.delete_many(keys))
    # Other processes drop their copies within LOCAL_IDENTITY_SECONDS.
    transaction.on_commit(_local_identities.clear)


@dataclass(frozen=True)
class KeyIdentity:
    """The facts about a key that the gateway checks, cached so that requests skip the database."""

    key_id: int
    account_id: int
    prefix: str
    scopes: list[str]
    expires_at: datetime | None
    allowed_providers: list[str] = field(default_factory=list)
    allowed_models: list[str] = field(default_factory=list)
    account_frozen: bool = False
    # Enforced by gateway/limits.py; None means no limit.
    spend_limit_nanousd: int | None = None
    spend_limit_period: str = AccessKey.SpendLimitPeriod.NEVER
    requests_per_minute: int | None = None

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


_local_identities: dict[str, tuple["KeyIdentity", float]] = {}


def _unexpired(identity: KeyIdentity) -> KeyIdentity | None:
    if identity.expires_at is not None and timezone.now() >= identity.expires_at:
        return None
    return identity


def _identity_local(key_hash: str) -> KeyIdentity | None:
    """Return the identity this process keeps for the key hash, if it has not lapsed."""
    local = _local_identities.get(key_hash)
    if local is None or time.monotonic() >= local[1]:
        return None
    return local[0]


def access_key_identity_local(*, raw_key: str) -> KeyIdentity | None:
    """Return a usable key's identity from this process's memory, or None when it is not
    there (or the key has expired): `access_key_authenticate` then decides."""
    if not raw_key.startswith(KEY_PREFIX):
        return None
    identity = _identity_local(access_key_hash(raw_key))
    return None if identity is None else _unexpired(identity)


def access_key_authenticate(*, raw_key: str) -> KeyIdentity | None:
    """Return the identity of a usable key, or None for a missing, revoked or expired one."""
    if not raw_key.startswith(KEY_PREFIX):
        return None
    key_hash = access_key_hash(raw_key)
    identity = _identity_local(key_hash)
    if identity is not None:
        return _unexpired(identity)
    cache_key = ACCESS_KEY_CACHE_KEY.format(key_hash=key_hash)
    cached = cache.get(cache_key)
    if cached is not None:
        identity = KeyIdentity(**cached)
    else:
        access_key = (
            AccessKey.objects.select_related("account")
            .filter(key_hash=key_hash, revoked_at__isnull=True)
            .first()
        )
        if access_key is None:
            return None
        identity = KeyIdentity(
            key_id=access_key.pk,
            account_id=access_key.account_id,
            prefix=access_key.prefix,
            scopes=list(access_key.scopes),
            expires_at=access_key.expires_at,
            allowed_providers=list(access_key.allowed_providers),
            allowed_models=list(access_key.allowed_models),
            account_frozen=access_key.account.is_frozen,
            spend_limit_nanousd=access_key.spend_limit_nanousd,
            spend_limit_period=access_key.spend_limit_period,
            requests_per_minute=access_key.requests_per_minute,
        )
        cache.set(cache_key, asdict(identity), timeout=settings.GATEWAY_AUTH_CACHE_SECONDS)
    _local_identities[key_hash] = (identity, time.monotonic() + LOCAL_IDENTITY_SECONDS)
    if len(_local_identities) > LOCAL_IDENTITY_MAX:
        _local_identities.clear()
    return _unexpired(identity)


def access_key_touch(*, key_id: int, at: datetime) -> None:
    """Set `last_used_at`, at most once a minute per key to spare the database."""
    throttle_key = f"gateway:touched:{key_id}"
    if cache.add(throttle_key, 1, timeout=60):
        AccessKey.objects.filter(pk=key_id).update(last_used_at=at)


def model_price_current(*, provider: str, model: str, at: datetime) -> ModelPrice | None:
    return (
        ModelPrice.objects.filter(provider=provider, model=model, effective_from__lte=at)
        .order_by("-effective_from")
        .first()
    )


@dataclass(frozen=True)
class Attempt:
    """One upstream attempt as the proxy saw it, ready to be recorded and charged."""

    request_id: str
    account_id: int
    key_id: int | None
    provider: str
    model: str
    surface: str
    key_source: str
    status: str
    http_status: int | None
    streamed: bool
    usage: TokenUsage
    latency_ms: int
    attempt: int = 1
    error_type: str = ""
    price: Price | None = None
    # When the attempt ended; its record and charge are dated then, not when the batch
    # that writes them runs.
    finished_at: datetime | None = None


def usage_record(*, attempt: Attempt, at: datetime | None = None) -> UsageRecord:
    """Record an attempt and charge it, in one transaction, once per request id and attempt.

    Failed attempts are recorded at no cost. Aborted streams are charged for what was
    delivered.
    """
    try:
        return usage_records_batch(attempts=[attempt], at=at)[0]
    except IntegrityError:
        # A concurrent call recorded the same attempt first.
        existing = UsageRecord.objects.filter(
            request_id=attempt.request_id, attempt=attempt.attempt
        ).first()
        if existing is None:
            raise
        return existing


def _usage_record_new(attempt: Attempt, at: datetime) -> UsageRecord:
    charged = attempt.status in (UsageRecord.Status.SUCCEEDED, UsageRecord.Status.ABORTED)
    fee = model_cost = 0
    if charged:
        cost = request_cost(usage=attempt.usage, price=attempt.price)
        fee, model_cost = cost.fee_nanousd, cost.model_cost_nanousd
    return UsageRecord(
        request_id=attempt.request_id,
        attempt=attempt.attempt,
        account_id=attempt.account_id,
        access_key_id=attempt.key_id,
        provider=attempt.provider,
        model=attempt.model,
        surface=attempt.surface,
        key_source=attempt.key_source,
        status=attempt.status,
        http_status=attempt.http_status,
        streamed=attempt.streamed,
        input_tokens=attempt.usage.input_tokens,
        output_tokens=attempt.usage.output_tokens,
        cache_read_tokens=attempt.usage.cache_read_tokens,
        cache_write_tokens=attempt.usage.cache_write_tokens,
        reasoning_tokens=attempt.usage.reasoning_tokens,
        usage_estimated=attempt.usage.estimated,
        fee_nanousd=fee,
        model_cost_nanousd=model_cost,
        cost_nanousd=fee + model_cost,
        latency_ms=attempt.latency_ms,
        error_type=attempt.error_type,
        created_at=at,
    )


@transaction.atomic
def usage_records_batch(
    *, attempts: list[Attempt], at: datetime | None = None
) -> list[UsageRecord]:
    """Record and charge many attempts in one transaction, once per request id and attempt.

    The gateway meters in batches, so this costs a handful of queries per batch plus
    about eight per account charged, not per attempt. Returns the records in the order
    of `attempts`; an attempt recorded before returns its existing record. Records are
    dated at their attempt's `finished_at`, else at `at` (by default now).
    """
    at = at or timezone.now()

    # 1. Skip attempts recorded before (a retried batch).
    request_ids = {attempt.request_id for attempt in attempts}
    existing = {
        (record.request_id, record.attempt): record
        for record in UsageRecord.objects.filter(request_id__in=request_ids)
    }
    new_records: dict[tuple[str, int], UsageRecord] = {}
    for attempt in attempts:
        identity = (attempt.request_id, attempt.attempt)
        if identity not in existing and identity not in new_records:
            new_records[identity] = _usage_record_new(attempt, attempt.finished_at or at)
    UsageRecord.objects.bulk_create(list(new_records.values()))

    # 2. Charge each account once for all its new records.
    charges: dict[int, list[UsageCharge]] = {}
    for record in new_records.values():
        if record.cost_nanousd > 0:
            charges.setdefault(record.account_id, []).append(
                UsageCharge(
                    request_id=record.request_id,
                    amount_nanousd=record.cost_nanousd,
                    at=record.created_at,
                    description=f"{record.provider}:{record.model}",
                )
            )
    for account_id, account_charges in charges.items():
        usage_debits_apply(account_id=account_id, charges=account_charges)

    # 3. Mark the keys used.
    for key_id in {record.access_key_id for record in new_records.values()} - {None}:
        access_key_touch(key_id=key_id, at=at)

    records = {**existing, **new_records}
    return [records[(attempt.request_id, attempt.attempt)] for attempt in attempts]
