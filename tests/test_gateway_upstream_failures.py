"""Upstream failures the gateway reports in the surface's error shape, uncharged."""

import json
import socket

import pytest
from django.test import Client

from credits.models import LedgerTransaction
from credits.services import account_balance
from gateway.models import UsageRecord

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("model_prices"),
]

TEN_USD = 10_000_000_000


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(path: str, body: dict, key: str):
    return Client().post(
        path,
        json.dumps(body),
        content_type="application/json",
        headers={"authorization": f"Bearer {key}"},
    )


def assert_uncharged(tenant, request_id: str, error_type: str) -> None:
    record = UsageRecord.objects.get(request_id=request_id)
    assert (record.status, record.error_type, record.cost_nanousd) == (
        UsageRecord.Status.FAILED,
        error_type,
        0,
    )
    assert LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.USAGE).count() == 0
    assert account_balance(account_id=tenant.account.pk).balance_nanousd == TEN_USD


def test_unreachable_upstream_is_502_openai_shape(funded, settings):
    settings.OPENAI_BASE_URL = f"http://127.0.0.1:{closed_port()}/v1"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    response = post("/v1/chat/completions", body, funded.key.raw_key)

    assert response.status_code == 502
    assert response.json() == {
        "error": {
            "message": "The upstream provider `openai` could not be reached.",
            "type": "api_error",
            "code": "upstream_unreachable",
            "param": None,
        }
    }
    assert_uncharged(funded, response.headers["x-request-id"], "unreachable")


def test_upstream_timeout_is_504_anthropic_shape(funded, settings, upstream_url):
    settings.ANTHROPIC_BASE_URL = upstream_url
    settings.GATEWAY_UPSTREAM_TIMEOUT_SECONDS = 0.3
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}],
        "x_upstream": {"delay-ms": 2000},
    }

    response = post("/v1/messages", body, funded.key.raw_key)

    assert response.status_code == 504
    assert response.json() == {
        "type": "error",
        "error": {"type": "timeout_error", "message": "The upstream provider timed out."},
    }
    assert_uncharged(funded, response.headers["request-id"], "timeout")


def test_operator_key_never_reaches_the_client(funded, settings, upstream_url):
    settings.OPENAI_BASE_URL = f"{upstream_url}/v1"
    settings.OPENAI_API_KEY = "sk-operator-secret-value"
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "x_upstream": {"status": 401},
    }

    response = post("/v1/chat/completions", body, funded.key.raw_key)

    assert response.status_code == 401
    assert b"sk-operator-secret-value" not in response.content
    assert "sk-operator-secret-value" not in str(response.headers)
