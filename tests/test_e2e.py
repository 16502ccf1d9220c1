"""The main job end to end, against the real server process.

Buy credits through Checkout and a signed webhook, call the gateway with the official
OpenAI and Anthropic SDKs, run out of credit, buy again, and expire a lot. Every balance
is checked to the nano-dollar.

Prices used below (nano-dollars per token, from the seeded price table):
gpt-4o-mini input 150, output 600; claude-haiku-4-5 input 1000, output 5000;
gpt-4o input 2500, output 10000. The fee is 50 per token.
The local upstream counts one input token per word and, unless told otherwise,
returns 8 output tokens.
"""

import json
import time
from datetime import timedelta

import anthropic
import httpx
import openai
import pytest
from django.utils import timezone

from credits.models import CreditLot, LedgerTransaction
from credits.services import (
    checkout_session_fulfil,
    credit_grant,
    ledger_violations,
    stripe_webhook_endpoint_configure,
)
from credits.tasks import credit_lots_expire_due
from devtools.stripe_server import build_event, sign_payload
from tests.gateway_helpers import wait_for_record

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

WEBHOOK_SECRET = "whsec_e2etestsecret000000000000"
START_BALANCE = 5_000_000_000


def balance(server, key: str) -> dict:
    response = httpx.get(
        f"{server.url}/api/credits/balance", headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200, response.text
    return response.json()


def buy(server, stripe_url: str, webhook_url: str, key: str, cents: int) -> str:
    """Start a Checkout Session through the API, pay it and deliver the signed webhook."""
    response = httpx.post(
        f"{server.url}/api/credits/checkout-session",
        headers={"Authorization": f"Bearer {key}"},
        json={"amount": cents},
    )
    assert response.status_code == 201, response.text
    session_id = response.json()["id"]
    assert response.json()["url"].startswith(stripe_url)

    paid = httpx.post(f"{stripe_url}/_test/sessions/{session_id}/pay")
    assert paid.status_code == 200, paid.text
    session = httpx.get(f"{stripe_url}/_test/sessions/{session_id}").json()
    deliver(webhook_url, build_event("checkout.session.completed", session))
    return session_id


def deliver(webhook_url: str, event: dict) -> httpx.Response:
    payload = json.dumps(event).encode()
    response = httpx.post(
        webhook_url,
        content=payload,
        headers={
            "Content-Type": "application/json",
            "Stripe-Signature": sign_payload(payload, WEBHOOK_SECRET),
        },
    )
    assert response.status_code == 200, response.text
    return response


def test_buy_call_run_out_buy_again_expire(server, stripe_url, upstream_url, owner, model_prices):
    key = owner.key.raw_key
    webhook_url = stripe_webhook_endpoint_configure(secret=WEBHOOK_SECRET, public_url=server.url)

    # 1. Buy USD 5.00; the webhook twice and the success page still make one lot.
    session_id = buy(server, stripe_url, webhook_url, key, 500)
    session = httpx.get(f"{stripe_url}/_test/sessions/{session_id}").json()
    deliver(webhook_url, build_event("checkout.session.completed", session))
    checkout_session_fulfil(session_id=session_id)
    lots = CreditLot.objects.filter(account=owner.account)
    assert lots.count() == 1
    first = balance(server, key)
    assert first["balance_usd"] == "5.000000000"
    assert first["balance_nanousd"] == START_BALANCE
    assert first["debt_nanousd"] == 0
    assert [(lot["remaining_usd"], lot["source"]) for lot in first["lots"]] == [
        ("5.000000000", "purchase")
    ]
    assert first["lots"][0]["expires_at"] == lots.get().expires_at.isoformat().replace(
        "+00:00", "Z"
    )

    # 2. OpenAI SDK, plain: 2 input and 8 output tokens.
    # fee 50 * 10 = 500; model 2 * 150 + 8 * 600 = 5100; total 5600.
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello world"}]
    )
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert completion.usage.prompt_tokens == 2
    assert completion.usage.completion_tokens == 8
    record = wait_for_record(request_id)
    assert (record.fee_nanousd, record.model_cost_nanousd, record.cost_nanousd) == (
        500,
        5100,
        5600,
    )
    assert balance(server, key)["balance_nanousd"] == START_BALANCE - 5600

    # 3. OpenAI SDK, streamed without include_usage: no usage chunk reaches the client.
    # 3 input and 8 output tokens: fee 550, model 3 * 150 + 8 * 600 = 5250; total 5800.
    stream = client.chat.completions.create(
        model="openai:gpt-4o-mini",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
    )
    chunks = list(stream)
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text.split() == [f"tok{index}" for index in range(8)]
    assert balance(server, key)["balance_nanousd"] == START_BALANCE - 5600 - 5800

    # 4. Anthropic SDK, plain: 2 input and 8 output tokens.
    # fee 500; model 2 * 1000 + 8 * 5000 = 42000; total 42500.
    claude = anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)
    raw_message = claude.messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi there"}]
    )
    message = raw_message.parse()
    assert message.usage.input_tokens == 2
    assert message.usage.output_tokens == 8
    assert raw_message.headers["request-id"] == raw_message.headers["x-request-id"]
    wait_for_record(raw_message.headers["request-id"])
    spent = 5600 + 5800 + 42500
    assert balance(server, key)["balance_nanousd"] == START_BALANCE - spent

    # 5. Anthropic SDK, streamed: 1 input and 4 output tokens.
    # fee 250; model 1000 + 4 * 5000 = 21000; total 21250.
    with claude.messages.stream(
        model="anthropic:claude-haiku-4-5",
        max_tokens=4,
        messages=[{"role": "user", "content": "stream"}],
    ) as message_stream:
        streamed_text = "".join(message_stream.text_stream)
        final = message_stream.get_final_message()
    assert streamed_text.split() == ["tok0", "tok1", "tok2", "tok3"]
    assert final.usage.output_tokens == 4
    spent += 21250
    assert balance(server, key)["balance_nanousd"] == START_BALANCE - spent

    # 6. Large requests without max_tokens are not held, so the last one overshoots.
    # Each: 1 input and 100000 output tokens on gpt-4o; fee 50 * 100001 = 5000050,
    # model 2500 + 10000 * 100000 = 1000002500; total 1005002550.
    big_cost = 1_005_002_550
    for _ in range(5):
        big = client.chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "essay"}],
            extra_body={"x_upstream": {"output-tokens": 100_000}},
        )
        assert wait_for_record(big.headers["x-request-id"]).cost_nanousd == big_cost
        spent += big_cost
    after_overshoot = balance(server, key)
    assert after_overshoot["balance_nanousd"] == START_BALANCE - spent
    debt = spent - START_BALANCE
    assert debt == 25_087_900
    assert after_overshoot["debt_nanousd"] == debt
    assert after_overshoot["lots"] == []

    # 7. At zero or below, both surfaces respond with 402 in their own error format.
    with pytest.raises(openai.APIStatusError) as openai_error:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
        )
    assert openai_error.value.status_code == 402
    assert openai_error.value.body["code"] == "insufficient_quota"
    assert "/credits/" in openai_error.value.body["message"]
    with pytest.raises(anthropic.APIStatusError) as anthropic_error:
        claude.messages.create(
            model="claude-haiku-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    assert anthropic_error.value.status_code == 402
    assert anthropic_error.value.body["error"]["type"] == "billing_error"
    assert balance(server, key)["balance_nanousd"] == START_BALANCE - spent

    # 8. A new USD 10.00 purchase pays the debt first, and calls work again.
    buy(server, stripe_url, webhook_url, key, 1000)
    refilled = balance(server, key)
    assert refilled["balance_nanousd"] == 10_000_000_000 - debt
    assert refilled["debt_nanousd"] == 0
    again = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello world"}]
    )
    assert wait_for_record(again.headers["x-request-id"]).cost_nanousd == 5600
    assert balance(server, key)["balance_nanousd"] == 10_000_000_000 - debt - 5600

    # 9. A lot past expires_at leaves the balance before the task runs; the task is idempotent.
    before_grant = 10_000_000_000 - debt - 5600
    credit_grant(
        account=owner.account,
        amount_nanousd=3_000_000_000,
        reason="short promotion",
        expires_at=timezone.now() + timedelta(seconds=2),
    )
    assert balance(server, key)["balance_nanousd"] == before_grant + 3_000_000_000
    time.sleep(2.1)
    assert balance(server, key)["balance_nanousd"] == before_grant
    assert credit_lots_expire_due.delay().get() == 1
    assert credit_lots_expire_due.delay().get() == 0
    assert balance(server, key)["balance_nanousd"] == before_grant
    expiries = LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.EXPIRY)
    assert list(expiries.values_list("entries__amount_nanousd", flat=True)) == [-3_000_000_000]

    owner.account.refresh_from_db()
    assert ledger_violations(account=owner.account) == []
    assert "tb_" not in server.log()
