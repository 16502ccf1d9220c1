"""Tests for the local Stripe stand-in, driven through the real stripe-python library.

They use neither Django nor a database, and every server they start listens on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import stripe

from devtools.stripe_server import (
    StripeServerApp,
    build_app,
    build_event,
    default_api_version,
    encode_event,
    run_in_thread,
    sign_payload,
)

# dj-stripe 2.11 rejects secret keys other than sk_test_ or sk_live_ plus 24 or more
# letters and digits.
SECRET_KEY = "sk_test_" + "TollboothDevtoolsTest" + "0" * 8
WEBHOOK_SECRET = "whsec_" + "devtoolstest" * 3
SUCCESS_URL = "http://127.0.0.1:8000/credits/success/?session_id={CHECKOUT_SESSION_ID}"
CANCEL_URL = "http://127.0.0.1:8000/credits/"


@dataclass
class RunningServer:
    app: StripeServerApp
    base_url: str

    @property
    def port(self) -> int:
        return urllib.parse.urlsplit(self.base_url).port or 80


def http_request(
    server: RunningServer,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Send one request without following redirects or using environment proxies."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def control_post(server: RunningServer, path: str) -> tuple[int, dict[str, Any]]:
    status, _headers, body = http_request(server, "POST", path)
    return status, json.loads(body)


def start_server(**kwargs: Any) -> tuple[RunningServer, Any]:
    app = build_app(**kwargs)
    base_url, stop = run_in_thread(app=app)
    return RunningServer(app, base_url), stop


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running, stop = start_server()
    yield running
    stop()


@pytest.fixture
def stripe_api(server: RunningServer) -> Iterator[RunningServer]:
    saved_base, saved_key = stripe.api_base, stripe.api_key
    stripe.api_base = server.base_url
    stripe.api_key = SECRET_KEY
    yield server
    stripe.api_base, stripe.api_key = saved_base, saved_key


def create_session(**overrides: Any) -> stripe.checkout.Session:
    """Create a session with the parameters the credits app sends."""
    params: dict[str, Any] = {
        "mode": "payment",
        "client_reference_id": "42",
        "customer_email": "buyer@example.com",
        "line_items": [
            {
                "quantity": 1,
                "price_data": {
                    "currency": "usd",
                    "unit_amount": 500,
                    "product_data": {"name": "Tollbooth credits"},
                },
            }
        ],
        "metadata": {"tollbooth_account_id": "42"},
        "payment_intent_data": {"metadata": {"tollbooth_account_id": "42"}},
        "success_url": SUCCESS_URL,
        "cancel_url": CANCEL_URL,
    }
    params.update(overrides)
    return stripe.checkout.Session.create(**params)


# --- Checkout Sessions through stripe-python -------------------------------------------


def test_session_create_returns_open_session(stripe_api: RunningServer) -> None:
    session = create_session(
        line_items=[
            {
                "quantity": 3,
                "price_data": {
                    "currency": "usd",
                    "unit_amount": 500,
                    "product_data": {"name": "Tollbooth credits"},
                },
            }
        ]
    )

    assert isinstance(session, stripe.checkout.Session)
    assert re.fullmatch(r"cs_test_[A-Za-z0-9]+", session.id)
    assert session.object == "checkout.session"
    assert session.url == f"{stripe_api.base_url}/pay/{session.id}"
    assert session.amount_subtotal == 1500
    assert session.amount_total == 1500
    assert session.currency == "usd"
    assert session.payment_status == "unpaid"
    assert session.status == "open"
    assert session.payment_intent is None
    assert session.customer is None
    assert session.client_reference_id == "42"
    assert session.customer_email == "buyer@example.com"
    assert session.metadata.to_dict() == {"tollbooth_account_id": "42"}
    assert session.mode == "payment"
    assert session.success_url == SUCCESS_URL
    assert session.cancel_url == CANCEL_URL
    assert session.livemode is False
    assert isinstance(session.created, int)


def test_session_retrieve_matches_create(stripe_api: RunningServer) -> None:
    created = create_session()

    retrieved = stripe.checkout.Session.retrieve(created.id)

    assert retrieved.id == created.id
    assert retrieved.amount_total == 500
    assert retrieved.url == created.url
    assert "line_items" not in retrieved
    assert stripe_api.app.state.get_session(created.id)["amount_total"] == 500


def test_session_retrieve_expands_line_items(stripe_api: RunningServer) -> None:
    created = create_session()

    # The same expansions dj-stripe 2.11 requests when it syncs a session.
    retrieved = stripe.checkout.Session.retrieve(
        created.id,
        expand=["line_items", "total_details.breakdown", "line_items.data.discounts"],
    )

    item = retrieved.line_items.data[0]
    assert retrieved.line_items.object == "list"
    assert item.object == "item"
    assert item.description == "Tollbooth credits"
    assert item.quantity == 1
    assert item.amount_total == 500
    assert item.price.unit_amount == 500
    assert item.discounts == []
    assert retrieved.total_details.breakdown.to_dict() == {"discounts": [], "taxes": []}


def test_session_create_missing_quantity(stripe_api: RunningServer) -> None:
    line_item = {
        "price_data": {"currency": "usd", "unit_amount": 500, "product_data": {"name": "x"}}
    }

    with pytest.raises(stripe.InvalidRequestError) as caught:
        create_session(line_items=[line_item])

    assert caught.value.http_status == 400
    assert caught.value.code == "parameter_missing"
    assert caught.value.param == "line_items[0][quantity]"


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"mode": None}, "mode"),
        ({"success_url": None}, "success_url"),
        ({"line_items": None}, "line_items"),
        ({"success_url": "not a url"}, "success_url"),
        ({"shipping_rate": "shr_1"}, "shipping_rate"),
    ],
)
def test_session_create_invalid_params(
    stripe_api: RunningServer, overrides: dict[str, Any], param: str
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        create_session(**overrides)

    assert caught.value.http_status == 400
    assert caught.value.param == param


def test_session_create_without_api_key(stripe_api: RunningServer) -> None:
    body = urllib.parse.urlencode({"mode": "payment", "success_url": "http://x.test/"}).encode()

    status, _headers, raw = http_request(
        stripe_api,
        "POST",
        "/v1/checkout/sessions",
        body,
        {"Content-Type": "application/x-www-form-urlencoded"},
    )

    error = json.loads(raw)["error"]
    assert status == 401
    assert error["type"] == "invalid_request_error"
    assert "API key" in error["message"]


def test_session_create_publishable_key_rejected(stripe_api: RunningServer) -> None:
    with pytest.raises(stripe.AuthenticationError) as caught:
        create_session(api_key="pk_test_" + "0" * 24)

    assert caught.value.http_status == 401


def test_session_retrieve_unknown_id(stripe_api: RunningServer) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe.checkout.Session.retrieve("cs_test_missing")

    assert caught.value.http_status == 404
    assert caught.value.code == "resource_missing"


def test_account_retrieve(stripe_api: RunningServer) -> None:
    account = stripe.Account.retrieve()

    assert account.object == "account"
    assert account.id.startswith("acct_")
    assert account.settings.branding.icon is None
    assert account.settings.branding.logo is None
    assert account.charges_enabled is True


# --- Paying through the control endpoints ----------------------------------------------


def test_pay_marks_session_paid(stripe_api: RunningServer) -> None:
    created = create_session()

    status, result = control_post(stripe_api, f"/_test/sessions/{created.id}/pay")

    assert status == 200
    assert result["webhook_delivery"] is None
    session = stripe.checkout.Session.retrieve(created.id)
    assert session.payment_status == "paid"
    assert session.status == "complete"
    assert session.url is None
    assert re.fullmatch(r"pi_[A-Za-z0-9]+", session.payment_intent)
    assert session.customer_details.email == "buyer@example.com"
    assert stripe_api.app.state.get_session(created.id)["payment_status"] == "paid"


def test_pay_creates_payment_intent_and_charge(stripe_api: RunningServer) -> None:
    created = create_session()
    control_post(stripe_api, f"/_test/sessions/{created.id}/pay")
    session = stripe.checkout.Session.retrieve(created.id)

    payment_intent = stripe.PaymentIntent.retrieve(session.payment_intent)
    charge = stripe.Charge.retrieve(payment_intent.latest_charge)
    payment_method = stripe.PaymentMethod.retrieve(payment_intent.payment_method)

    assert payment_intent.status == "succeeded"
    assert payment_intent.amount == 500
    assert payment_intent.amount_received == 500
    assert payment_intent.currency == "usd"
    assert payment_intent.customer is None
    assert payment_intent.metadata.to_dict() == {"tollbooth_account_id": "42"}
    assert charge.status == "succeeded"
    assert charge.paid is True
    assert charge.payment_intent == payment_intent.id
    assert payment_method.type == "card"
    assert payment_method.card.last4 == "4242"


def test_pay_records_completed_event(stripe_api: RunningServer) -> None:
    created = create_session()

    _status, result = control_post(stripe_api, f"/_test/sessions/{created.id}/pay")
    event = stripe.Event.retrieve(result["event"]["id"])

    assert event.type == "checkout.session.completed"
    assert event.api_version == default_api_version()
    assert event.data.object.id == created.id
    assert event.data.object.payment_status == "paid"
    assert event.pending_webhooks == 0


def test_pay_twice_rejected(stripe_api: RunningServer) -> None:
    created = create_session()
    control_post(stripe_api, f"/_test/sessions/{created.id}/pay")

    status, result = control_post(stripe_api, f"/_test/sessions/{created.id}/pay")

    assert status == 400
    assert result["error"]["type"] == "invalid_request_error"
    assert "complete" in result["error"]["message"]


def test_pay_unknown_session(stripe_api: RunningServer) -> None:
    status, result = control_post(stripe_api, "/_test/sessions/cs_test_missing/pay")

    assert status == 404
    assert result["error"]["code"] == "resource_missing"


def test_delayed_payment_succeeds(stripe_api: RunningServer) -> None:
    created = create_session()

    _status, pending = control_post(stripe_api, f"/_test/sessions/{created.id}/pay_async")
    session = stripe.checkout.Session.retrieve(created.id)
    payment_intent = stripe.PaymentIntent.retrieve(session.payment_intent)

    assert pending["event"]["type"] == "checkout.session.completed"
    assert session.status == "complete"
    assert session.payment_status == "unpaid"
    assert payment_intent.status == "processing"

    _status, settled = control_post(stripe_api, f"/_test/sessions/{created.id}/async_succeeded")
    session = stripe.checkout.Session.retrieve(created.id)
    payment_intent = stripe.PaymentIntent.retrieve(session.payment_intent)

    assert settled["event"]["type"] == "checkout.session.async_payment_succeeded"
    assert session.payment_status == "paid"
    assert payment_intent.status == "succeeded"


def test_delayed_payment_fails(stripe_api: RunningServer) -> None:
    created = create_session()
    control_post(stripe_api, f"/_test/sessions/{created.id}/pay_async")

    _status, failed = control_post(stripe_api, f"/_test/sessions/{created.id}/async_failed")

    assert failed["event"]["type"] == "checkout.session.async_payment_failed"
    assert failed["session"]["payment_status"] == "unpaid"
    assert failed["payment_intent"]["status"] == "requires_payment_method"
    assert failed["charge"]["status"] == "failed"


def test_async_succeeded_needs_pay_async(stripe_api: RunningServer) -> None:
    created = create_session()

    status, result = control_post(stripe_api, f"/_test/sessions/{created.id}/async_succeeded")

    assert status == 400
    assert "pay_async" in result["error"]["message"]


def test_session_expire(stripe_api: RunningServer) -> None:
    created = create_session()

    expired = stripe.checkout.Session.expire(created.id)

    assert expired.status == "expired"
    assert expired.url is None
    with pytest.raises(stripe.InvalidRequestError):
        stripe.checkout.Session.expire(created.id)


# --- Events and signatures -------------------------------------------------------------


def test_build_event_shape() -> None:
    data_object = {"id": "cs_test_1", "object": "checkout.session", "payment_status": "paid"}

    event = build_event("checkout.session.completed", data_object, created=1_700_000_000)
    data_object["payment_status"] = "unpaid"

    assert re.fullmatch(r"evt_[A-Za-z0-9]+", event["id"])
    assert event["object"] == "event"
    assert event["type"] == "checkout.session.completed"
    assert event["api_version"] == default_api_version()
    assert event["created"] == 1_700_000_000
    assert event["livemode"] is False
    assert event["pending_webhooks"] == 0
    assert event["request"] == {"id": None, "idempotency_key": None}
    assert event["data"]["object"]["payment_status"] == "paid"


def test_build_event_explicit_fields() -> None:
    event = build_event(
        "checkout.session.expired", {"id": "cs_test_2"}, event_id="evt_fixed", api_version="v1"
    )

    assert event["id"] == "evt_fixed"
    assert event["api_version"] == "v1"


def test_sign_payload_header_format() -> None:
    header = sign_payload(b"{}", WEBHOOK_SECRET, timestamp=1_700_000_000)

    assert re.fullmatch(r"t=1700000000,v1=[0-9a-f]{64}", header)


def test_sign_payload_accepted_by_stripe() -> None:
    event = build_event("checkout.session.completed", {"id": "cs_test_3", "object": "x"})
    payload = encode_event(event)

    verified = stripe.Webhook.construct_event(
        payload, sign_payload(payload, WEBHOOK_SECRET), WEBHOOK_SECRET
    )

    assert verified.id == event["id"]
    assert verified.type == "checkout.session.completed"
    assert verified.data.object.id == "cs_test_3"


def test_sign_payload_accepts_text_payload() -> None:
    payload = json.dumps(build_event("checkout.session.completed", {"id": "cs_test_é"}))

    verified = stripe.Webhook.construct_event(
        payload, sign_payload(payload, WEBHOOK_SECRET), WEBHOOK_SECRET
    )

    assert verified.data.object.id == "cs_test_é"


def test_sign_payload_tampered_payload_rejected() -> None:
    payload = encode_event(build_event("checkout.session.completed", {"id": "cs_test_4"}))
    header = sign_payload(payload, WEBHOOK_SECRET)
    tampered = payload.replace(b"cs_test_4", b"cs_test_5")

    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(tampered, header, WEBHOOK_SECRET)


def test_sign_payload_wrong_secret_rejected() -> None:
    payload = encode_event(build_event("checkout.session.completed", {"id": "cs_test_6"}))
    header = sign_payload(payload, "whsec_other")

    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, header, WEBHOOK_SECRET)


def test_sign_payload_old_timestamp_rejected() -> None:
    payload = encode_event(build_event("checkout.session.completed", {"id": "cs_test_7"}))
    header = sign_payload(payload, WEBHOOK_SECRET, timestamp=int(time.time()) - 3600)

    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, header, WEBHOOK_SECRET, tolerance=300)


# --- Checkout page and webhook delivery ------------------------------------------------


class WebhookReceiver:
    """Record webhook requests and, like dj-stripe, retrieve the session while handling one."""

    def __init__(self, stripe_base_url: str | None = None) -> None:
        self.stripe_base_url = stripe_base_url
        self.requests: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                record = {"path": self.path, "headers": dict(self.headers), "body": body}
                record["callback"] = receiver.retrieve_session(body)
                receiver.requests.append(record)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/stripe/webhook/"
        # A short poll interval keeps shutdown() from adding half a second per test.
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def retrieve_session(self, body: bytes) -> tuple[int, dict[str, Any]] | None:
        if self.stripe_base_url is None:
            return None
        session_id = json.loads(body)["data"]["object"]["id"]
        port = urllib.parse.urlsplit(self.stripe_base_url).port
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request(
                "GET",
                f"/v1/checkout/sessions/{session_id}",
                headers={"Authorization": f"Bearer {SECRET_KEY}"},
            )
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def webhook_server() -> Iterator[tuple[RunningServer, WebhookReceiver]]:
    receiver = WebhookReceiver()
    running, stop = start_server(webhook_url=receiver.url, webhook_secret=WEBHOOK_SECRET)
    receiver.stripe_base_url = running.base_url
    saved_base = stripe.api_base
    stripe.api_base = running.base_url
    yield running, receiver
    stripe.api_base = saved_base
    stop()
    receiver.close()


def test_checkout_page_shows_pay_button(stripe_api: RunningServer) -> None:
    created = create_session()

    status, headers, body = http_request(stripe_api, "GET", f"/pay/{created.id}")

    page = body.decode()
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert f'action="/pay/{created.id}"' in page
    assert ">Pay</button>" in page
    assert "5.00 USD" in page


def test_checkout_page_pay_redirects(
    webhook_server: tuple[RunningServer, WebhookReceiver],
) -> None:
    running, _receiver = webhook_server
    created = create_session(api_key=SECRET_KEY)

    status, headers, _body = http_request(running, "POST", f"/pay/{created.id}")

    assert status == 303
    assert headers["location"] == SUCCESS_URL.replace("{CHECKOUT_SESSION_ID}", created.id)
    assert running.app.state.get_session(created.id)["payment_status"] == "paid"


def test_checkout_page_delivers_signed_event(
    webhook_server: tuple[RunningServer, WebhookReceiver],
) -> None:
    running, receiver = webhook_server
    created = create_session(api_key=SECRET_KEY)

    http_request(running, "POST", f"/pay/{created.id}")

    assert len(receiver.requests) == 1
    delivered = receiver.requests[0]
    assert delivered["headers"]["Content-Type"] == "application/json; charset=utf-8"
    event = stripe.Webhook.construct_event(
        delivered["body"], delivered["headers"]["Stripe-Signature"], WEBHOOK_SECRET
    )
    assert event.type == "checkout.session.completed"
    assert event.data.object.id == created.id
    assert event.data.object.payment_status == "paid"
    assert event.pending_webhooks == 1


def test_webhook_target_can_call_back(
    webhook_server: tuple[RunningServer, WebhookReceiver],
) -> None:
    running, receiver = webhook_server
    created = create_session(api_key=SECRET_KEY)

    _status, result = control_post(running, f"/_test/sessions/{created.id}/pay")

    callback_status, callback_session = receiver.requests[0]["callback"]
    assert callback_status == 200
    assert callback_session["payment_status"] == "paid"
    assert result["webhook_delivery"]["status"] == 200
    assert result["webhook_delivery"]["ok"] is True
    assert running.app.state.get_event(result["event"]["id"])["pending_webhooks"] == 0


def test_checkout_page_paid_session_conflict(
    webhook_server: tuple[RunningServer, WebhookReceiver],
) -> None:
    running, receiver = webhook_server
    created = create_session(api_key=SECRET_KEY)
    http_request(running, "POST", f"/pay/{created.id}")

    status, _headers, body = http_request(running, "POST", f"/pay/{created.id}")

    assert status == 409
    assert "complete" in body.decode()
    assert len(receiver.requests) == 1


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_failed_delivery_recorded() -> None:
    running, stop = start_server(
        webhook_url=f"http://127.0.0.1:{unused_port()}/webhook/", webhook_secret=WEBHOOK_SECRET
    )
    try:
        saved_base = stripe.api_base
        stripe.api_base = running.base_url
        try:
            created = create_session(api_key=SECRET_KEY)
        finally:
            stripe.api_base = saved_base

        status, headers, _body = http_request(running, "POST", f"/pay/{created.id}")
        deliveries = running.app.state.webhook_deliveries()
    finally:
        stop()

    assert status == 303
    assert headers["location"].endswith(created.id)
    assert len(deliveries) == 1
    assert deliveries[0]["ok"] is False
    assert deliveries[0]["status"] is None
    assert deliveries[0]["error"]


# --- Refunds and disputes --------------------------------------------------------------


def paid_charge(server: RunningServer, **overrides: Any) -> tuple[str, stripe.Charge]:
    """Create and pay a USD 5.00 session; return its id and its charge."""
    created = create_session(**overrides)
    control_post(server, f"/_test/sessions/{created.id}/pay")
    session = stripe.checkout.Session.retrieve(created.id, expand=["payment_intent"])
    return created.id, stripe.Charge.retrieve(session.payment_intent.latest_charge)


def form_post(server: RunningServer, path: str, fields: dict[str, Any]) -> tuple[int, Any]:
    body = urllib.parse.urlencode(fields).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _headers, raw = http_request(server, "POST", path, body, headers)
    return status, json.loads(raw)


def test_partial_refunds_add_up_on_charge(stripe_api: RunningServer) -> None:
    session_id, charge = paid_charge(stripe_api)

    status, first = form_post(stripe_api, f"/_test/sessions/{session_id}/refund", {"amount": 300})
    _status, second = control_post(stripe_api, f"/_test/sessions/{session_id}/refund")

    assert status == 200
    assert re.fullmatch(r"re_[A-Za-z0-9]+", first["refund"]["id"])
    assert first["refund"]["amount"] == 300
    assert first["refund"]["charge"] == charge.id
    assert first["refund"]["payment_intent"] == charge.payment_intent
    assert first["refund"]["status"] == "succeeded"
    assert first["refund"]["reason"] == "requested_by_customer"
    assert first["dispute"] is None
    assert first["webhook_delivery"] is None
    assert (first["charge"]["amount_refunded"], first["charge"]["refunded"]) == (300, False)
    assert first["event"]["type"] == "charge.refunded"
    assert first["event"]["data"]["object"]["amount_refunded"] == 300
    assert first["event"]["data"]["previous_attributes"] == {"amount_refunded": 0}
    # Without an amount, the rest of the charge is refunded.
    assert second["refund"]["amount"] == 200
    assert (second["charge"]["amount_refunded"], second["charge"]["refunded"]) == (500, True)
    assert second["event"]["data"]["previous_attributes"] == {
        "amount_refunded": 300,
        "refunded": False,
    }
    retrieved = stripe.Charge.retrieve(charge.id)
    assert (retrieved.amount_refunded, retrieved.refunded) == (500, True)
    assert "refunds" not in retrieved
    assert stripe.Event.retrieve(second["event"]["id"]).type == "charge.refunded"


def test_refunds_list_newest_first_in_pages(stripe_api: RunningServer) -> None:
    session_id, charge = paid_charge(stripe_api)
    _other_session, other_charge = paid_charge(stripe_api)
    ids = [
        form_post(stripe_api, f"/_test/sessions/{session_id}/refund", {"amount": 100})[1][
            "refund"
        ]["id"]
        for _ in range(3)
    ]

    first_page = stripe.Refund.list(charge=charge.id, limit=2)
    everything = list(stripe.Refund.list(charge=charge.id, limit=2).auto_paging_iter())
    by_intent = stripe.Refund.list(payment_intent=charge.payment_intent)
    expanded = stripe.Charge.retrieve(charge.id, expand=["refunds"])

    assert [refund.id for refund in first_page.data] == [ids[2], ids[1]]
    assert first_page.has_more is True
    assert [refund.id for refund in everything] == ids[::-1]
    assert [refund.id for refund in by_intent.data] == ids[::-1]
    assert by_intent.has_more is False
    assert [refund.id for refund in expanded.refunds.data] == ids[::-1]
    assert stripe.Refund.list(charge=other_charge.id).data == []
    assert stripe.Refund.retrieve(ids[0]).amount == 100


def test_refund_create_through_api(stripe_api: RunningServer) -> None:
    _session_id, charge = paid_charge(stripe_api)

    refund = stripe.Refund.create(
        payment_intent=charge.payment_intent,
        amount=125,
        reason="duplicate",
        metadata={"ticket": "42"},
        expand=["balance_transaction"],
    )

    assert refund.object == "refund"
    assert refund.amount == 125
    assert refund.charge == charge.id
    assert refund.reason == "duplicate"
    assert refund.metadata.to_dict() == {"ticket": "42"}
    assert refund.balance_transaction.amount == -125
    assert refund.balance_transaction.type == "refund"
    assert refund.balance_transaction.source == refund.id
    assert stripe.Charge.retrieve(charge.id).amount_refunded == 125
    events = [
        event
        for event in stripe_api.app.state.events()
        if event["type"] == "charge.refunded" and event["data"]["object"]["id"] == charge.id
    ]
    assert len(events) == 1
    assert events[0]["request"]["id"] is not None


@pytest.mark.parametrize(
    ("params", "code", "param"),
    [
        ({"amount": 501}, "amount_too_large", "amount"),
        ({"amount": 0}, "parameter_invalid", "amount"),
        ({"reason": "changed_mind"}, "parameter_invalid", "reason"),
        ({"currency": "eur"}, "parameter_unknown", "currency"),
    ],
)
def test_refund_create_rejects_bad_params(
    stripe_api: RunningServer, params: dict[str, Any], code: str, param: str
) -> None:
    _session_id, charge = paid_charge(stripe_api)

    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe.Refund.create(charge=charge.id, **params)

    assert caught.value.http_status == 400
    assert caught.value.code == code
    assert caught.value.param == param
    assert stripe.Charge.retrieve(charge.id).amount_refunded == 0
    assert stripe.Refund.list(charge=charge.id).data == []


def test_refund_rejects_unrefundable_charge(stripe_api: RunningServer) -> None:
    _session_id, charge = paid_charge(stripe_api)
    stripe.Refund.create(charge=charge.id)
    unpaid = create_session()

    with pytest.raises(stripe.InvalidRequestError) as refunded:
        stripe.Refund.create(charge=charge.id, amount=1)
    with pytest.raises(stripe.InvalidRequestError) as missing:
        stripe.Refund.create(charge="ch_missing")
    with pytest.raises(stripe.InvalidRequestError) as neither:
        stripe.Refund.create(amount=100)
    status, not_paid = control_post(stripe_api, f"/_test/sessions/{unpaid.id}/refund")

    assert refunded.value.code == "charge_already_refunded"
    assert missing.value.http_status == 404
    assert missing.value.code == "resource_missing"
    assert neither.value.code == "parameter_missing"
    assert status == 400
    assert not_paid["error"]["code"] == "checkout_session_not_paid"


def test_bank_debit_refund_is_pending(stripe_api: RunningServer) -> None:
    created = create_session()
    control_post(stripe_api, f"/_test/sessions/{created.id}/pay_async")
    control_post(stripe_api, f"/_test/sessions/{created.id}/async_succeeded")

    _status, result = control_post(stripe_api, f"/_test/sessions/{created.id}/refund")

    assert result["refund"]["status"] == "pending"
    assert result["refund"]["destination_details"]["type"] == "us_bank_account"


def test_list_rejects_unknown_cursor_and_limit(stripe_api: RunningServer) -> None:
    with pytest.raises(stripe.InvalidRequestError) as cursor:
        stripe.Refund.list(starting_after="re_missing")
    with pytest.raises(stripe.InvalidRequestError) as limit:
        stripe.Refund.list(limit=101)

    assert cursor.value.code == "resource_missing"
    assert cursor.value.param == "starting_after"
    assert limit.value.param == "limit"


def test_dispute_opens_then_is_won(stripe_api: RunningServer) -> None:
    session_id, charge = paid_charge(stripe_api)

    status, opened = control_post(stripe_api, f"/_test/sessions/{session_id}/dispute")
    dispute_id = opened["dispute"]["id"]
    retrieved = stripe.Dispute.retrieve(dispute_id)

    assert status == 200
    assert re.fullmatch(r"dp_[A-Za-z0-9]+", dispute_id)
    assert opened["event"]["type"] == "charge.dispute.created"
    assert opened["event"]["data"]["object"]["id"] == dispute_id
    assert opened["charge"]["disputed"] is True
    assert retrieved.status == "needs_response"
    assert retrieved.amount == 500
    assert retrieved.charge == charge.id
    assert retrieved.payment_intent == charge.payment_intent
    assert retrieved.reason == "fraudulent"
    assert retrieved.is_charge_refundable is False
    withdrawal = retrieved.balance_transactions[0]
    assert (withdrawal.amount, withdrawal.fee, withdrawal.net) == (-500, 1500, -2000)
    assert withdrawal.reporting_category == "dispute"
    assert [d.id for d in stripe.Dispute.list(charge=charge.id).data] == [dispute_id]

    _status, closed = form_post(
        stripe_api, f"/_test/disputes/{dispute_id}/close", {"status": "won"}
    )

    assert closed["event"]["type"] == "charge.dispute.closed"
    assert closed["event"]["data"]["previous_attributes"] == {"status": "needs_response"}
    assert closed["dispute"]["status"] == "won"
    reinstated = stripe.Dispute.retrieve(dispute_id).balance_transactions[1]
    assert (reinstated.amount, reinstated.net) == (500, 500)
    assert reinstated.reporting_category == "dispute_reversal"
    # A won dispute leaves the charge refundable.
    assert stripe.Refund.create(charge=charge.id, amount=100).amount == 100


def test_lost_dispute_blocks_refunds_and_closes_once(stripe_api: RunningServer) -> None:
    session_id, charge = paid_charge(stripe_api)
    _status, opened = form_post(
        stripe_api,
        f"/_test/sessions/{session_id}/dispute",
        {"amount": 200, "reason": "product_not_received"},
    )
    dispute_id = opened["dispute"]["id"]

    bad_status, bad = form_post(
        stripe_api, f"/_test/disputes/{dispute_id}/close", {"status": "maybe"}
    )
    _status, lost = form_post(
        stripe_api, f"/_test/disputes/{dispute_id}/close", {"status": "lost"}
    )
    again_status, again = form_post(
        stripe_api, f"/_test/disputes/{dispute_id}/close", {"status": "won"}
    )
    second_status, second = control_post(stripe_api, f"/_test/sessions/{session_id}/dispute")
    with pytest.raises(stripe.InvalidRequestError) as refund:
        stripe.Refund.create(charge=charge.id)

    assert opened["dispute"]["amount"] == 200
    assert opened["dispute"]["reason"] == "product_not_received"
    assert (bad_status, bad["error"]["param"]) == (400, "status")
    assert lost["dispute"]["status"] == "lost"
    assert len(lost["dispute"]["balance_transactions"]) == 1
    assert (again_status, again["error"]["code"]) == (400, "dispute_already_closed")
    assert (second_status, second["error"]["code"]) == (400, "charge_already_disputed")
    assert refund.value.code == "charge_disputed"
    assert stripe.Dispute.retrieve(dispute_id).status == "lost"


def test_refund_and_dispute_events_delivered_signed(
    webhook_server: tuple[RunningServer, WebhookReceiver],
) -> None:
    running, receiver = webhook_server
    created = create_session(api_key=SECRET_KEY)
    control_post(running, f"/_test/sessions/{created.id}/pay")

    _status, refunded = form_post(running, f"/_test/sessions/{created.id}/refund", {"amount": 1})
    _status, disputed = control_post(running, f"/_test/sessions/{created.id}/dispute")

    assert refunded["webhook_delivery"]["ok"] is True
    assert disputed["webhook_delivery"]["ok"] is True
    types = []
    for delivered in receiver.requests:
        event = stripe.Webhook.construct_event(
            delivered["body"], delivered["headers"]["Stripe-Signature"], WEBHOOK_SECRET
        )
        types.append(event.type)
    assert types == ["checkout.session.completed", "charge.refunded", "charge.dispute.created"]


def test_api_refund_delivered_in_background(
    webhook_server: tuple[RunningServer, WebhookReceiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    running, receiver = webhook_server
    monkeypatch.setattr(stripe, "api_key", SECRET_KEY)
    _session_id, charge = paid_charge(running)

    refund = stripe.Refund.create(charge=charge.id, amount=50)

    deadline = time.monotonic() + 10
    while len(receiver.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    event = json.loads(receiver.requests[1]["body"])
    assert event["type"] == "charge.refunded"
    assert event["data"]["object"]["amount_refunded"] == 50
    assert refund.amount == 50


def test_webhook_target_can_be_set_and_cleared() -> None:
    receiver = WebhookReceiver()
    running, stop = start_server()
    saved_base = stripe.api_base
    stripe.api_base = running.base_url
    try:
        first = create_session(api_key=SECRET_KEY)
        second = create_session(api_key=SECRET_KEY)
        half_status, half = form_post(running, "/_test/webhook_endpoint", {"url": receiver.url})
        set_status, target = form_post(
            running,
            "/_test/webhook_endpoint",
            {"url": receiver.url, "secret": WEBHOOK_SECRET},
        )
        _status, paid = control_post(running, f"/_test/sessions/{first.id}/pay")
        _status, cleared = control_post(running, "/_test/webhook_endpoint")
        _status, unsent = control_post(running, f"/_test/sessions/{second.id}/pay")
    finally:
        stripe.api_base = saved_base
        stop()
        receiver.close()

    assert half_status == 400
    assert "secret" in half["error"]["message"]
    assert (set_status, target) == (200, {"webhook_url": receiver.url})
    assert paid["webhook_delivery"]["ok"] is True
    assert paid["event"]["pending_webhooks"] == 1
    assert cleared == {"webhook_url": None}
    assert unsent["webhook_delivery"] is None
    assert len(receiver.requests) == 1
