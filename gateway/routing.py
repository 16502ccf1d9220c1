"""Admission of a gateway request: key, account state, model routes and balance.

In the common case (`request_admit_cached`) the key, the account's provider
configuration and the price table are in this process's memory, and one Redis script
checks their version tokens, the balance and the key's limits on the event loop. Otherwise
`request_admit` runs in a worker thread, reads what is missing from the shared cache or
the database, and runs the same script.

Models are named `provider:model` or by a bare name. A bare name is looked up in the
price table first, then in the model lists of the account's custom providers.
`openai:` and `anthropic:` models go out on the account's own key when it has stored one
(key source `own`, only the fee is charged), else on built-in inference (key source
`builtin`, priced from the price table). Custom providers (key source `custom`) are
charged only the fee.
"""

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from credits.money import format_usd_short
from gateway.errors import ANTHROPIC, OPENAI, GatewayError, invalid_key
from gateway.limits import Reservation, reservation_hold, reservation_hold_cached
from gateway.models import ModelPrice, UsageRecord
from gateway.pricing import Price
from gateway.providers import (
    CustomProviderConfig,
    ProviderConfig,
    UpstreamAddressError,
    account_provider_config,
    account_provider_config_local,
    cache_version,
    provider_config_version_key,
    upstream_host_check_cached,
    version_token_new,
)
from gateway.services import KeyIdentity, access_key_authenticate, access_key_identity_local

logger = logging.getLogger(__name__)

BUILTIN_PROVIDERS = {ModelPrice.Provider.OPENAI: OPENAI, ModelPrice.Provider.ANTHROPIC: ANTHROPIC}
SURFACE_ENDPOINTS = {OPENAI: "/v1/chat/completions", ANTHROPIC: "/v1/messages"}
# The primary model and its fallbacks together, at most.
MAX_ROUTES = 5
PRICE_CATALOG_VERSION_KEY = "gateway:price-catalog-version"


@dataclass(frozen=True)
class Route:
    """The upstream, key and price of one attempt."""

    provider: str
    model: str
    api_format: str
    base_url: str
    api_key: str
    key_source: str
    price: Price | None


@dataclass(frozen=True)
class Admission:
    identity: KeyIdentity
    # The primary route first, then the fallbacks of a `models` list.
    routes: list[Route]
    # The credit the request reserves until it is metered (gateway/limits.py).
    reservation: Reservation | None = None

    @property
    def route(self) -> Route:
        return self.routes[0]


# The price table, cached in this process


@dataclass(frozen=True)
class PricePeriod:
    effective_from: datetime
    price: Price


@dataclass(frozen=True)
class PriceCatalog:
    """The price table: each (provider, model) with its prices, oldest first."""

    periods: dict[tuple[str, str], tuple[PricePeriod, ...]]
    # Bare model name -> the providers that price it.
    providers_by_model: dict[str, tuple[str, ...]]

    def current(self, *, provider: str, model: str, at: datetime) -> PricePeriod | None:
        """Return the price in force at `at`, or None before the first one."""
        current = None
        for period in self.periods.get((provider, model), ()):
            if period.effective_from > at:
                break
            current = period
        return current

    def providers_of(self, *, model: str, at: datetime) -> list[str]:
        """Return the providers with a price for the bare name `model` at `at`."""
        return [
            provider
            for provider in self.providers_by_model.get(model, ())
            if self.current(provider=provider, model=model, at=at) is not None
        ]

    def in_force(self, *, at: datetime) -> list[tuple[str, str, PricePeriod]]:
        """Return (provider, model, price in force) of every model priced at `at`, sorted."""
        prices = []
        for provider, model in sorted(self.periods):
            period = self.current(provider=provider, model=model, at=at)
            if period is not None:
                prices.append((provider, model, period))
        return prices

    def listed(self, *, at: datetime) -> list[tuple[str, str, datetime]]:
        """Return (provider, model, first effective_from) of every model priced at `at`."""
        return [
            (provider, model, periods[0].effective_from)
            for (provider, model), periods in sorted(self.periods.items())
            if periods[0].effective_from <= at
        ]


