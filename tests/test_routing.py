"""Route resolution: key sources, custom providers, allowlists, fallback chains, model lists.

Prices from the seeded table, in nano-dollars per token: gpt-4o-mini input 150, output
600; claude-haiku-4-5 input 1000, output 5000. The fee is 50 per token.
"""

import asyncio
import socket
from datetime import datetime, timedelta

import pytest
from django.core.cache import cache
from django.utils import timezone

from credits.models import LedgerTransaction
from credits.services import BALANCE_GENERATION_KEY, account_balance, credit_grant
from gateway.errors import ANTHROPIC, OPENAI, GatewayError
from gateway.limits import held_nanousd
from gateway.models import ModelPrice, UsageRecord
from gateway.pricing import Price, TokenUsage
from gateway.providers import (
    custom_provider_create,
    provider_config_version_key,
    provider_credential_set,
    version_token_new,
)
from gateway.routing import (
    PRICE_CATALOG_VERSION_KEY,
    Admission,
    Route,
    models_for_key,
    price_catalog_evict_on_commit,
    request_admit,
    request_admit_cached,
    routes_resolve,
)
from gateway.services import (
    Attempt,
    access_key_authenticate,
    access_key_create,
    usage_record,
    usage_records_batch,
)

OWN_OPENAI_KEY = "sk-own-openai-0000000000001111"
GROQ_KEY = "groq-key-000000002222"
PUBLIC_HOST = "llm.example.com"
# A public address that the fixture returns for PUBLIC_HOST; nothing connects to it.
PUBLIC_ADDRESS = "1.2.3.4"
START_BALANCE = 10_000_000_000
GPT_4O_MINI = Price(input=150_000_000, output=600_000_000, cache_read=75_000_000, cache_write=0)
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def public_dns(monkeypatch):
    """Resolve PUBLIC_HOST to a public address without DNS; other hosts resolve as usual."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == PUBLIC_HOST:
            return [
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (PUBLIC_ADDRESS, 0))
            ]
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def committed(django_capture_on_commit_callbacks):
    """Call a service and run its on-commit callbacks (cache eviction) at once."""

    def call(service, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return service(**kwargs)

    return call


@pytest.fixture
def groq(funded, public_dns):
    """An OpenAI-format custom provider with a key and two models."""
    return custom_provider_create(
        account=funded.account,
        name="groq",
        base_url=f"https://{PUBLIC_HOST}/openai/v1",
        api_format="openai",
        api_key=GROQ_KEY,
        model_names=["llama-3.3-70b", "llama3:8b"],
    )


def admit(tenant, body: dict, surface: str = OPENAI, raw_key: str | None = None) -> Admission:
    return request_admit(raw_key=raw_key or tenant.key.raw_key, body=body, surface=surface)


def rejected(tenant, body: dict, surface: str = OPENAI, raw_key: str | None = None):
    with pytest.raises(GatewayError) as caught:
        admit(tenant, body, surface, raw_key)
    return caught.value


def limited_key(tenant, **allowlists) -> str:
    return access_key_create(account=tenant.account, name="limited", **allowlists).raw_key


def succeeded_attempt(
    route: Route,
    tenant,
    *,
    request_id: str,
    usage: TokenUsage,
    finished_at: datetime | None = None,
) -> Attempt:
    """Build a succeeded attempt on the route with the tenant's key."""
    return Attempt(
        request_id=request_id,
        account_id=tenant.account.pk,
        key_id=tenant.key.access_key.pk,
        provider=route.provider,
        model=route.model,
        surface=route.api_format,
        key_source=route.key_source,
        status=UsageRecord.Status.SUCCEEDED,
        http_status=200,
        streamed=False,
        usage=usage,
        latency_ms=5,
        price=route.price,
        finished_at=finished_at,
    )


def charge(route: Route, tenant, *, request_id: str) -> UsageRecord:
    """Record a succeeded attempt of 1,000 input and 500 output tokens on the route."""
    usage = TokenUsage(input_tokens=1000, output_tokens=500)
    return usage_record(
        attempt=succeeded_attempt(route, tenant, request_id=request_id, usage=usage)
    )


# Key sources


