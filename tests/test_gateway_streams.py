"""Gateway fidelity against the real server: streams, usage reading, upstream errors, fallback.

The local upstream counts one input token per word and returns 8 output tokens unless
the body's `x_upstream` object sets another count (the gateway forwards the body, so tests
steer the upstream through it).
"""

import json
import re
import time

import httpx
import openai
import pytest

from credits.models import LedgerTransaction
from credits.services import account_balance, credit_grant
from gateway.models import ModelPrice, UsageRecord
from gateway.services import access_key_revoke
from tests.gateway_helpers import wait_for_record

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("model_prices"),
]

TEN_USD = 10_000_000_000
# Random per response: ids and timestamps.
VOLATILE = re.compile(rb'"(id|created|system_fingerprint)":("[^"]*"|\d+)')


def post_stream(url: str, key: str, body: dict) -> tuple[httpx.Response, list[bytes]]:
    """POST a streaming request and return the response and its raw SSE events."""
    with httpx.stream(
        "POST", url, json=body, headers={"authorization": f"Bearer {key}"}, timeout=30
    ) as response:
        raw = response.read()
    events = [event + b"\n\n" for event in raw.split(b"\n\n") if event]
    return response, events


def normalise(events: list[bytes]) -> list[bytes]:
    return [VOLATILE.sub(rb'"\1":"*"', event) for event in events]


def balance_of(tenant) -> int:
    return account_balance(account_id=tenant.account.pk).balance_nanousd


CHAT_BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "count to eight"}],
    "stream": True,
}


def test_openai_stream_without_usage_matches_upstream_bytes(server, upstream_url, funded):
    gateway_response, through_gateway = post_stream(
        f"{server.url}/v1/chat/completions", funded.key.raw_key, CHAT_BODY
    )
    forwarded = httpx.get(f"{upstream_url}/_last_request").json()
    _, direct = post_stream(f"{upstream_url}/v1/chat/completions", "direct-key", CHAT_BODY)

    assert gateway_response.status_code == 200
    assert forwarded["json"]["stream_options"] == {"include_usage": True}
    assert normalise(through_gateway) == normalise(direct)
    assert all(b'"usage"' not in event for event in through_gateway)
    record = UsageRecord.objects.get(request_id=gateway_response.headers["x-request-id"])
    # 3 input and 8 output tokens: fee 550, model 3 * 150 + 8 * 600 = 5250.
    assert (record.input_tokens, record.output_tokens, record.cost_nanousd) == (3, 8, 5800)
    assert record.usage_estimated is False
    assert balance_of(funded) == TEN_USD - 5800


def test_openai_stream_with_usage_passes_usage_chunk(server, upstream_url, funded):
    body = {**CHAT_BODY, "stream_options": {"include_usage": True}}
    _, through_gateway = post_stream(f"{server.url}/v1/chat/completions", funded.key.raw_key, body)
    _, direct = post_stream(f"{upstream_url}/v1/chat/completions", "direct-key", body)

    assert normalise(through_gateway) == normalise(direct)
    usage_chunk = json.loads(through_gateway[-2].removeprefix(b"data: "))
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["total_tokens"] == 11


def test_openai_cached_and_reasoning_tokens_are_priced(server, funded):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=funded.key.raw_key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "one two"}],
        extra_body={"x_upstream": {"cached-tokens": 100, "reasoning-tokens": 5}},
    )

    record = wait_for_record(raw.headers["x-request-id"])
    # prompt 102 of which 100 cached; completion 13 of which 5 reasoning.
    assert (record.input_tokens, record.cache_read_tokens) == (2, 100)
    assert (record.output_tokens, record.reasoning_tokens) == (13, 5)
    # fee 50 * 115 = 5750; model 2 * 150 + 100 * 75 + 13 * 600 = 15600.
    assert (record.fee_nanousd, record.model_cost_nanousd) == (5750, 15600)
    assert balance_of(funded) == TEN_USD - 21350


def test_anthropic_output_tokens_keep_last_delta(server, funded):
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 10,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "x_upstream": {"split-deltas": 1, "cached-tokens": 20, "cache-write-tokens": 4},
    }
    response, events = post_stream(f"{server.url}/v1/messages", funded.key.raw_key, body)

    assert response.status_code == 200
    assert sum(b"event: message_delta" in event for event in events) == 2
    record = UsageRecord.objects.get(request_id=response.headers["x-request-id"])
    assert (record.input_tokens, record.output_tokens) == (1, 10)
    assert (record.cache_read_tokens, record.cache_write_tokens) == (20, 4)
    # fee 50 * 35 = 1750; model 1 * 1000 + 10 * 5000 + 20 * 100 + 4 * 1250 = 58000.
    assert record.cost_nanousd == 59750
    assert balance_of(funded) == TEN_USD - 59750