def price_catalog_load() -> PriceCatalog:
    """Read the whole price table, which has a few rows per model."""
    periods: dict[tuple[str, str], list[PricePeriod]] = defaultdict(list)
    for row in ModelPrice.objects.order_by("provider", "model", "effective_from"):
        periods[(row.provider, row.model)].append(
            PricePeriod(
                effective_from=row.effective_from,
                price=Price(
                    input=row.input_nanousd_per_mtok,
                    output=row.output_nanousd_per_mtok,
                    cache_read=row.cache_read_nanousd_per_mtok,
                    cache_write=row.cache_write_nanousd_per_mtok,
                ),
            )
        )
    providers_by_model: dict[str, list[str]] = defaultdict(list)
    for provider, model in periods:
        providers_by_model[model].append(provider)
    return PriceCatalog(
        periods={key: tuple(value) for key, value in periods.items()},
        providers_by_model={key: tuple(value) for key, value in providers_by_model.items()},
    )


# "catalog" -> (version token, monotonic expiry, catalog); this process only.
_catalog: dict[str, tuple[int, float, PriceCatalog]] = {}


def price_catalog(*, version: int | None = None) -> PriceCatalog:
    """Return the price table from this process's memory while its version token is current.

    Prices with a later `effective_from` are part of the cached table, so a scheduled
    price takes effect on time without a reload.
    """
    version = cache_version(PRICE_CATALOG_VERSION_KEY, version)
    now = time.monotonic()
    entry = _catalog.get("catalog")
    if entry is not None and entry[0] == version and entry[1] > now:
        return entry[2]
    catalog = price_catalog_load()
    _catalog["catalog"] = (version, now + settings.GATEWAY_AUTH_CACHE_SECONDS, catalog)
    return catalog


def price_catalog_local() -> tuple[int, PriceCatalog] | None:
    """Return the price table in this process's memory with its version token, if fresh."""
    entry = _catalog.get("catalog")
    if entry is None or entry[1] <= time.monotonic():
        return None
    return entry[0], entry[2]


def price_list(*, at: datetime) -> dict:
    """Return the processing fee and the built-in models' prices in force at `at`."""
    return {
        "fee_usd_per_mtok": format_usd_short(settings.GATEWAY_FEE_NANOUSD_PER_MTOK),
        "models": [
            {
                "id": f"{provider}:{model}",
                "provider": provider,
                "model": model,
                "input_usd_per_mtok": format_usd_short(period.price.input),
                "output_usd_per_mtok": format_usd_short(period.price.output),
                "cache_read_usd_per_mtok": format_usd_short(period.price.cache_read),
                "cache_write_usd_per_mtok": format_usd_short(period.price.cache_write),
                "effective_from": period.effective_from,
            }
            for provider, model, period in price_catalog().in_force(at=at)
        ],
    }


def price_catalog_evict_on_commit() -> None:
    """Make every process reload the price table once the current transaction commits."""

    def evict() -> None:
        _catalog.pop("catalog", None)
        cache.set(PRICE_CATALOG_VERSION_KEY, version_token_new(), timeout=None)

    transaction.on_commit(evict)


def _snapshot(account_id: int) -> tuple[ProviderConfig, PriceCatalog]:
    """Return the account's provider configuration and the price table, one cache round trip."""
    config_key = provider_config_version_key(account_id)
    versions = cache.get_many([config_key, PRICE_CATALOG_VERSION_KEY])
    config = account_provider_config(account_id=account_id, version=versions.get(config_key))
    catalog = price_catalog(version=versions.get(PRICE_CATALOG_VERSION_KEY))
    return config, catalog


# Route resolution


def route_allowed(identity: KeyIdentity, *, provider: str, model: str) -> bool:
    """Return whether the key's allowlists let it call `provider:model`.

    `allowed_models` entries match as `provider:model` or as the bare model name.
    """
    if identity.allowed_providers and provider not in identity.allowed_providers:
        return False
    if identity.allowed_models and not (
        f"{provider}:{model}" in identity.allowed_models or model in identity.allowed_models
    ):
        return False
    return True