def test_builtin_route_uses_operator_key_and_price(funded, model_prices, settings):
    settings.OPENAI_BASE_URL = "http://127.0.0.1:9/v1"
    settings.OPENAI_API_KEY = "operator-openai-key"

    admission = admit(funded, CHAT)

    assert admission.routes == [
        Route(
            provider="openai",
            model="gpt-4o-mini",
            api_format=OPENAI,
            base_url="http://127.0.0.1:9/v1",
            api_key="operator-openai-key",
            key_source="builtin",
            price=GPT_4O_MINI,
        )
    ]
    assert admission.route is admission.routes[0]


def test_own_key_beats_builtin(funded, model_prices, settings, committed):
    settings.OPENAI_BASE_URL = "http://127.0.0.1:9/v1"
    settings.OPENAI_API_KEY = "operator-openai-key"
    assert admit(funded, CHAT).route.key_source == "builtin"
    committed(
        provider_credential_set,
        account=funded.account,
        provider="openai",
        api_key=OWN_OPENAI_KEY,
    )

    for model in ("gpt-4o-mini", "openai:gpt-4o-mini"):
        assert admit(funded, {**CHAT, "model": model}).routes == [
            Route(
                provider="openai",
                model="gpt-4o-mini",
                api_format=OPENAI,
                base_url="http://127.0.0.1:9/v1",
                api_key=OWN_OPENAI_KEY,
                key_source="own",
                price=None,
            )
        ]
    # The other built-in provider still uses the operator's key and the price table.
    anthropic = admit(funded, {"model": "claude-haiku-4-5"}, ANTHROPIC).route
    assert (anthropic.key_source, anthropic.price) == (
        "builtin",
        Price(
            input=1_000_000_000,
            output=5_000_000_000,
            cache_read=100_000_000,
            cache_write=1_250_000_000,
        ),
    )


def test_own_key_is_charged_only_the_fee(funded, model_prices):
    provider_credential_set(account=funded.account, provider="openai", api_key=OWN_OPENAI_KEY)
    own_route = admit(funded, CHAT).route

    record = charge(own_route, funded, request_id="req_own")

    # 1,500 tokens at a fee of 50 each; the provider bills the account for the model.
    assert (record.fee_nanousd, record.model_cost_nanousd, record.cost_nanousd) == (
        75_000,
        0,
        75_000,
    )
    assert record.key_source == "own"
    assert account_balance(account_id=funded.account.pk).balance_nanousd == (
        START_BALANCE - 75_000
    )


def test_builtin_is_charged_the_fee_and_the_model(funded, model_prices):
    record = charge(admit(funded, CHAT).route, funded, request_id="req_builtin")

    # 1,000 x 150 + 500 x 600 = 450,000 for the model, plus the 75,000 fee.
    assert (record.fee_nanousd, record.model_cost_nanousd, record.cost_nanousd) == (
        75_000,
        450_000,
        525_000,
    )
    assert account_balance(account_id=funded.account.pk).balance_nanousd == (
        START_BALANCE - 525_000
    )


def test_own_key_routes_unpriced_models(funded, model_prices):
    provider_credential_set(account=funded.account, provider="openai", api_key=OWN_OPENAI_KEY)
    route = admit(funded, {**CHAT, "model": "openai:gpt-new-preview"}).route
    assert (route.model, route.key_source, route.price) == ("gpt-new-preview", "own", None)


def test_unreadable_own_key_is_an_error_not_builtin(funded, model_prices, settings):
    provider_credential_set(account=funded.account, provider="openai", api_key=OWN_OPENAI_KEY)
    # The operator replaced the encryption key without keeping the old one.
    settings.GATEWAY_ENCRYPTION_KEY = "A" * 43 + "="

    error = rejected(funded, CHAT)

    assert (error.status, error.code) == (500, "provider_key_unreadable")
    assert OWN_OPENAI_KEY not in error.message


# Custom providers


def test_custom_provider_explicit_and_bare_names(groq, funded, model_prices):
    expected = Route(
        provider="groq",
        model="llama-3.3-70b",
        api_format=OPENAI,
        base_url=f"https://{PUBLIC_HOST}/openai/v1",
        api_key=GROQ_KEY,
        key_source="custom",
        price=None,
    )
    assert admit(funded, {**CHAT, "model": "groq:llama-3.3-70b"}).routes == [expected]
    assert admit(funded, {**CHAT, "model": "llama-3.3-70b"}).routes == [expected]
    # A bare name may contain a colon; an explicit prefix may name an unlisted model.
    assert admit(funded, {**CHAT, "model": "llama3:8b"}).route.model == "llama3:8b"
    assert admit(funded, {**CHAT, "model": "groq:llama3:8b"}).route.model == "llama3:8b"
    assert admit(funded, {**CHAT, "model": "groq:unlisted"}).route.model == "unlisted"


