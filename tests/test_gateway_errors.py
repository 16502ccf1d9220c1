"""Requests the gateway rejects itself: each gets the surface's error shape and costs nothing."""

import json

import pytest
from django.test import Client

from credits.models import LedgerTransaction
from credits.services import usage_debit
from gateway.models import UsageRecord
from gateway.services import access_key_create, access_key_revoke

# The proxy reads the database from worker threads, which see only committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


def openai_error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    return body["error"]


def anthropic_error(response) -> dict:
    body = response.json()
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    return body["error"]


def post(path: str, body, *, key: str | None, raw: bytes | None = None, **headers):
    client = Client()
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return client.post(path, content, content_type="application/json", headers=headers)


def nothing_charged() -> None:
    assert LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.USAGE).count() == 0
    assert UsageRecord.objects.count() == 0


CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE_BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 8,
    "messages": [{"role": "user", "content": "hi"}],
}


def test_missing_key_is_401_in_openai_shape(funded, model_prices):
    response = post(CHAT, CHAT_BODY, key=None)
    assert response.status_code == 401
    assert openai_error(response)["code"] == "invalid_api_key"
    assert response.headers["x-request-id"].startswith("req_")
    nothing_charged()


def test_unknown_key_is_401_in_anthropic_shape(funded, model_prices):
    response = post(MESSAGES, MESSAGE_BODY, key="tb_not-a-real-key")
    assert response.status_code == 401
    error = anthropic_error(response)
    assert error["type"] == "authentication_error"
    assert "tb_not-a-real-key" not in response.content.decode()
    assert response.headers["request-id"] == response.headers["x-request-id"]
    nothing_charged()


def test_revoked_key_is_rejected(funded, model_prices, django_capture_on_commit_callbacks):
    created = access_key_create(account=funded.account, name="temp")
    with django_capture_on_commit_callbacks(execute=True):
        access_key_revoke(access_key=created.access_key)

    response = post(CHAT, CHAT_BODY, key=created.raw_key)

    assert response.status_code == 401
    assert openai_error(response)["code"] == "invalid_api_key"
    nothing_charged()


def test_malformed_json_is_400(funded, model_prices):
    response = post(CHAT, None, key=funded.key.raw_key, raw=b'{"model": ')
    assert response.status_code == 400
    assert openai_error(response)["code"] == "invalid_json"
    nothing_charged()


@pytest.mark.parametrize("model", ["gpt-nonexistent", "openai:gpt-nonexistent", "nope:gpt-4o"])
def test_unknown_model_is_404(funded, model_prices, model):
    response = post(CHAT, {**CHAT_BODY, "model": model}, key=funded.key.raw_key)
    assert response.status_code == 404
    error = openai_error(response)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    nothing_charged()


def test_missing_model_is_400(funded, model_prices):
    response = post(MESSAGES, {"max_tokens": 5, "messages": []}, key=funded.key.raw_key)
    assert response.status_code == 400
    assert anthropic_error(response)["type"] == "invalid_request_error"
    nothing_charged()


def test_model_of_other_format_is_400(funded, model_prices):
    response = post(CHAT, {**CHAT_BODY, "model": "claude-haiku-4-5"}, key=funded.key.raw_key)
    assert response.status_code == 400
    assert "/v1/messages" in openai_error(response)["message"]
    nothing_charged()


def test_zero_balance_is_402_with_where_to_buy(owner, model_prices):
    response = post(MESSAGES, MESSAGE_BODY, key=owner.key.raw_key)
    assert response.status_code == 402
    error = anthropic_error(response)
    assert error["type"] == "billing_error"
    assert "USD 0.00" in error["message"]
    assert "/credits/" in error["message"]
    nothing_charged()


def test_negative_balance_is_402(funded, model_prices, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        usage_debit(
            account_id=funded.account.pk, request_id="req_drain", amount_nanousd=10_000_000_001
        )
    response = post(CHAT, CHAT_BODY, key=funded.key.raw_key)
    assert response.status_code == 402
    error = openai_error(response)
    assert error["type"] == "insufficient_quota"
    assert "USD -0.000000001" in error["message"]


def test_management_only_key_cannot_call_gateway(funded, model_prices):
    created = access_key_create(account=funded.account, name="api only", scopes=["management"])
    response = post(CHAT, CHAT_BODY, key=created.raw_key)
    assert response.status_code == 403
    assert openai_error(response)["code"] == "insufficient_scope"
    nothing_charged()


def test_frozen_account_cannot_list_models(funded, model_prices):
    funded.account.is_frozen = True
    funded.account.save(update_fields=["is_frozen"])

    response = Client().get(
        "/v1/models", headers={"authorization": f"Bearer {funded.key.raw_key}"}
    )

    assert response.status_code == 403
    assert openai_error(response)["code"] == "account_frozen"


def test_anthropic_clients_list_only_anthropic_models(funded, model_prices):
    headers = {"authorization": f"Bearer {funded.key.raw_key}", "anthropic-version": "2023-06-01"}

    response = Client().get("/v1/models", headers=headers)

    assert response.status_code == 200
    ids = [model["id"] for model in response.json()["data"]]
    assert "anthropic:claude-haiku-4-5" in ids
    assert all(model_id.startswith("anthropic:") for model_id in ids)
