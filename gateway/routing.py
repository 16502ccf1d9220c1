"""Admission of a gateway request: key, account state, model route and balance.

Everything here is synchronous and runs in one worker thread per request, so a request
costs one thread hop before it is forwarded.
"""

from dataclasses import dataclass

from django.conf import settings
from django.utils import timezone

from credits.money import format_usd_short
from credits.services import account_balance_cached
from gateway.errors import ANTHROPIC, OPENAI, GatewayError, invalid_key
from gateway.models import ModelPrice, UsageRecord
from gateway.pricing import Price
from gateway.services import KeyIdentity, access_key_authenticate, model_price_current

BUILTIN_PROVIDERS = {ModelPrice.Provider.OPENAI: OPENAI, ModelPrice.Provider.ANTHROPIC: ANTHROPIC}


@dataclass(frozen=True)
class Route:
    """Where one attempt goes and how it is priced."""

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

    @property
    def route(self) -> Route:
        return self.routes[0]


def _builtin_route(provider: str, model: str) -> Route:
    at = timezone.now()
    price = model_price_current(provider=provider, model=model, at=at)
    if price is None:
        raise GatewayError(
            404,
            f"The model `{provider}:{model}` does not exist or has no price. "
            "GET /v1/models lists the models this key may call.",
            code="model_not_found",
            param="model",
        )
    if provider == ModelPrice.Provider.OPENAI:
        base_url, api_key = settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY
    else:
        base_url, api_key = settings.ANTHROPIC_BASE_URL, settings.ANTHROPIC_API_KEY
    return Route(
        provider=provider,
        model=model,
        api_format=BUILTIN_PROVIDERS[provider],
        base_url=base_url,
        api_key=api_key,
        key_source=UsageRecord.KeySource.BUILTIN,
        price=Price(
            input=price.input_nanousd_per_mtok,
            output=price.output_nanousd_per_mtok,
            cache_read=price.cache_read_nanousd_per_mtok,
            cache_write=price.cache_write_nanousd_per_mtok,
        ),
    )


def _catalog_provider(model: str) -> str | None:
    providers = list(
        ModelPrice.objects.filter(model=model).values_list("provider", flat=True).distinct()
    )
    return providers[0] if len(providers) == 1 else None


def route_resolve(*, model: object, surface: str) -> Route:
    """Resolve `provider:model` or a bare catalog name to a route."""
    if not isinstance(model, str) or not model.strip():
        raise GatewayError(400, "`model` is required and must be a string.", param="model")
    if ":" in model:
        provider, _, name = model.partition(":")
    else:
        provider, name = _catalog_provider(model) or "", model
    if provider not in BUILTIN_PROVIDERS or not name:
        raise GatewayError(
            404,
            f"The model `{model}` does not exist. Use `provider:model`, such as "
            "`openai:gpt-4o-mini`; GET /v1/models lists the models this key may call.",
            code="model_not_found",
            param="model",
        )
    route = _builtin_route(provider, name)
    if route.api_format != surface:
        endpoint = "/v1/messages" if route.api_format == ANTHROPIC else "/v1/chat/completions"
        raise GatewayError(
            400,
            f"The model `{model}` speaks the {route.api_format} format; call {endpoint}.",
            code="model_format_mismatch",
            param="model",
        )
    return route


def request_admit(*, raw_key: str, body: dict, surface: str) -> Admission:
    """Check the key, the account and the balance, and pick the route; raise GatewayError."""
    identity = access_key_authenticate(raw_key=raw_key)
    if identity is None:
        raise invalid_key()
    if not identity.has_scope("inference"):
        raise GatewayError(
            403,
            "This access key lacks the `inference` scope needed to call the gateway.",
            openai_type="permission_error",
            code="insufficient_scope",
        )
    if identity.account_frozen:
        raise GatewayError(
            403,
            "This account is frozen; contact support.",
            openai_type="permission_error",
            code="account_frozen",
        )
    routes = [route_resolve(model=body.get("model"), surface=surface)]
    fallbacks = body.get("models") or []
    if not isinstance(fallbacks, list):
        raise GatewayError(400, "`models` must be a list of model names.", param="models")
    routes += [route_resolve(model=model, surface=surface) for model in fallbacks]
    balance = account_balance_cached(account_id=identity.account_id)
    if balance <= 0:
        raise GatewayError(
            402,
            f"Out of credit: the balance is USD {format_usd_short(balance)}. "
            f"Buy credits at {settings.PUBLIC_URL}/credits/ or with "
            "POST /api/credits/checkout-session.",
            openai_type="insufficient_quota",
            code="insufficient_quota",
        )
    return Admission(identity=identity, routes=routes)


def models_for_key(*, raw_key: str) -> list[dict]:
    """List the `provider:model` names the key may call, with their price start dates."""
    identity = access_key_authenticate(raw_key=raw_key)
    if identity is None:
        raise invalid_key()
    at = timezone.now()
    seen: dict[str, dict] = {}
    for price in ModelPrice.objects.filter(effective_from__lte=at).order_by(
        "provider", "model", "effective_from"
    ):
        model_id = f"{price.provider}:{price.model}"
        if identity.allowed_providers and price.provider not in identity.allowed_providers:
            continue
        if identity.allowed_models and not (
            model_id in identity.allowed_models or price.model in identity.allowed_models
        ):
            continue
        seen.setdefault(
            model_id,
            {
                "id": model_id,
                "owned_by": price.provider,
                "created": int(price.effective_from.timestamp()),
                "created_at": price.effective_from.isoformat().replace("+00:00", "Z"),
            },
        )
    return list(seen.values())