def test_custom_provider_is_charged_only_the_fee(groq, funded, model_prices):
    record = charge(
        admit(funded, {**CHAT, "model": "groq:llama-3.3-70b"}).route,
        funded,
        request_id="req_custom",
    )
    assert (record.fee_nanousd, record.model_cost_nanousd, record.key_source) == (
        75_000,
        0,
        "custom",
    )


def test_bare_name_prefers_price_table(funded, model_prices, public_dns):
    custom_provider_create(
        account=funded.account,
        name="mirror",
        base_url=f"https://{PUBLIC_HOST}/v1",
        api_format="openai",
        model_names=["gpt-4o-mini"],
    )
    assert admit(funded, CHAT).route.key_source == "builtin"
    assert admit(funded, {**CHAT, "model": "mirror:gpt-4o-mini"}).route.key_source == "custom"


def test_bare_name_ambiguous_between_custom_providers(groq, funded, model_prices):
    custom_provider_create(
        account=funded.account,
        name="together",
        base_url=f"https://{PUBLIC_HOST}/together/v1",
        api_format="openai",
        model_names=["llama-3.3-70b"],
    )

    error = rejected(funded, {**CHAT, "model": "llama-3.3-70b"})

    assert (error.status, error.code, error.param) == (400, "model_ambiguous", "model")
    assert error.message == (
        "The model `llama-3.3-70b` is offered by several providers (groq, together); "
        "name one, such as `groq:llama-3.3-70b`."
    )


def test_custom_providers_of_other_accounts_do_not_route(groq, outsider, model_prices):
    credit_grant(account=outsider.account, amount_nanousd=1_000_000, reason="test")
    for model in ("groq:llama-3.3-70b", "llama-3.3-70b"):
        error = rejected(outsider, {**CHAT, "model": model})
        assert (error.status, error.code) == (404, "model_not_found")


def test_custom_anthropic_format_provider_needs_the_messages_surface(
    funded, model_prices, public_dns
):
    custom_provider_create(
        account=funded.account,
        name="claude-proxy",
        base_url=f"https://{PUBLIC_HOST}",
        api_format="anthropic",
        model_names=["sonnet"],
    )
    assert admit(funded, {"model": "sonnet"}, ANTHROPIC).route.api_format == ANTHROPIC

    error = rejected(funded, {**CHAT, "model": "claude-proxy:sonnet"}, OPENAI)

    assert (error.status, error.code) == (400, "model_format_mismatch")
    assert error.message == (
        "The model `claude-proxy:sonnet` speaks the anthropic format; call /v1/messages."
    )


def test_custom_provider_private_at_request_time(funded, model_prices, settings):
    settings.GATEWAY_ALLOW_PRIVATE_UPSTREAMS = True
    custom_provider_create(
        account=funded.account,
        name="local",
        base_url="http://127.0.0.1:9/v1",
        api_format="openai",
        api_key=GROQ_KEY,
        model_names=["tiny"],
    )
    assert admit(funded, {**CHAT, "model": "local:tiny"}).route.provider == "local"
    settings.GATEWAY_ALLOW_PRIVATE_UPSTREAMS = False

    error = rejected(funded, {**CHAT, "model": "local:tiny"})

    assert (error.status, error.code, error.openai_type) == (
        502,
        "upstream_address_not_allowed",
        "api_error",
    )
    assert error.message.startswith(
        "The custom provider `local` was not called: The host `127.0.0.1` resolves to a private"
    )
    # As part of a fallback chain, the blocked provider is skipped.
    routes = admit(funded, {**CHAT, "model": "local:tiny", "models": ["gpt-4o-mini"]}).routes
    assert [(route.provider, route.model) for route in routes] == [("openai", "gpt-4o-mini")]


# Allowlists