def _model_not_found(model: str, *, param: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model}` does not exist. Use `provider:model`, such as "
        "`openai:gpt-4o-mini`; GET /v1/models lists the models this key may call.",
        code="model_not_found",
        param=param,
    )


def _model_ambiguous(model: str, providers: list[str], *, param: str) -> GatewayError:
    return GatewayError(
        400,
        f"The model `{model}` is offered by several providers ({', '.join(providers)}); "
        f"name one, such as `{providers[0]}:{model}`.",
        code="model_ambiguous",
        param=param,
    )


def _key_unreadable(provider: str) -> GatewayError:
    # The operator changed GATEWAY_ENCRYPTION_KEY without keeping the old key.
    return GatewayError(
        500,
        f"The stored key for the provider `{provider}` cannot be read; set it again on the "
        "Providers page of the dashboard or through /api/providers.",
        openai_type="api_error",
        code="provider_key_unreadable",
    )


def _provider_and_name(
    model: str, *, config: ProviderConfig, catalog: PriceCatalog, at: datetime, param: str
) -> tuple[str, str]:
    """Split `provider:model`, or find the provider of a bare name; raise GatewayError."""
    prefix, separator, name = model.partition(":")
    if separator and (prefix in BUILTIN_PROVIDERS or prefix in config.custom):
        if not name:
            raise _model_not_found(model, param=param)
        return prefix, name
    # A bare name, which may itself contain a colon (`llama3:8b`).
    builtin = catalog.providers_of(model=model, at=at)
    if len(builtin) > 1:
        raise _model_ambiguous(model, builtin, param=param)
    if builtin:
        return builtin[0], model
    custom = [provider.name for provider in config.custom_serving(model)]
    if len(custom) > 1:
        raise _model_ambiguous(model, custom, param=param)
    if custom:
        return custom[0], model
    raise _model_not_found(model, param=param)


def _builtin_route(
    provider: str, model: str, *, config: ProviderConfig, catalog: PriceCatalog, at: datetime
) -> Route | None:
    """Route to a built-in provider on the account's own key, else on the operator's key."""
    if provider == ModelPrice.Provider.OPENAI:
        base_url, operator_key = settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY
    else:
        base_url, operator_key = settings.ANTHROPIC_BASE_URL, settings.ANTHROPIC_API_KEY
    if provider in config.own_keys:
        own_key = config.own_keys[provider]
        if own_key is None:
            raise _key_unreadable(provider)
        # The account pays the provider itself, so any model name goes through unpriced.
        return Route(
            provider=provider,
            model=model,
            api_format=BUILTIN_PROVIDERS[provider],
            base_url=base_url,
            api_key=own_key,
            key_source=UsageRecord.KeySource.OWN,
            price=None,
        )
    period = catalog.current(provider=provider, model=model, at=at)
    if period is None:
        return None
    return Route(
        provider=provider,
        model=model,
        api_format=BUILTIN_PROVIDERS[provider],
        base_url=base_url,
        api_key=operator_key,
        key_source=UsageRecord.KeySource.BUILTIN,
        price=period.price,
    )


def _custom_route(provider: CustomProviderConfig, model: str) -> Route:
    if provider.api_key is None:
        raise _key_unreadable(provider.name)
    return Route(
        provider=provider.name,
        model=model,
        api_format=provider.api_format,
        base_url=provider.base_url,
        api_key=provider.api_key,
        key_source=UsageRecord.KeySource.CUSTOM,
        price=None,
    )


def route_resolve(
    *,
    model: object,
    surface: str,
    identity: KeyIdentity,
    config: ProviderConfig,
    catalog: PriceCatalog,
    at: datetime,
    param: str = "model",
) -> Route:
    """Resolve one model name to a route the key may call on this surface; raise GatewayError."""
    if not isinstance(model, str) or not model.strip():
        raise GatewayError(400, f"`{param}` is required and must be a string.", param=param)
    provider, name = _provider_and_name(model, config=config, catalog=catalog, at=at, param=param)
    if provider in BUILTIN_PROVIDERS:
        route = _builtin_route(provider, name, config=config, catalog=catalog, at=at)
        if route is None:
            raise GatewayError(
                404,
                f"The model `{provider}:{name}` does not exist or has no price. "
                "GET /v1/models lists the models this key may call.",
                code="model_not_found",
                param=param,
            )
    else:
        route = _custom_route(config.custom[provider], name)
    if not route_allowed(identity, provider=route.provider, model=route.model):
        raise GatewayError(
            403,
            f"This access key may not call the model `{route.provider}:{route.model}`. "
            "GET /v1/models lists the models it may call.",
            openai_type="permission_error",
            code="model_not_allowed",
            param=param,
        )
    if route.api_format != surface:
        raise GatewayError(
            400,
            f"The model `{model}` speaks the {route.api_format} format; "
            f"call {SURFACE_ENDPOINTS[route.api_format]}.",
            code="model_format_mismatch",
            param=param,
        )
    return route


def _requested_models(body: dict) -> list[object]:
    """Return the primary model and the fallbacks of `models`, in order; raise GatewayError."""
    fallbacks = body.get("models")
    if fallbacks is None:
        fallbacks = []
    if not isinstance(fallbacks, list) or not all(
        isinstance(model, str) and model.strip() for model in fallbacks
    ):
        raise GatewayError(400, "`models` must be a list of model names.", param="models")
    primary = body.get("model")
    if primary is None and fallbacks:
        primary, fallbacks = fallbacks[0], fallbacks[1:]
    requested = [primary, *fallbacks]
    if len(requested) > MAX_ROUTES:
        raise GatewayError(
            400,
            f"A request may name at most {MAX_ROUTES} models in `model` and `models` together.",
            param="models",
        )
    return requested


def _reachable(routes: list[Route], *, account_id: int) -> list[Route]:
    """Drop custom routes whose host resolves to a non-public address now; raise if none is left.

    Saving a provider checked its host already; DNS answers can change since.
    """
    reachable: list[Route] = []
    first_error: UpstreamAddressError | None = None
    for route in routes:
        if route.key_source == UsageRecord.KeySource.CUSTOM:
            try:
                upstream_host_check_cached(urlsplit(route.base_url).hostname or "")
            except UpstreamAddressError as error:
                logger.warning(
                    "Skipped custom provider %s of account %s: non-public upstream address",
                    route.provider,
                    account_id,
                )
                first_error = first_error or error
                continue
        reachable.append(route)
    if not reachable and first_error is not None:
        raise GatewayError(
            502,
            f"The custom provider `{routes[0].provider}` was not called: {first_error}",
            openai_type="api_error",
            code="upstream_address_not_allowed",
        )
    return reachable


def routes_resolve(*, identity: KeyIdentity, body: dict, surface: str) -> list[Route]:
    """Resolve `model` and the fallback chain of `models` to routes, primary first.

    Every model must exist, be allowed for the key and speak the surface's format.
    A model that resolves to a route already in the chain is skipped.
    """
    requested = _requested_models(body)
    config, catalog = _snapshot(identity.account_id)
    routes = _routes(
        identity=identity, requested=requested, surface=surface, config=config, catalog=catalog
    )
    return _reachable(routes, account_id=identity.account_id)


def _routes(
    *,
    identity: KeyIdentity,
    requested: list[object],
    surface: str,
    config: ProviderConfig,
    catalog: PriceCatalog,
) -> list[Route]:
    """Resolve the requested models, skipping any that repeats a route already chosen."""
    at = timezone.now()
    routes: list[Route] = []
    seen: set[tuple[str, str]] = set()
    for index, model in enumerate(requested):
        route = route_resolve(
            model=model,
            surface=surface,
            identity=identity,
            config=config,
            catalog=catalog,
            at=at,
            param="model" if index == 0 else "models",
        )
        if (route.provider, route.model) not in seen:
            seen.add((route.provider, route.model))
            routes.append(route)
    return routes


def _account_frozen() -> GatewayError:
    return GatewayError(
        403,
        "This account is frozen; contact support.",
        openai_type="permission_error",
        code="account_frozen",
    )


def _identity_check(identity: KeyIdentity) -> None:
    """Refuse a key without the `inference` scope or of a frozen account."""
    if not identity.has_scope("inference"):
        raise GatewayError(
            403,
            "This access key lacks the `inference` scope needed to call the gateway.",
            openai_type="permission_error",
            code="insufficient_scope",
        )
    if identity.account_frozen:
        raise _account_frozen()


def request_admit(*, raw_key: str, body: dict, surface: str) -> Admission:
    """Check the key, the account and the balance, and pick the routes; raise GatewayError."""
    identity = access_key_authenticate(raw_key=raw_key)
    if identity is None:
        raise invalid_key()
    _identity_check(identity)
    routes = routes_resolve(identity=identity, body=body, surface=surface)
    # The balance, the key's limits, and the credit left after requests in flight hold
    # theirs.
    reservation = reservation_hold(
        identity=identity, body=body, prices=[route.price for route in routes]
    )
    return Admission(identity=identity, routes=routes, reservation=reservation)


async def request_admit_cached(*, raw_key: str, body: dict, surface: str) -> Admission | None:
    """Admit a request from this process's memory and one round trip to Redis.

    The key's identity, the account's provider configuration and the price table must be
    in this process's memory. The admission step checks that the configuration and
    prices have not changed since, in the same atomic step as the balance and limits.
    Returns None, having held nothing, whenever it cannot decide alone: something is
    missing from memory, a route goes to a custom provider (its host is checked in DNS),
    resolution raised an error, or a token changed. `request_admit` then decides in a
    worker thread.
    """
    identity = access_key_identity_local(raw_key=raw_key)
    if identity is None or not identity.has_scope("inference") or identity.account_frozen:
        return None
    config_entry = account_provider_config_local(account_id=identity.account_id)
    catalog_entry = price_catalog_local()
    if config_entry is None or catalog_entry is None:
        return None
    (config_version, config), (catalog_version, catalog) = config_entry, catalog_entry
    try:
        routes = _routes(
            identity=identity,
            requested=_requested_models(body),
            surface=surface,
            config=config,
            catalog=catalog,
        )
    except GatewayError:
        # Decided again from fresh tokens: the error may come from a stale configuration.
        return None
    if any(route.key_source == UsageRecord.KeySource.CUSTOM for route in routes):
        return None
    reservation = await reservation_hold_cached(
        identity=identity,
        body=body,
        prices=[route.price for route in routes],
        versions=(
            (provider_config_version_key(identity.account_id), config_version),
            (PRICE_CATALOG_VERSION_KEY, catalog_version),
        ),
    )
    if reservation is None:
        return None
    return Admission(identity=identity, routes=routes, reservation=reservation)


def _timestamp_fields(at: datetime) -> dict:
    at = at.replace(microsecond=0)
    return {
        "created": int(at.timestamp()),
        "created_at": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    }


def models_for_key(*, raw_key: str, api_format: str | None = None) -> list[dict]:
    """List the models the key may call: priced built-in ones, then custom providers' ones.

    With `api_format`, only models served in that format (the ones its endpoint accepts).
    """
    identity = access_key_authenticate(raw_key=raw_key)
    if identity is None:
        raise invalid_key()
    if identity.account_frozen:
        raise _account_frozen()
    config, catalog = _snapshot(identity.account_id)
    models: list[dict] = []
    for provider, model, since in catalog.listed(at=timezone.now()):
        if api_format is not None and BUILTIN_PROVIDERS.get(provider) != api_format:
            continue
        if route_allowed(identity, provider=provider, model=model):
            models.append(
                {"id": f"{provider}:{model}", "owned_by": provider, **_timestamp_fields(since)}
            )
    for custom in config.custom.values():
        if api_format is not None and custom.api_format != api_format:
            continue
        for model in custom.model_names:
            if route_allowed(identity, provider=custom.name, model=model):
                models.append(
                    {
                        "id": f"{custom.name}:{model}",
                        "owned_by": custom.name,
                        **_timestamp_fields(custom.created_at),
                    }
                )
    return models
