"""The gateway with the account's own keys and custom providers, through the async views.

The `server` process runs with fixed settings, so these tests call the views with
Django's test client and point the built-in providers and custom providers at the local
upstream (`upstream_url`). The upstream counts one input token per word and returns 8
output tokens unless `max_tokens` is lower. The fee is 50 nano-dollars per token;
gpt-4o-mini costs 150 per input and 600 per output token.
"""

import json

import httpx
import pytest
from django.test import Client

from credits.services import account_balance, ledger_violations
from gateway.models import UsageRecord
from gateway.providers import custom_provider_create, provider_credential_set
from gateway.services import access_key_create

# The proxy reads the database from worker threads, which see only committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
START_BALANCE = 10_000_000_000
OWN_KEY = "sk-own-openai-key-00000000000000e2e1"
CUSTOM_KEY = "local-upstream-key-e2e2"


@pytest.fixture
def upstream(settings, upstream_url) -> str:
    """Point built-in OpenAI at the local upstream and allow custom providers on loopback."""
    settings.OPENAI_BASE_URL = f"{upstream_url}/v1"
    settings.OPENAI_API_KEY = "operator-openai-key"
    settings.ANTHROPIC_BASE_URL = upstream_url
    settings.ANTHROPIC_API_KEY = "operator-anthropic-key"
    settings.GATEWAY_ALLOW_PRIVATE_UPSTREAMS = True
    return upstream_url


def post(path: str, body: dict, *, key: str):
    return Client().post(
        path,
        json.dumps(body).encode(),
        content_type="application/json",
        headers={"authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"},
    )


def records(response) -> list[UsageRecord]:
    request_id = response.headers["x-request-id"]
    return list(UsageRecord.objects.filter(request_id=request_id).order_by("attempt"))


def balance(tenant) -> int:
    return account_balance(account_id=tenant.account.pk).balance_nanousd


def test_own_key_charges_fee_only(funded, model_prices, upstream, settings):
    # Without an operator key the upstream would refuse built-in requests with 401.
    settings.OPENAI_API_KEY = ""
    provider_credential_set(account=funded.account, provider="openai", api_key=OWN_KEY)

    response = post(
        CHAT,
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there friend"}]},
        key=funded.key.raw_key,
    )

    assert response.status_code == 200, response.content
    assert response.json()["usage"]["prompt_tokens"] == 3
    assert response.json()["usage"]["completion_tokens"] == 8
    [record] = records(response)
    assert (record.provider, record.model, record.key_source, record.status) == (
        "openai",
        "gpt-4o-mini",
        "own",
        "succeeded",
    )
    # 11 tokens x 50: the fee only.
    assert (record.fee_nanousd, record.model_cost_nanousd, record.cost_nanousd) == (550, 0, 550)
    assert balance(funded) == START_BALANCE - 550
    assert ledger_violations(account=funded.account) == []
    last = httpx.get(f"{upstream}/_last_request").json()
    assert last["headers"]["authorization"] == "[redacted]"


def test_custom_anthropic_provider_through_messages(funded, model_prices, upstream):
    custom_provider_create(
        account=funded.account,
        name="local",
        base_url=upstream,
        api_format="anthropic",
        api_key=CUSTOM_KEY,
        model_names=["claude-local"],
    )

    response = post(
        MESSAGES,
        {
            "model": "claude-local",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "one two"}],
        },
        key=funded.key.raw_key,
    )

    assert response.status_code == 200, response.content
    assert response.json()["usage"]["input_tokens"] == 2
    assert response.json()["usage"]["output_tokens"] == 5
    [record] = records(response)
    assert (record.provider, record.model, record.key_source, record.surface) == (
        "local",
        "claude-local",
        "custom",
        "anthropic",
    )
    assert (record.fee_nanousd, record.model_cost_nanousd, record.cost_nanousd) == (350, 0, 350)
    assert balance(funded) == START_BALANCE - 350
    last = httpx.get(f"{upstream}/_last_request").json()
    assert (last["path"], last["json"]["model"]) == ("/v1/messages", "claude-local")
    assert last["headers"]["x-api-key"] == "[redacted]"