@pytest.mark.parametrize(
    ("allowlists", "model", "allowed"),
    [
        ({"allowed_providers": ["anthropic"]}, "gpt-4o-mini", False),
        ({"allowed_providers": ["openai"]}, "gpt-4o-mini", True),
        ({"allowed_providers": ["openai"]}, "groq:llama-3.3-70b", False),
        ({"allowed_providers": ["groq"]}, "llama-3.3-70b", True),
        ({"allowed_models": ["openai:gpt-4o"]}, "gpt-4o-mini", False),
        ({"allowed_models": ["openai:gpt-4o-mini"]}, "gpt-4o-mini", True),
        ({"allowed_models": ["gpt-4o-mini"]}, "openai:gpt-4o-mini", True),
        ({"allowed_models": ["groq:llama-3.3-70b"]}, "groq:llama3:8b", False),
        ({"allowed_models": ["llama3:8b"]}, "groq:llama3:8b", True),
        (
            {"allowed_providers": ["openai"], "allowed_models": ["llama-3.3-70b"]},
            "groq:llama-3.3-70b",
            False,
        ),
    ],
)
def test_allowlists(groq, funded, model_prices, allowlists, model, allowed):
    raw_key = limited_key(funded, **allowlists)
    body = {**CHAT, "model": model}
    if allowed:
        assert admit(funded, body, raw_key=raw_key).routes
        return
    error = rejected(funded, body, raw_key=raw_key)
    assert (error.status, error.code, error.openai_type, error.param) == (
        403,
        "model_not_allowed",
        "permission_error",
        "model",
    )
    assert error.message.startswith("This access key may not call the model `")


def test_disallowed_fallback_rejects_the_request(funded, model_prices):
    raw_key = limited_key(funded, allowed_models=["gpt-4o-mini"])
    error = rejected(funded, {**CHAT, "models": ["gpt-4o"]}, raw_key=raw_key)
    assert (error.status, error.code, error.param) == (403, "model_not_allowed", "models")
    assert error.message == (
        "This access key may not call the model `openai:gpt-4o`. "
        "GET /v1/models lists the models it may call."
    )


# Fallback chains


def test_models_list_is_a_fallback_chain(groq, funded, model_prices):
    body = {
        **CHAT,
        "model": "groq:llama-3.3-70b",
        "models": ["gpt-4o-mini", "openai:gpt-4o-mini", "llama-3.3-70b", "gpt-4o"],
    }

    routes = admit(funded, body).routes

    # Duplicates of a route already in the chain are dropped; the order is kept.
    assert [(r.provider, r.model, r.key_source) for r in routes] == [
        ("groq", "llama-3.3-70b", "custom"),
        ("openai", "gpt-4o-mini", "builtin"),
        ("openai", "gpt-4o", "builtin"),
    ]


def test_models_without_model_takes_the_first_as_primary(funded, model_prices):
    routes = admit(funded, {"models": ["gpt-4o", "gpt-4o-mini"]}).routes
    assert [route.model for route in routes] == ["gpt-4o", "gpt-4o-mini"]


@pytest.mark.parametrize(
    ("body", "status", "code", "param", "message"),
    [
        ({"models": "gpt-4o"}, 400, None, "models", "`models` must be a list of model names."),
        (
            {"models": ["gpt-4o", 3]},
            400,
            None,
            "models",
            "`models` must be a list of model names.",
        ),
        ({"models": [""]}, 400, None, "models", "`models` must be a list of model names."),
        (
            {"models": ["gpt-4o"] * 5},
            400,
            None,
            "models",
            "A request may name at most 5 models in `model` and `models` together.",
        ),
        (
            {"models": ["claude-haiku-4-5"]},
            400,
            "model_format_mismatch",
            "models",
            "The model `claude-haiku-4-5` speaks the anthropic format; call /v1/messages.",
        ),
        (
            {"models": ["gpt-nonexistent"]},
            404,
            "model_not_found",
            "models",
            "The model `gpt-nonexistent` does not exist. Use `provider:model`, such as "
            "`openai:gpt-4o-mini`; GET /v1/models lists the models this key may call.",
        ),
    ],
)
def test_bad_fallback_chains_are_rejected(
    funded, model_prices, body, status, code, param, message
):
    error = rejected(funded, {**CHAT, **body})
    assert (error.status, error.code, error.param, error.message) == (status, code, param, message)


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        (None, 400, None),
        (42, 400, None),
        ("openai:", 404, "model_not_found"),
        ("nope:gpt-4o", 404, "model_not_found"),
        ("openai:gpt-nonexistent", 404, "model_not_found"),
    ],
)
def test_bad_model_names_are_rejected(funded, model_prices, model, status, code):
    body = {"messages": []} if model is None else {**CHAT, "model": model}
    error = rejected(funded, body)
    assert (error.status, error.code, error.param) == (status, code, "model")