def test_client_abort_is_charged_for_delivered_tokens(server, funded):
    body = {
        **CHAT_BODY,
        "messages": [{"role": "user", "content": "a long answer please"}],
        "x_upstream": {"output-tokens": 1000, "chunk-delay-ms": 20},
    }
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {funded.key.raw_key}"},
        timeout=30,
    ) as response:
        request_id = response.headers["x-request-id"]
        received = b""
        for chunk in response.iter_raw():
            received += chunk
            if received.count(b"tok") >= 5:
                break

    record = wait_for_record(request_id)
    assert record.status == UsageRecord.Status.ABORTED
    assert record.usage_estimated is True
    assert record.error_type == "client_abort"
    # At least the five delivered words, far fewer than the 1000 asked for.
    assert 1 <= record.output_tokens < 1000
    assert record.cost_nanousd > 0
    debit = LedgerTransaction.objects.get(request_id=request_id)
    assert debit.amount_nanousd == -record.cost_nanousd


def test_upstream_cut_is_charged_and_marked_estimated(server, funded):
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "three words here"}],
        "x_upstream": {"output-tokens": 50, "cut-after": 4},
    }
    response, _events = post_stream(f"{server.url}/v1/messages", funded.key.raw_key, body)

    record = wait_for_record(response.headers["x-request-id"])
    assert record.status == UsageRecord.Status.ABORTED
    assert record.error_type == "upstream_cut"
    assert record.usage_estimated is True
    # Input comes from message_start; output is estimated from the text delivered.
    assert record.input_tokens == 3
    assert 1 <= record.output_tokens < 50
    assert balance_of(funded) == TEN_USD - record.cost_nanousd


@pytest.mark.parametrize("status", [400, 429, 500])
def test_upstream_error_passes_through_uncharged(server, upstream_url, funded, status):
    body = {**CHAT_BODY, "stream": False, "x_upstream": {"status": status}}
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {funded.key.raw_key}"},
    )
    direct = httpx.post(
        f"{upstream_url}/v1/chat/completions",
        json=body,
        headers={"authorization": "Bearer direct-key"},
    )

    assert response.status_code == status
    assert response.json() == direct.json()
    assert response.headers["x-tollbooth-provider"] == "openai"
    record = wait_for_record(response.headers["x-request-id"])
    assert (record.status, record.cost_nanousd) == (UsageRecord.Status.UPSTREAM_ERROR, 0)
    assert LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.USAGE).count() == 0
    assert balance_of(funded) == TEN_USD


def test_fallback_chain_tries_next_model(server, funded):
    ModelPrice.objects.create(
        provider="openai",
        model="fail-500",
        input_nanousd_per_mtok=1,
        output_nanousd_per_mtok=1,
    )
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=funded.key.raw_key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="openai:fail-500",
        messages=[{"role": "user", "content": "hello world"}],
        extra_body={"models": ["openai:gpt-4o-mini"]},
    )

    assert raw.parse().model == "gpt-4o-mini"
    request_id = raw.headers["x-request-id"]
    wait_for_record(request_id, attempt=2)
    records = UsageRecord.objects.filter(request_id=request_id).order_by("attempt")
    assert [(r.attempt, r.model, r.status, r.cost_nanousd) for r in records] == [
        (1, "fail-500", UsageRecord.Status.UPSTREAM_ERROR, 0),
        (2, "gpt-4o-mini", UsageRecord.Status.SUCCEEDED, 5600),
    ]
    assert balance_of(funded) == TEN_USD - 5600


def test_revoked_key_stops_within_one_second(server, funded, django_capture_on_commit_callbacks):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=funded.key.raw_key, max_retries=0)
    models = client.models.list()
    assert "openai:gpt-4o-mini" in {model.id for model in models}

    with django_capture_on_commit_callbacks(execute=True):
        access_key_revoke(access_key=funded.key.access_key)
    revoked_at = time.monotonic()
    while True:
        try:
            client.models.list()
        except openai.AuthenticationError:
            break
        assert time.monotonic() - revoked_at < 1.5, "the revoked key still works"
        time.sleep(0.05)
    assert time.monotonic() - revoked_at <= 1.1


def test_fast_client_cannot_outrun_metering(server, owner):
    # 20000 nano-dollars cover three 5600 requests and part of a fourth.
    credit_grant(account=owner.account, amount_nanousd=20_000, reason="small")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=owner.key.raw_key, max_retries=0)
    statuses = []
    for _ in range(8):
        try:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello world"}]
            )
            statuses.append(200)
        except openai.APIStatusError as error:
            statuses.append(error.status_code)

    assert statuses == [200, 200, 200, 200, 402, 402, 402, 402]
    deadline = time.monotonic() + 5
    while UsageRecord.objects.filter(account=owner.account).count() < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.1)
    assert balance_of(owner) == 20_000 - 4 * 5600