def test_private_custom_provider_rejected_at_request(funded, model_prices, upstream, settings):
    custom_provider_create(
        account=funded.account,
        name="local",
        base_url=f"{upstream}/v1",
        api_format="openai",
        api_key=CUSTOM_KEY,
        model_names=["tiny"],
    )
    settings.GATEWAY_ALLOW_PRIVATE_UPSTREAMS = False

    response = post(
        CHAT,
        {"model": "local:tiny", "messages": [{"role": "user", "content": "hi"}]},
        key=funded.key.raw_key,
    )

    assert response.status_code == 502
    assert response.json() == {
        "error": {
            "message": (
                "The custom provider `local` was not called: The host `127.0.0.1` resolves "
                "to a private, loopback, link-local or otherwise non-public address. Custom "
                "providers must be reachable on the public internet unless the operator "
                "allows private upstreams."
            ),
            "type": "api_error",
            "code": "upstream_address_not_allowed",
            "param": None,
        }
    }
    assert UsageRecord.objects.count() == 0
    assert balance(funded) == START_BALANCE


def test_disallowed_model_403_per_surface(funded, model_prices, upstream):
    raw_key = access_key_create(
        account=funded.account, name="mini only", allowed_models=["gpt-4o-mini"]
    ).raw_key

    chat = post(
        CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, key=raw_key
    )
    message = post(
        MESSAGES,
        {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": []},
        key=raw_key,
    )

    assert chat.status_code == 403
    assert chat.json() == {
        "error": {
            "message": "This access key may not call the model `openai:gpt-4o`. "
            "GET /v1/models lists the models it may call.",
            "type": "permission_error",
            "code": "model_not_allowed",
            "param": "model",
        }
    }
    assert message.status_code == 403
    assert message.json() == {
        "type": "error",
        "error": {
            "type": "permission_error",
            "message": "This access key may not call the model `anthropic:claude-haiku-4-5`. "
            "GET /v1/models lists the models it may call.",
        },
    }
    assert UsageRecord.objects.count() == 0
    assert balance(funded) == START_BALANCE


def test_fallback_from_a_failing_custom_provider_to_builtin(funded, model_prices, upstream):
    custom_provider_create(
        account=funded.account,
        name="local",
        base_url=f"{upstream}/v1",
        api_format="openai",
        api_key=CUSTOM_KEY,
        model_names=["fail-500"],
    )

    response = post(
        CHAT,
        {
            "model": "local:fail-500",
            "models": ["gpt-4o-mini"],
            "messages": [{"role": "user", "content": "hi"}],
        },
        key=funded.key.raw_key,
    )

    assert response.status_code == 200, response.content
    first, second = records(response)
    assert (first.attempt, first.provider, first.model, first.key_source) == (
        1,
        "local",
        "fail-500",
        "custom",
    )
    assert (first.status, first.http_status, first.cost_nanousd) == ("upstream_error", 500, 0)
    assert (second.attempt, second.provider, second.model, second.key_source) == (
        2,
        "openai",
        "gpt-4o-mini",
        "builtin",
    )
    # 1 input token x 150 + 8 output tokens x 600 = 4,950, plus 9 tokens x 50 = 450.
    assert (second.status, second.fee_nanousd, second.model_cost_nanousd) == (
        "succeeded",
        450,
        4_950,
    )
    assert balance(funded) == START_BALANCE - 5_400
    assert ledger_violations(account=funded.account) == []


def test_v1_models_lists_custom_provider_models(funded, model_prices, upstream):
    custom_provider_create(
        account=funded.account,
        name="local",
        base_url=f"{upstream}/v1",
        api_format="openai",
        model_names=["tiny", "small"],
    )
    raw_key = access_key_create(
        account=funded.account, name="local only", allowed_providers=["local"]
    ).raw_key

    response = Client().get("/v1/models", headers={"authorization": f"Bearer {raw_key}"})

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [(model["id"], model["owned_by"]) for model in body["data"]] == [
        ("local:tiny", "local"),
        ("local:small", "local"),
    ]