def test_bare_name_ambiguous_between_builtins(funded, model_prices, committed):
    for provider in ("openai", "anthropic"):
        ModelPrice.objects.create(
            provider=provider,
            model="shared",
            input_nanousd_per_mtok=1,
            output_nanousd_per_mtok=1,
            effective_from=timezone.now() - timedelta(days=1),
        )
    committed(price_catalog_evict_on_commit)

    error = rejected(funded, {**CHAT, "model": "shared"})

    assert (error.status, error.code) == (400, "model_ambiguous")
    assert admit(funded, {**CHAT, "model": "openai:shared"}).route.model == "shared"


# Listing models


def test_models_for_key_lists_builtin_and_custom_models(groq, funded, model_prices):
    models = models_for_key(raw_key=funded.key.raw_key)

    ids = [model["id"] for model in models]
    assert ids[-2:] == ["groq:llama-3.3-70b", "groq:llama3:8b"]
    assert "openai:gpt-4o-mini" in ids
    assert "anthropic:claude-haiku-4-5" in ids
    assert len(ids) == ModelPrice.objects.values("provider", "model").distinct().count() + 2
    created = groq.created_at.replace(microsecond=0)
    assert models[-1] == {
        "id": "groq:llama3:8b",
        "owned_by": "groq",
        "created": int(created.timestamp()),
        "created_at": created.isoformat().replace("+00:00", "Z"),
    }
    assert next(model for model in models if model["id"] == "openai:gpt-4o-mini") == {
        "id": "openai:gpt-4o-mini",
        "owned_by": "openai",
        "created": 1735689600,
        "created_at": "2025-01-01T00:00:00Z",
    }


def test_models_for_key_respects_allowlists(groq, funded, model_prices):
    by_provider = limited_key(funded, allowed_providers=["groq", "anthropic"])
    by_model = limited_key(funded, allowed_models=["gpt-4o-mini", "groq:llama3:8b"])

    provider_ids = [model["id"] for model in models_for_key(raw_key=by_provider)]
    model_ids = [model["id"] for model in models_for_key(raw_key=by_model)]

    assert all(model_id.startswith(("anthropic:", "groq:")) for model_id in provider_ids)
    assert provider_ids[-2:] == ["groq:llama-3.3-70b", "groq:llama3:8b"]
    assert model_ids == ["openai:gpt-4o-mini", "groq:llama3:8b"]


def test_models_for_key_rejects_unknown_key(funded):
    with pytest.raises(GatewayError) as caught:
        models_for_key(raw_key="tb_unknown")
    assert (caught.value.status, caught.value.code) == (401, "invalid_api_key")


# Caching


def test_route_resolution_reads_no_database_once_cached(
    groq, funded, model_prices, django_assert_num_queries
):
    provider_credential_set(account=funded.account, provider="openai", api_key=OWN_OPENAI_KEY)
    identity = access_key_authenticate(raw_key=funded.key.raw_key)
    body = {**CHAT, "models": ["groq:llama-3.3-70b"]}
    routes_resolve(identity=identity, body=body, surface=OPENAI)
    models_for_key(raw_key=funded.key.raw_key)

    with django_assert_num_queries(0):
        routes = routes_resolve(identity=identity, body=body, surface=OPENAI)
        models_for_key(raw_key=funded.key.raw_key)

    assert [route.key_source for route in routes] == ["own", "custom"]


def test_provider_changes_reach_the_gateway_at_once(funded, model_prices, committed, public_dns):
    assert admit(funded, CHAT).route.key_source == "builtin"

    committed(
        provider_credential_set, account=funded.account, provider="openai", api_key=OWN_OPENAI_KEY
    )
    assert admit(funded, CHAT).route.key_source == "own"

    committed(
        custom_provider_create,
        account=funded.account,
        name="groq",
        base_url=f"https://{PUBLIC_HOST}/v1",
        api_format="openai",
        model_names=["llama-3.3-70b"],
    )
    assert admit(funded, {**CHAT, "model": "llama-3.3-70b"}).route.provider == "groq"


# Admission from this process's memory


def admit_cached(tenant, body: dict, surface: str = OPENAI) -> Admission | None:
    return asyncio.run(
        request_admit_cached(raw_key=tenant.key.raw_key, body=body, surface=surface)
    )


CAPPED_CHAT = {**CHAT, "max_tokens": 10}
# 258 estimated input tokens at 150 + 50, and 10 output tokens at 600 + 50.
CAPPED_CHAT_WORST = 258 * 200 + 10 * 650


def test_cached_admission_matches_thread(funded, model_prices):
    first = admit(funded, CAPPED_CHAT)
    held = held_nanousd(account_id=funded.account.pk)
    assert held == CAPPED_CHAT_WORST

    cached = admit_cached(funded, CAPPED_CHAT)

    assert cached is not None
    assert cached.routes == first.routes
    assert cached.reservation.hold_nanousd == CAPPED_CHAT_WORST
    assert cached.reservation.reservation_id != first.reservation.reservation_id
    assert held_nanousd(account_id=funded.account.pk) == 2 * CAPPED_CHAT_WORST


def test_cached_admission_key_not_in_memory(funded, model_prices):
    assert admit_cached(funded, CAPPED_CHAT) is None
    assert held_nanousd(account_id=funded.account.pk) == 0


def test_cached_admission_provider_change(funded, model_prices):
    admit(funded, CAPPED_CHAT)
    # Another process saved a provider: only the shared token changes, not this memory.
    cache.set(provider_config_version_key(funded.account.pk), version_token_new(), timeout=None)

    assert admit_cached(funded, CAPPED_CHAT) is None
    # Nothing was held for the declined attempt.
    assert held_nanousd(account_id=funded.account.pk) == CAPPED_CHAT_WORST
    # The worker thread reads the new token and admits.
    assert admit(funded, CAPPED_CHAT).reservation.hold_nanousd == CAPPED_CHAT_WORST


def test_cached_admission_price_change(funded, model_prices):
    admit(funded, CAPPED_CHAT)
    cache.set(PRICE_CATALOG_VERSION_KEY, version_token_new(), timeout=None)

    assert admit_cached(funded, CAPPED_CHAT) is None
    assert held_nanousd(account_id=funded.account.pk) == CAPPED_CHAT_WORST


def test_cached_admission_uncached_balance(funded, model_prices):
    admit(funded, CAPPED_CHAT)
    # A ledger write in another process moved the generation on.
    generation_key = BALANCE_GENERATION_KEY.format(account_id=funded.account.pk)
    cache.set(generation_key, cache.get(generation_key, 0) + 1, timeout=None)

    assert admit_cached(funded, CAPPED_CHAT) is None
    assert held_nanousd(account_id=funded.account.pk) == CAPPED_CHAT_WORST


def test_cached_admission_custom_provider(funded, model_prices, groq):
    body = {**CAPPED_CHAT, "model": "groq:llama-3.3-70b"}
    assert admit(funded, body).route.key_source == UsageRecord.KeySource.CUSTOM

    assert admit_cached(funded, body) is None


def test_cached_admission_empty_balance(owner, model_prices):
    with pytest.raises(GatewayError) as from_thread:
        admit(owner, CAPPED_CHAT)

    with pytest.raises(GatewayError) as cached:
        admit_cached(owner, CAPPED_CHAT)

    assert (cached.value.status, cached.value.code) == (402, "insufficient_quota")
    assert cached.value.message == from_thread.value.message
    assert cached.value.message.startswith("Out of credit: the balance is USD 0.00.")


def test_batch_dates_records_at_attempt_end(funded, model_prices):
    """A batch written later dates each record and its charge at its own attempt's end."""
    route = admit(funded, CHAT).route
    written_at = timezone.now()
    ended = [written_at - timedelta(milliseconds=750), None]
    attempts = [
        succeeded_attempt(
            route,
            funded,
            request_id=f"req_dated_{index}",
            usage=TokenUsage(input_tokens=10, output_tokens=5),
            finished_at=finished_at,
        )
        for index, finished_at in enumerate(ended)
    ]

    records = usage_records_batch(attempts=attempts, at=written_at)

    # Without an end time, the record is dated when the batch was written.
    assert [record.created_at for record in records] == [ended[0], written_at]
    charges = LedgerTransaction.objects.filter(request_id__startswith="req_dated_")
    assert dict(charges.values_list("request_id", "created_at")) == {
        "req_dated_0": ended[0],
        "req_dated_1": written_at,
    }
    # 10 input tokens at 150 + 50 and 5 output tokens at 600 + 50, each.
    assert [record.cost_nanousd for record in records] == [5_250, 5_250]
