"""Serve a local stand-in for the parts of the Stripe API that Tollbooth uses.

Stripe cannot be reached from development and CI machines, so the portal, its tests
and the demo point ``stripe.api_base`` (``STRIPE_API_HOST`` for dj-stripe) here. Start
it with::

    python -m devtools.stripe_server --host 127.0.0.1 --port 12111 \\
        --webhook-url http://127.0.0.1:8000/stripe/webhook/<uuid>/ --webhook-secret whsec_...

or, inside a test, with ``run_in_thread()``. ``build_app()`` returns the bare ASGI app.
State lives in memory and is lost when the process stops.

Stripe API endpoints. Requests are form-encoded as stripe-python sends them, responses
are JSON objects in Stripe's shapes, and every ``/v1`` request needs
``Authorization: Bearer sk_test_...`` (or ``rk_test_...``):

    POST /v1/checkout/sessions                 create a payment-mode Checkout Session
    GET  /v1/checkout/sessions/<id>            retrieve a session, honouring ``expand[]``
    GET  /v1/checkout/sessions/<id>/line_items list a session's line items
    POST /v1/checkout/sessions/<id>/expire     expire an open session
    GET  /v1/account                           the single test account
    GET  /v1/payment_intents/<id>              also charges, payment_methods, refunds,
                                               disputes, balance_transactions, events,
                                               customers; ``expand[]=refunds`` lists a
                                               charge's refunds
    POST /v1/refunds                           refund a charge or payment intent, all
                                               or ``amount``; emits ``charge.refunded``
    GET  /v1/refunds                           list refunds, newest first, filtered by
                                               ``charge`` or ``payment_intent``, paged
                                               by ``limit`` and ``starting_after``
    GET  /v1/disputes                          list disputes, the same way

Control endpoints for tests and the demo (not part of Stripe, no authentication):

    GET  /_test/sessions/<id>                  the stored session
    POST /_test/sessions/<id>/pay              pay by card: status "complete", paid
    POST /_test/sessions/<id>/pay_async        pay with a delayed method: "complete", unpaid
    POST /_test/sessions/<id>/async_succeeded  the delayed payment succeeds: paid
    POST /_test/sessions/<id>/async_failed     the delayed payment fails: stays unpaid
    POST /_test/sessions/<id>/refund           refund the session's charge; form fields
                                               ``amount`` (cents, default all that is
                                               left) and ``reason``
    POST /_test/sessions/<id>/dispute          open a chargeback on the session's charge:
                                               ``amount`` (default the charge amount) and
                                               ``reason`` (default ``fraudulent``)
    POST /_test/disputes/<id>/close            close a dispute: ``status=won`` or ``lost``
    POST /_test/webhook_endpoint               set the webhook target (``url`` and
                                               ``secret``), or clear it with neither
    GET  /_test/events                         every generated event, oldest first
    POST /_test/events/<id>/deliver            send an event to the webhook target again
    GET  /_test/webhook_deliveries             every delivery attempt, oldest first
    POST /_test/reset                          forget all sessions, payments and events
    GET  /pay/<id>                             an HTML checkout page with a "Pay" button
    POST /pay/<id>                             pay by card, then 303 to the success_url

The four ``/_test/sessions`` actions return JSON with the ``session``, its
``payment_intent`` and ``charge`` (or null), the generated ``event`` and the
``webhook_delivery`` record (null when no webhook target is configured).
The refund and dispute actions return JSON with the ``charge``, the ``refund`` or
``dispute`` (the other one null), the ``event`` and the ``webhook_delivery``.

A refund adds to the charge's cumulative ``amount_refunded`` and sets ``refunded``
once the whole amount is refunded. Card refunds are ``succeeded`` at once, bank debit
refunds stay ``pending``. A dispute starts as ``needs_response`` with one balance
transaction withdrawing the amount plus a fee; winning it adds the reinstating balance
transaction. A charge with an open or lost dispute cannot be refunded, and a charge has
at most one dispute.

Each state change generates the event Stripe sends for it (``checkout.session.completed``,
``checkout.session.async_payment_succeeded``, ``checkout.session.async_payment_failed``,
``checkout.session.expired``, ``charge.refunded``, ``charge.dispute.created`` or
``charge.dispute.closed``) and keeps it for ``GET /v1/events/<id>``. With a webhook
target configured, the server POSTs the event there, signed like Stripe signs it. The
control endpoints and the HTML page wait for that delivery, so the purchase is recorded
by the time they return. The expire and refund API endpoints deliver in the
background, as Stripe does, because their caller may be the webhook target itself.
Delivery is tried once; use ``/_test/events/<id>/deliver`` to send an event again.

Tests can also build and sign events themselves with ``build_event()``,
``encode_event()`` and ``sign_payload()``, and read state through ``app.state``.

Known limits: only ``mode=payment`` sessions with inline ``price_data`` and
``unit_amount`` are supported. There are no customers, taxes or discounts, list
endpoints exist only for refunds and disputes, and there are no webhook retries. Of the
events Stripe sends around refunds and disputes, only the three above are generated
(no ``refund.created``, ``charge.refund.updated`` or ``charge.dispute.funds_*``), and
refunds never fail.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import copy
import hashlib
import hmac
import html
import json
import logging
import os
import re
import secrets
import socket
import string
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# API version of stripe-python 15.6.2, used only when neither dj-stripe nor stripe
# can be imported to tell the version they request.
FALLBACK_API_VERSION = "2026-08-26.dahlia"

# Long enough for a Django dev server whose webhook view syncs dj-stripe objects by
# calling back into this server.
WEBHOOK_TIMEOUT_SECONDS = 30.0
WEBHOOK_USER_AGENT = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"

MAX_BODY_BYTES = 1_000_000
SESSION_LIFETIME_SECONDS = 24 * 60 * 60
DEFAULT_CUSTOMER_EMAIL = "customer@example.com"
# NOTE: example values, not Stripe's terms: a response window and a USD 15.00 dispute fee.
DISPUTE_RESPONSE_SECONDS = 7 * 24 * 60 * 60
DISPUTE_FEE = 1500

REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
REFUND_CREATE_PARAMS = frozenset(
    {"amount", "charge", "expand", "metadata", "payment_intent", "reason"}
)
DISPUTE_REASONS = frozenset(
    {
        "bank_cannot_process",
        "check_returned",
        "credit_not_processed",
        "customer_initiated",
        "debit_not_authorized",
        "duplicate",
        "fraudulent",
        "general",
        "incorrect_account_details",
        "insufficient_funds",
        "product_not_received",
        "product_unacceptable",
        "subscription_canceled",
        "unrecognized",
    }
)
# Filters each list endpoint accepts besides limit, starting_after, ending_before and expand.
LIST_FILTERS = {"refund": ("charge", "payment_intent"), "dispute": ("charge", "payment_intent")}
MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 10

# Metadata limits from Stripe's API reference, docs.stripe.com/api/metadata.
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY_LENGTH = 40
MAX_METADATA_VALUE_LENGTH = 500
# NOTE: These three limits were not checked against Stripe's docs. Stripe also has a
# minimum charge for every currency, and only the USD one is checked here.
MAX_CLIENT_REFERENCE_ID_LENGTH = 200
MAX_AMOUNT = 99_999_999
MIN_USD_AMOUNT = 50

ZERO_DECIMAL_CURRENCIES = frozenset(
    "bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split()
)
THREE_DECIMAL_CURRENCIES = frozenset("bhd jod kwd omr tnd".split())

# Top-level Checkout Session create parameters that Stripe accepts. Any other name is
# rejected with "Received unknown parameter", as Stripe does, so typos surface here.
SESSION_CREATE_PARAMS = frozenset(
    {
        "adaptive_pricing",
        "after_expiration",
        "allow_promotion_codes",
        "automatic_tax",
        "billing_address_collection",
        "branding_settings",
        "cancel_url",
        "client_reference_id",
        "consent_collection",
        "currency",
        "custom_fields",
        "custom_text",
        "customer",
        "customer_account",
        "customer_creation",
        "customer_email",
        "customer_update",
        "discounts",
        "excluded_payment_method_types",
        "expand",
        "expires_at",
        "invoice_creation",
        "line_items",
        "locale",
        "metadata",
        "mode",
        "name_collection",
        "optional_items",
        "origin_context",
        "payment_intent_data",
        "payment_method_collection",
        "payment_method_configuration",
        "payment_method_data",
        "payment_method_options",
        "payment_method_types",
        "permissions",
        "phone_number_collection",
        "redirect_on_completion",
        "return_url",
        "saved_payment_method_options",
        "setup_intent_data",
        "shipping_address_collection",
        "shipping_options",
        "submit_type",
        "subscription_data",
        "success_url",
        "tax_id_collection",
        "ui_mode",
        "wallet_options",
    }
)

# Path segment of each retrievable collection, and the object type it serves.
COLLECTION_OBJECT_TYPES = {
    "checkout/sessions": "checkout.session",
    "payment_intents": "payment_intent",
    "charges": "charge",
    "payment_methods": "payment_method",
    "balance_transactions": "balance_transaction",
    "events": "event",
    "customers": "customer",
    "refunds": "refund",
    "disputes": "dispute",
}
# Names Stripe uses in its "No such ..." messages.
MISSING_OBJECT_NAMES = {
    "checkout.session": "checkout.session",
    "payment_intent": "payment_intent",
    "charge": "charge",
    "payment_method": "PaymentMethod",
    "balance_transaction": "balance transaction",
    "event": "event",
    "customer": "customer",
    "refund": "refund",
    "dispute": "dispute",
}

API_KEY_PATTERN = re.compile(r"^(sk|rk)_test_[A-Za-z0-9]+$")
_ID_ALPHABET = string.ascii_letters + string.digits


# --- Identifiers, time and JSON --------------------------------------------------------


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def now() -> int:
    return int(time.time())


def dump_json(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def default_api_version() -> str:
    """Return the API version dj-stripe sends, so generated events match its requests.

    dj-stripe 2.11 requests ``settings.STRIPE_API_VERSION``, else ``stripe.api_version``,
    else its ``DEFAULT_STRIPE_API_VERSION``. Its settings module needs configured Django
    settings, so without them this returns ``stripe.api_version``.
    """
    try:
        from django.conf import settings as django_settings

        if django_settings.configured:
            from djstripe.settings import djstripe_settings

            return djstripe_settings.STRIPE_API_VERSION
    except ImportError:
        pass
    try:
        import stripe
    except ImportError:
        return FALLBACK_API_VERSION
    return stripe.api_version or FALLBACK_API_VERSION


# --- Webhook events and signatures -----------------------------------------------------


def build_event(
    event_type: str,
    data_object: dict[str, Any],
    *,
    event_id: str | None = None,
    created: int | None = None,
    api_version: str | None = None,
    previous_attributes: dict[str, Any] | None = None,
    pending_webhooks: int = 0,
    request_id: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Build a Stripe ``event`` object around a copy of ``data_object``.

    ``api_version`` defaults to ``default_api_version()``. ``request_id`` and
    ``idempotency_key`` stay None for events that no API request caused, such as a
    customer paying on the checkout page.
    """
    data: dict[str, Any] = {"object": copy.deepcopy(data_object)}
    if previous_attributes is not None:
        data["previous_attributes"] = copy.deepcopy(previous_attributes)
    return {
        "id": event_id or new_id("evt_"),
        "object": "event",
        "api_version": api_version or default_api_version(),
        "created": now() if created is None else created,
        "data": data,
        "livemode": False,
        "pending_webhooks": pending_webhooks,
        "request": {"id": request_id, "idempotency_key": idempotency_key},
        "type": event_type,
    }


def encode_event(event: dict[str, Any]) -> bytes:
    """Serialize an event as the webhook request body, indented like Stripe's payloads."""
    return json.dumps(event, indent=2, ensure_ascii=False).encode("utf-8")


def sign_payload(payload: bytes | str, secret: str, timestamp: int | None = None) -> str:
    """Compute the ``Stripe-Signature`` header value for a webhook request body.

    The signature is the hex HMAC-SHA256 of ``"<timestamp>.<payload>"`` keyed with the
    whole endpoint secret, ``whsec_`` prefix included. ``timestamp`` is Unix seconds and
    defaults to now, because receivers reject signatures older than their tolerance.
    """
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    signed_at = now() if timestamp is None else int(timestamp)
    message = str(signed_at).encode("ascii") + b"." + payload
    digest = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()
    return f"t={signed_at},v1={digest}"


class _RejectRedirects(urllib.request.HTTPRedirectHandler):
    # Stripe's webhook docs count any 3xx reply as a failed delivery, so none is followed.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def deliver_event(
    url: str, event: dict[str, Any], secret: str, *, timeout: float = WEBHOOK_TIMEOUT_SECONDS
) -> dict[str, Any]:
    """POST a signed event to a webhook endpoint and return a record of the attempt.

    The record has ``event_id``, ``url``, ``status`` (None if no HTTP response came
    back), ``ok`` (a 2xx status), ``error`` and the first 2000 characters of the
    response body. Environment proxies are ignored because targets are local servers.
    """
    payload = encode_event(event)
    request = urllib.request.Request(
        url,
        data=payload,
        method="POST",
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": sign_payload(payload, secret),
            "User-Agent": WEBHOOK_USER_AGENT,
            "Cache-Control": "no-cache",
        },
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _RejectRedirects())
    record: dict[str, Any] = {
        "event_id": event["id"],
        "event_type": event["type"],
        "url": url,
        "attempted_at": now(),
        "status": None,
        "ok": False,
        "error": None,
        "response_body": "",
    }
    try:
        with opener.open(request, timeout=timeout) as response:
            record["status"] = response.status
            record["response_body"] = response.read(2000).decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        record["status"] = error.code
        record["response_body"] = error.read(2000).decode("utf-8", "replace")
        record["error"] = f"HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        record["error"] = f"{type(error).__name__}: {error}"
    record["ok"] = record["status"] is not None and 200 <= record["status"] < 300

    if record["ok"]:
        logger.info("Delivered %s %s to %s", event["type"], event["id"], url)
    else:
        logger.warning(
            "Webhook delivery of %s %s to %s failed: %s",
            event["type"],
            event["id"],
            url,
            record["error"],
        )
    return record


# --- Request parsing and errors --------------------------------------------------------


class StripeApiError(Exception):
    """An error that the server returns in Stripe's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.error_type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def missing_param(param: str) -> StripeApiError:
    return StripeApiError(
        400, f"Missing required param: {param}.", code="parameter_missing", param=param
    )


def invalid_param(param: str, message: str) -> StripeApiError:
    return StripeApiError(400, message, code="parameter_invalid", param=param)


def no_such_object(object_type: str, object_id: str) -> StripeApiError:
    name = MISSING_OBJECT_NAMES.get(object_type, object_type)
    return StripeApiError(
        404, f"No such {name}: '{object_id}'", code="resource_missing", param="id"
    )


def split_form_key(key: str) -> list[str]:
    """Split ``a[b][0]`` into ``["a", "b", "0"]``, with ``""`` for an empty ``[]``."""
    head, bracket, rest = key.partition("[")
    if not bracket:
        return [key]
    if not rest.endswith("]"):
        raise StripeApiError(400, f"Invalid parameter name: {key}")
    return [head, *rest[:-1].split("][")]


def _lists_from_indexed_dicts(value: Any, parent_key: str | None = None) -> Any:
    # Form encoding has no arrays, so stripe-python sends list items as ``key[0]``,
    # ``key[1]``. Metadata keys stay a dict even when they look like indexes.
    if not isinstance(value, dict):
        return value
    converted = {
        key: _lists_from_indexed_dicts(item, parent_key=key) for key, item in value.items()
    }
    if parent_key != "metadata" and converted and all(key.isdigit() for key in converted):
        return [converted[key] for key in sorted(converted, key=int)]
    return converted


def parse_form(text: str) -> dict[str, Any]:
    """Decode Stripe's bracketed form encoding into nested dicts and lists of strings."""
    root: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(text, keep_blank_values=True):
        parts = split_form_key(key)
        node = root
        for depth, part in enumerate(parts):
            if part == "":
                part = str(len(node))
            if depth == len(parts) - 1:
                if isinstance(node.get(part), dict):
                    raise StripeApiError(400, f"Invalid value for {key}: expected an object.")
                node[part] = value
                break
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise StripeApiError(400, f"Invalid value for {key}: {parts[0]} is not an object.")
            node = child
    return _lists_from_indexed_dicts(root)


@dataclass
class Request:
    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    body: bytes
    base_url: str
    request_id: str = field(default_factory=lambda: new_id("req_", 14))

    def query(self) -> dict[str, Any]:
        return parse_form(self.query_string)

    def form(self) -> dict[str, Any]:
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise StripeApiError(400, "Invalid request body: it is not UTF-8.") from error
        return parse_form(text)

    def params(self) -> dict[str, Any]:
        """Return the query parameters for GET and the form body for other methods."""
        return self.query() if self.method == "GET" else self.form()


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(status, dump_json(payload), headers=list(headers))


def html_response(status: int, markup: str) -> Response:
    return Response(status, markup.encode("utf-8"), content_type="text/html; charset=utf-8")


def api_key_from_headers(headers: dict[str, str]) -> str:
    """Return the test secret key of a request, or raise the 401 Stripe returns."""
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    key = ""
    if scheme.lower() == "bearer":
        key = credentials.strip()
    elif scheme.lower() == "basic":
        # curl -u sk_test_...: sends the key as the Basic auth user name.
        try:
            key = base64.b64decode(credentials).decode("utf-8").partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            key = ""
    if not key:
        raise StripeApiError(
            401,
            "You did not provide an API key. You need to provide your API key in the "
            "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
            "sk_test_...').",
        )
    if not API_KEY_PATTERN.match(key):
        raise StripeApiError(
            401,
            f"Invalid API Key provided: {redact_key(key)}. This local Stripe server "
            "accepts test-mode secret or restricted keys (sk_test_... or rk_test_...).",
        )
    return key


def redact_key(key: str) -> str:
    prefix, _, secret_part = key.rpartition("_")
    return f"{prefix}_****{secret_part[-4:]}" if prefix else "****"


# --- Checkout Session parameters -------------------------------------------------------


def expand_paths(params: dict[str, Any]) -> list[str]:
    expand = params.get("expand") or []
    if not isinstance(expand, list) or not all(isinstance(path, str) for path in expand):
        raise invalid_param("expand", "Invalid array: expand must be a list of strings.")
    return expand


def require_string(params: dict[str, Any], name: str, *, label: str | None = None) -> str:
    label = label or name
    value = params.get(name)
    if value is None or value == "":
        raise missing_param(label)
    if not isinstance(value, str):
        raise invalid_param(label, f"Invalid string: {label} must be a string.")
    return value


def optional_string(params: dict[str, Any], name: str, *, label: str | None = None) -> str | None:
    label = label or name
    value = params.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise invalid_param(label, f"Invalid string: {label} must be a string.")
    return value


def parse_integer(value: Any, param: str, *, minimum: int) -> int:
    if not isinstance(value, str) or not re.fullmatch(r"-?\d+", value):
        raise invalid_param(param, f"Invalid integer: {value!r}")
    number = int(value)
    if number < minimum:
        raise invalid_param(param, f"Invalid {param}: must be at least {minimum}.")
    return number


def parse_url(params: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = require_string(params, name) if required else optional_string(params, name)
    if value is None:
        return None
    # The literal placeholder is not valid in a URL, so check a substituted copy.
    parts = urllib.parse.urlsplit(value.replace("{CHECKOUT_SESSION_ID}", "cs_test_placeholder"))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise invalid_param(name, f"Not a valid URL: {value}")
    return value


def parse_metadata(value: Any, param: str) -> dict[str, str]:
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise invalid_param(param, f"Invalid object: {param} must be a hash of key/value pairs.")
    if len(value) > MAX_METADATA_KEYS:
        raise invalid_param(param, f"Invalid {param}: at most {MAX_METADATA_KEYS} keys allowed.")
    metadata: dict[str, str] = {}
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY_LENGTH:
            raise invalid_param(
                f"{param}[{key}]",
                f"Invalid {param}: keys can be at most {MAX_METADATA_KEY_LENGTH} characters.",
            )
        if not isinstance(item, str):
            raise invalid_param(f"{param}[{key}]", f"Invalid {param}: values must be strings.")
        if len(item) > MAX_METADATA_VALUE_LENGTH:
            raise invalid_param(
                f"{param}[{key}]",
                f"Invalid {param}: values can be at most {MAX_METADATA_VALUE_LENGTH} characters.",
            )
        # Stripe treats an empty value as "unset this key".
        if item != "":
            metadata[key] = item
    return metadata


def parse_line_item(raw: Any, index: int) -> dict[str, Any]:
    """Validate one ``line_items[i]`` entry and return its currency, amounts and name."""
    prefix = f"line_items[{index}]"
    if not isinstance(raw, dict):
        raise invalid_param(prefix, f"Invalid object: {prefix} must be a hash.")
    if raw.get("price"):
        raise StripeApiError(
            400,
            f"No such price: '{raw['price']}'. This local Stripe server stores no prices, "
            f"so use {prefix}[price_data] instead.",
            code="resource_missing",
            param=f"{prefix}[price]",
        )
    price_data = raw.get("price_data")
    if not price_data:
        raise missing_param(f"{prefix}[price_data]")
    if not isinstance(price_data, dict):
        raise invalid_param(
            f"{prefix}[price_data]",
            f"Invalid object: {prefix}[price_data] must be a hash with currency, "
            "unit_amount and product_data.",
        )
    price_prefix = f"{prefix}[price_data]"

    currency = require_string(price_data, "currency", label=f"{price_prefix}[currency]").lower()
    if not re.fullmatch(r"[a-z]{3}", currency):
        raise invalid_param(f"{price_prefix}[currency]", f"Invalid currency: {currency}")
    if price_data.get("recurring"):
        raise invalid_param(
            f"{price_prefix}[recurring]",
            "You must be in subscription mode to specify a recurring price.",
        )
    if price_data.get("unit_amount_decimal") is not None:
        raise invalid_param(
            f"{price_prefix}[unit_amount_decimal]",
            "This local Stripe server supports unit_amount only, not unit_amount_decimal.",
        )
    if price_data.get("unit_amount") is None:
        raise missing_param(f"{price_prefix}[unit_amount]")
    unit_amount = parse_integer(
        price_data["unit_amount"], f"{price_prefix}[unit_amount]", minimum=0
    )

    product_data = price_data.get("product_data")
    if price_data.get("product"):
        raise StripeApiError(
            400,
            f"No such product: '{price_data['product']}'. This local Stripe server stores "
            f"no products, so use {price_prefix}[product_data] instead.",
            code="resource_missing",
            param=f"{price_prefix}[product]",
        )
    if not isinstance(product_data, dict):
        raise missing_param(f"{price_prefix}[product_data]")
    name = require_string(product_data, "name", label=f"{price_prefix}[product_data][name]")

    if raw.get("quantity") is None:
        raise missing_param(f"{prefix}[quantity]")
    quantity = parse_integer(raw["quantity"], f"{prefix}[quantity]", minimum=1)

    return {
        "currency": currency,
        "unit_amount": unit_amount,
        "quantity": quantity,
        "amount": unit_amount * quantity,
        "name": name,
        "description": optional_string(product_data, "description"),
        "product_metadata": parse_metadata(
            product_data.get("metadata"), f"{price_prefix}[product_data][metadata]"
        ),
        "tax_behavior": price_data.get("tax_behavior") or "unspecified",
    }


def parse_session_params(params: dict[str, Any]) -> dict[str, Any]:
    """Validate Checkout Session create parameters the way Stripe rejects bad ones."""
    for name in params:
        if name not in SESSION_CREATE_PARAMS:
            raise StripeApiError(
                400,
                f"Received unknown parameter: {name}",
                code="parameter_unknown",
                param=name,
            )

    mode = require_string(params, "mode")
    if mode not in ("payment", "setup", "subscription"):
        raise invalid_param("mode", "Invalid mode: must be one of payment, setup or subscription.")
    if mode != "payment":
        raise invalid_param("mode", "This local Stripe server supports mode=payment only.")
    ui_mode = optional_string(params, "ui_mode") or "hosted"
    if ui_mode != "hosted":
        raise invalid_param("ui_mode", "This local Stripe server supports ui_mode=hosted only.")

    raw_items = params.get("line_items")
    if not raw_items:
        raise missing_param("line_items")
    if not isinstance(raw_items, list):
        raise invalid_param("line_items", "Invalid array: line_items must be a list.")
    items = [parse_line_item(raw, index) for index, raw in enumerate(raw_items)]
    currencies = {item["currency"] for item in items}
    if len(currencies) > 1:
        raise invalid_param("line_items", "All line items must use the same currency.")
    currency = items[0]["currency"]
    amount = sum(item["amount"] for item in items)
    if amount > MAX_AMOUNT:
        raise invalid_param("line_items", f"The total amount must be at most {MAX_AMOUNT}.")
    if currency == "usd" and amount < MIN_USD_AMOUNT:
        raise invalid_param(
            "line_items",
            "The Checkout Session's total amount due must add up to at least $0.50 usd.",
        )

    client_reference_id = optional_string(params, "client_reference_id")
    if (
        client_reference_id is not None
        and len(client_reference_id) > MAX_CLIENT_REFERENCE_ID_LENGTH
    ):
        raise invalid_param(
            "client_reference_id",
            f"client_reference_id can be at most {MAX_CLIENT_REFERENCE_ID_LENGTH} characters.",
        )
    customer_email = optional_string(params, "customer_email")
    if customer_email is not None and not re.fullmatch(
        r"[^@\s]+@[^@\s]+\.[^@\s]+", customer_email
    ):
        raise invalid_param("customer_email", f"Invalid email address: {customer_email}")
    if params.get("customer"):
        raise StripeApiError(
            400,
            f"No such customer: '{params['customer']}'. This local Stripe server stores "
            "no customers.",
            code="resource_missing",
            param="customer",
        )

    payment_intent_data = params.get("payment_intent_data") or {}
    if not isinstance(payment_intent_data, dict):
        raise invalid_param(
            "payment_intent_data",
            "Invalid object: payment_intent_data must be a hash, such as "
            "payment_intent_data[metadata][key]=value.",
        )

    payment_method_types = params.get("payment_method_types") or ["card"]
    if not isinstance(payment_method_types, list):
        raise invalid_param(
            "payment_method_types",
            "Invalid array: payment_method_types must be a list, such as "
            "payment_method_types[0]=card.",
        )

    created = now()
    expires_at = created + SESSION_LIFETIME_SECONDS
    if params.get("expires_at"):
        # Stripe accepts 30 minutes to 24 hours after creation.
        expires_at = parse_integer(params["expires_at"], "expires_at", minimum=created + 1800)
        if expires_at > created + SESSION_LIFETIME_SECONDS:
            raise invalid_param(
                "expires_at", "expires_at can be at most 24 hours after the session is created."
            )

    expand_paths(params)
    return {
        "mode": mode,
        "items": items,
        "currency": currency,
        "amount": amount,
        "created": created,
        "expires_at": expires_at,
        "success_url": parse_url(params, "success_url", required=True),
        "cancel_url": parse_url(params, "cancel_url", required=False),
        "client_reference_id": client_reference_id,
        "customer_email": customer_email,
        "metadata": parse_metadata(params.get("metadata"), "metadata"),
        "payment_intent_metadata": parse_metadata(
            payment_intent_data.get("metadata"), "payment_intent_data[metadata]"
        ),
        "payment_intent_description": optional_string(payment_intent_data, "description"),
        "payment_method_types": payment_method_types,
        "locale": optional_string(params, "locale"),
        "submit_type": optional_string(params, "submit_type"),
        "billing_address_collection": optional_string(params, "billing_address_collection"),
        "allow_promotion_codes": params.get("allow_promotion_codes") == "true" or None,
    }


# --- Refund, dispute and list parameters -----------------------------------------------


def reject_unknown_params(params: dict[str, Any], allowed: Iterable[str]) -> None:
    allowed = set(allowed)
    for name in params:
        if name not in allowed:
            raise StripeApiError(
                400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name
            )


def optional_amount(params: dict[str, Any]) -> int | None:
    if params.get("amount") in (None, ""):
        return None
    return parse_integer(params["amount"], "amount", minimum=1)


def optional_choice(
    params: dict[str, Any], name: str, choices: Iterable[str], default: str | None = None
) -> str | None:
    value = optional_string(params, name)
    if value is None:
        return default
    if value not in choices:
        raise invalid_param(name, f"Invalid {name}: must be one of {', '.join(sorted(choices))}.")
    return value


def parse_refund_params(params: dict[str, Any]) -> dict[str, Any]:
    """Validate ``POST /v1/refunds`` parameters: a charge or payment intent, and an amount."""
    reject_unknown_params(params, REFUND_CREATE_PARAMS)
    charge_id = optional_string(params, "charge")
    payment_intent_id = optional_string(params, "payment_intent")
    if charge_id is None and payment_intent_id is None:
        raise StripeApiError(
            400,
            "One of the following params should be provided for this request: "
            "payment_intent or charge.",
            code="parameter_missing",
        )
    expand_paths(params)
    return {
        "charge_id": charge_id,
        "payment_intent_id": payment_intent_id,
        "amount": optional_amount(params),
        "reason": optional_choice(params, "reason", REFUND_REASONS),
        "metadata": parse_metadata(params.get("metadata"), "metadata"),
    }


def parse_list_params(params: dict[str, Any], object_type: str) -> dict[str, Any]:
    """Validate list parameters: the type's filters, ``limit`` and one cursor."""
    filters = LIST_FILTERS[object_type]
    reject_unknown_params(params, ("limit", "starting_after", "ending_before", "expand", *filters))
    limit = DEFAULT_LIST_LIMIT
    if params.get("limit") not in (None, ""):
        limit = parse_integer(params["limit"], "limit", minimum=1)
        if limit > MAX_LIST_LIMIT:
            raise invalid_param("limit", f"Invalid limit: must be at most {MAX_LIST_LIMIT}.")
    starting_after = optional_string(params, "starting_after")
    ending_before = optional_string(params, "ending_before")
    if starting_after and ending_before:
        raise StripeApiError(
            400, "You may only specify one of these parameters: starting_after, ending_before."
        )
    expand_paths(params)
    return {
        "filters": {name: value for name in filters if (value := optional_string(params, name))},
        "limit": limit,
        "starting_after": starting_after,
        "ending_before": ending_before,
    }


def list_page(
    objects: list[dict[str, Any]],
    url: str,
    *,
    object_type: str,
    limit: int,
    starting_after: str | None,
    ending_before: str | None,
) -> dict[str, Any]:
    """Cut one page out of ``objects`` (newest first) the way Stripe's cursors do."""
    ids = [obj["id"] for obj in objects]
    cursor = starting_after or ending_before
    if cursor is not None and cursor not in ids:
        param = "starting_after" if starting_after else "ending_before"
        name = MISSING_OBJECT_NAMES.get(object_type, object_type)
        raise StripeApiError(
            400, f"No such {name}: '{cursor}'", code="resource_missing", param=param
        )
    if starting_after is not None:
        window = objects[ids.index(starting_after) + 1 :]
        page = window[:limit]
    elif ending_before is not None:
        window = objects[: ids.index(ending_before)]
        page = window[-limit:]
    else:
        window = objects
        page = window[:limit]
    return {"object": "list", "data": page, "has_more": len(window) > limit, "url": url}


# --- Stripe objects --------------------------------------------------------------------


def null_address() -> dict[str, Any]:
    return {
        "city": None,
        "country": "US",
        "line1": None,
        "line2": None,
        "postal_code": "94103",
        "state": None,
    }


def account_object(account_id: str, created: int) -> dict[str, Any]:
    # Account objects have no livemode field, and dj-stripe reads its absence as
    # "this is the platform account". Branding files stay null so that dj-stripe does
    # not try to retrieve them.
    return {
        "id": account_id,
        "object": "account",
        "business_profile": {
            "annual_revenue": None,
            "estimated_worker_count": None,
            "mcc": "5734",
            "name": "Tollbooth (local Stripe)",
            "product_description": "Prepaid AI gateway credits",
            "support_address": None,
            "support_email": None,
            "support_phone": None,
            "support_url": None,
            "url": None,
        },
        "business_type": None,
        "capabilities": {"card_payments": "active", "transfers": "active"},
        "charges_enabled": True,
        "controller": {"type": "account"},
        "country": "US",
        "created": created,
        "default_currency": "usd",
        "details_submitted": True,
        "email": "owner@example.com",
        "external_accounts": {
            "object": "list",
            "data": [],
            "has_more": False,
            "total_count": 0,
            "url": f"/v1/accounts/{account_id}/external_accounts",
        },
        "future_requirements": {
            "alternatives": [],
            "current_deadline": None,
            "currently_due": [],
            "disabled_reason": None,
            "errors": [],
            "eventually_due": [],
            "past_due": [],
            "pending_verification": [],
        },
        "metadata": {},
        "payouts_enabled": True,
        "requirements": {
            "alternatives": [],
            "current_deadline": None,
            "currently_due": [],
            "disabled_reason": None,
            "errors": [],
            "eventually_due": [],
            "past_due": [],
            "pending_verification": [],
        },
        "settings": {
            "branding": {
                "icon": None,
                "logo": None,
                "primary_color": None,
                "secondary_color": None,
            },
            "card_payments": {
                "decline_on": {"avs_failure": False, "cvc_failure": False},
                "statement_descriptor_prefix": None,
                "statement_descriptor_prefix_kana": None,
                "statement_descriptor_prefix_kanji": None,
            },
            "dashboard": {"display_name": "Tollbooth (local Stripe)", "timezone": "Etc/UTC"},
            "payments": {
                "statement_descriptor": "TOLLBOOTH",
                "statement_descriptor_kana": None,
                "statement_descriptor_kanji": None,
            },
            "payouts": {
                "debit_negative_balances": True,
                "schedule": {"delay_days": 2, "interval": "daily"},
                "statement_descriptor": None,
            },
        },
        "tos_acceptance": {"date": None, "ip": None, "user_agent": None},
        "type": "standard",
    }


def line_item_object(item: dict[str, Any], created: int) -> dict[str, Any]:
    product_id = new_id("prod_", 14)
    return {
        "id": new_id("li_"),
        "object": "item",
        "amount_discount": 0,
        "amount_subtotal": item["amount"],
        "amount_tax": 0,
        "amount_total": item["amount"],
        "currency": item["currency"],
        "description": item["name"],
        "discounts": [],
        "price": {
            "id": new_id("price_"),
            "object": "price",
            "active": False,
            "billing_scheme": "per_unit",
            "created": created,
            "currency": item["currency"],
            "custom_unit_amount": None,
            "livemode": False,
            "lookup_key": None,
            "metadata": {},
            "nickname": None,
            "product": product_id,
            "recurring": None,
            "tax_behavior": item["tax_behavior"],
            "tiers_mode": None,
            "transform_quantity": None,
            "type": "one_time",
            "unit_amount": item["unit_amount"],
            "unit_amount_decimal": str(item["unit_amount"]),
        },
        "quantity": item["quantity"],
        "taxes": [],
    }


def list_object(url: str, data: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": False, "url": url}


def session_object(session_id: str, parsed: dict[str, Any], pay_url: str) -> dict[str, Any]:
    return {
        "id": session_id,
        "object": "checkout.session",
        "adaptive_pricing": {"enabled": False},
        "after_expiration": None,
        "allow_promotion_codes": parsed["allow_promotion_codes"],
        "amount_subtotal": parsed["amount"],
        "amount_total": parsed["amount"],
        "automatic_tax": {"enabled": False, "liability": None, "provider": None, "status": None},
        "billing_address_collection": parsed["billing_address_collection"],
        "cancel_url": parsed["cancel_url"],
        "client_reference_id": parsed["client_reference_id"],
        "client_secret": None,
        "collected_information": None,
        "consent": None,
        "consent_collection": None,
        "created": parsed["created"],
        "currency": parsed["currency"],
        "currency_conversion": None,
        "custom_fields": [],
        "custom_text": {
            "after_submit": None,
            "shipping_address": None,
            "submit": None,
            "terms_of_service_acceptance": None,
        },
        "customer": None,
        "customer_creation": "if_required",
        "customer_details": None,
        "customer_email": parsed["customer_email"],
        "discounts": [],
        "expires_at": parsed["expires_at"],
        "invoice": None,
        "invoice_creation": {
            "enabled": False,
            "invoice_data": {
                "account_tax_ids": None,
                "custom_fields": None,
                "description": None,
                "footer": None,
                "issuer": None,
                "metadata": {},
                "rendering_options": None,
            },
        },
        "livemode": False,
        "locale": parsed["locale"],
        "metadata": parsed["metadata"],
        "mode": parsed["mode"],
        "origin_context": None,
        "payment_intent": None,
        "payment_link": None,
        "payment_method_collection": "if_required",
        "payment_method_configuration_details": None,
        "payment_method_options": {},
        "payment_method_types": parsed["payment_method_types"],
        "payment_status": "unpaid",
        "permissions": None,
        "phone_number_collection": {"enabled": False},
        "recovered_from": None,
        "saved_payment_method_options": None,
        "setup_intent": None,
        "shipping_address_collection": None,
        "shipping_cost": None,
        "shipping_options": [],
        "status": "open",
        "submit_type": parsed["submit_type"],
        "subscription": None,
        "success_url": parsed["success_url"],
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted",
        "url": pay_url,
        "wallet_options": None,
    }


def customer_details(email: str) -> dict[str, Any]:
    return {
        "address": null_address(),
        "business_name": None,
        "email": email,
        "individual_name": None,
        "name": "Test Customer",
        "phone": None,
        "tax_exempt": "none",
        "tax_ids": [],
    }


def billing_details(email: str) -> dict[str, Any]:
    return {
        "address": null_address(),
        "email": email,
        "name": "Test Customer",
        "phone": None,
        "tax_id": None,
    }


def payment_method_object(created: int, email: str, *, delayed: bool) -> dict[str, Any]:
    payment_method: dict[str, Any] = {
        "id": new_id("pm_"),
        "object": "payment_method",
        "allow_redisplay": "limited",
        "billing_details": billing_details(email),
        "created": created,
        "customer": None,
        "livemode": False,
        "metadata": {},
    }
    if delayed:
        payment_method["type"] = "us_bank_account"
        payment_method["us_bank_account"] = {
            "account_holder_type": "individual",
            "account_type": "checking",
            "bank_name": "STRIPE TEST BANK",
            "financial_connections_account": None,
            "fingerprint": new_id("", 16),
            "last4": "6789",
            "networks": {"preferred": "ach", "supported": ["ach"]},
            "routing_number": "110000000",
            "status_details": {},
        }
    else:
        payment_method["type"] = "card"
        payment_method["card"] = {
            "brand": "visa",
            "checks": {
                "address_line1_check": None,
                "address_postal_code_check": "pass",
                "cvc_check": "pass",
            },
            "country": "US",
            "display_brand": "visa",
            "exp_month": 12,
            "exp_year": time.gmtime(created).tm_year + 3,
            "fingerprint": new_id("", 16),
            "funding": "credit",
            "generated_from": None,
            "last4": "4242",
            "networks": {"available": ["visa"], "preferred": None},
            "regulated_status": "unregulated",
            "three_d_secure_usage": {"supported": True},
            "wallet": None,
        }
    return payment_method


def payment_method_details(payment_method: dict[str, Any]) -> dict[str, Any]:
    method_type = payment_method["type"]
    details = {
        key: value
        for key, value in payment_method[method_type].items()
        if key
        not in ("display_brand", "generated_from", "wallet", "financial_connections_account")
    }
    return {"type": method_type, method_type: details}


def charge_object(
    *,
    session: dict[str, Any],
    payment_intent_id: str,
    payment_method: dict[str, Any],
    metadata: dict[str, str],
    description: str | None,
    email: str,
    created: int,
) -> dict[str, Any]:
    amount = session["amount_total"]
    return {
        "id": new_id("ch_"),
        "object": "charge",
        "amount": amount,
        "amount_captured": 0,
        "amount_refunded": 0,
        "application": None,
        "application_fee": None,
        "application_fee_amount": None,
        "balance_transaction": None,
        "billing_details": billing_details(email),
        "calculated_statement_descriptor": "TOLLBOOTH",
        "captured": False,
        "created": created,
        "currency": session["currency"],
        "customer": None,
        "description": description,
        "destination": None,
        "dispute": None,
        "disputed": False,
        "failure_balance_transaction": None,
        "failure_code": None,
        "failure_message": None,
        "fraud_details": {},
        "livemode": False,
        "metadata": dict(metadata),
        "on_behalf_of": None,
        "outcome": None,
        "paid": False,
        "payment_intent": payment_intent_id,
        "payment_method": payment_method["id"],
        "payment_method_details": payment_method_details(payment_method),
        "receipt_email": None,
        "receipt_number": None,
        "receipt_url": None,
        "refunded": False,
        "review": None,
        "shipping": None,
        "source": None,
        "source_transfer": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": "pending",
        "transfer_data": None,
        "transfer_group": None,
    }


def payment_intent_object(
    *,
    payment_intent_id: str,
    session: dict[str, Any],
    payment_method: dict[str, Any],
    charge_id: str,
    metadata: dict[str, str],
    description: str | None,
    created: int,
) -> dict[str, Any]:
    method_type = payment_method["type"]
    return {
        "id": payment_intent_id,
        "object": "payment_intent",
        "amount": session["amount_total"],
        "amount_capturable": 0,
        "amount_details": {"tip": {}},
        "amount_received": 0,
        "application": None,
        "application_fee_amount": None,
        "automatic_payment_methods": None,
        "canceled_at": None,
        "cancellation_reason": None,
        "capture_method": "automatic_async",
        "client_secret": f"{payment_intent_id}_secret_{new_id('', 25)}",
        "confirmation_method": "automatic",
        "created": created,
        "currency": session["currency"],
        "customer": None,
        "description": description,
        "last_payment_error": None,
        "latest_charge": charge_id,
        "livemode": False,
        "metadata": dict(metadata),
        "next_action": None,
        "on_behalf_of": None,
        "payment_method": payment_method["id"],
        "payment_method_configuration_details": None,
        "payment_method_options": {method_type: {}},
        "payment_method_types": [method_type],
        "processing": None,
        "receipt_email": None,
        "review": None,
        "setup_future_usage": None,
        "shipping": None,
        "source": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": "processing",
        "transfer_data": None,
        "transfer_group": None,
    }


def balance_transaction_object(charge: dict[str, Any], created: int) -> dict[str, Any]:
    # An example fee of 2.9% plus 30 cents, so that net differs from amount.
    fee = round(charge["amount"] * 0.029) + 30
    return {
        "id": new_id("txn_"),
        "object": "balance_transaction",
        "amount": charge["amount"],
        "available_on": created + 2 * 24 * 60 * 60,
        "created": created,
        "currency": charge["currency"],
        "description": charge["description"],
        "exchange_rate": None,
        "fee": fee,
        "fee_details": [
            {
                "amount": fee,
                "application": None,
                "currency": charge["currency"],
                "description": "Stripe processing fees",
                "type": "stripe_fee",
            }
        ],
        "net": charge["amount"] - fee,
        "reporting_category": "charge",
        "source": charge["id"],
        "status": "pending",
        "type": "charge",
    }


def adjustment_balance_transaction(
    *,
    source_id: str,
    amount: int,
    currency: str,
    created: int,
    transaction_type: str,
    reporting_category: str,
    description: str,
    fee: int = 0,
) -> dict[str, Any]:
    """Build the balance transaction of a refund or a dispute; ``amount`` is signed."""
    fee_details = []
    if fee:
        fee_details.append(
            {
                "amount": fee,
                "application": None,
                "currency": currency,
                "description": "Dispute fee",
                "type": "stripe_fee",
            }
        )
    return {
        "id": new_id("txn_"),
        "object": "balance_transaction",
        "amount": amount,
        "available_on": created,
        "created": created,
        "currency": currency,
        "description": description,
        "exchange_rate": None,
        "fee": fee,
        "fee_details": fee_details,
        "net": amount - fee,
        "reporting_category": reporting_category,
        "source": source_id,
        "status": "available",
        "type": transaction_type,
    }


def refund_object(
    *,
    charge: dict[str, Any],
    amount: int,
    reason: str | None,
    metadata: dict[str, str],
    balance_transaction_id: str,
    refund_id: str,
    created: int,
) -> dict[str, Any]:
    method_type = charge["payment_method_details"]["type"]
    # Card refunds succeed at once; bank debits stay pending until the bank confirms.
    status = "succeeded" if method_type == "card" else "pending"
    destination: dict[str, Any] = {"reference": None, "reference_status": "pending"}
    if method_type == "card":
        destination.update(reference_type="acquirer_reference_number", type="refund")
    return {
        "id": refund_id,
        "object": "refund",
        "amount": amount,
        "balance_transaction": balance_transaction_id,
        "charge": charge["id"],
        "created": created,
        "currency": charge["currency"],
        "destination_details": {"type": method_type, method_type: destination},
        "metadata": dict(metadata),
        "payment_intent": charge["payment_intent"],
        "reason": reason,
        "receipt_number": None,
        "source_transfer_reversal": None,
        "status": status,
        "transfer_reversal": None,
    }


DISPUTE_EVIDENCE_FIELDS = (
    "access_activity_log",
    "billing_address",
    "cancellation_policy",
    "cancellation_policy_disclosure",
    "cancellation_rebuttal",
    "customer_communication",
    "customer_email_address",
    "customer_name",
    "customer_purchase_ip",
    "customer_signature",
    "duplicate_charge_documentation",
    "duplicate_charge_explanation",
    "duplicate_charge_id",
    "product_description",
    "receipt",
    "refund_policy",
    "refund_policy_disclosure",
    "refund_refusal_explanation",
    "service_date",
    "service_documentation",
    "shipping_address",
    "shipping_carrier",
    "shipping_date",
    "shipping_documentation",
    "shipping_tracking_number",
    "uncategorized_file",
    "uncategorized_text",
)


def dispute_object(
    *,
    charge: dict[str, Any],
    amount: int,
    reason: str,
    dispute_id: str,
    balance_transaction: dict[str, Any],
    created: int,
) -> dict[str, Any]:
    method_type = charge["payment_method_details"]["type"]
    details: dict[str, Any] = {"type": method_type}
    if method_type == "card":
        details["card"] = {
            "brand": charge["payment_method_details"]["card"]["brand"],
            "case_type": "chargeback",
            "network_reason_code": None,
        }
    return {
        "id": dispute_id,
        "object": "dispute",
        "amount": amount,
        # Stripe embeds the dispute's balance transactions as full objects.
        "balance_transactions": [copy.deepcopy(balance_transaction)],
        "charge": charge["id"],
        "created": created,
        "currency": charge["currency"],
        "enhanced_eligibility_types": [],
        "evidence": dict.fromkeys(DISPUTE_EVIDENCE_FIELDS),
        "evidence_details": {
            "due_by": created + DISPUTE_RESPONSE_SECONDS,
            "enhanced_eligibility": {},
            "has_evidence": False,
            "past_due": False,
            "submission_count": 0,
        },
        "is_charge_refundable": False,
        "livemode": False,
        "metadata": {},
        "payment_intent": charge["payment_intent"],
        "payment_method_details": details,
        "reason": reason,
        "status": "needs_response",
    }


# --- Server state ----------------------------------------------------------------------


@dataclass
class CheckoutResult:
    """The objects a session action changed, and the event it generated."""

    session: dict[str, Any]
    payment_intent: dict[str, Any] | None
    charge: dict[str, Any] | None
    event: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "payment_intent": self.payment_intent,
            "charge": self.charge,
            "event": self.event,
        }


@dataclass
class ChargeResult:
    """A refund or dispute action: the charge, the refund or dispute, and the event."""

    charge: dict[str, Any]
    event: dict[str, Any]
    refund: dict[str, Any] | None = None
    dispute: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "charge": self.charge,
            "refund": self.refund,
            "dispute": self.dispute,
            "event": self.event,
        }


class ServerState:
    """In-memory store of every object the server created, safe to read from any thread.

    Accessors return deep copies, so callers can neither see later changes in them nor
    change the stored objects.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.account_id = new_id("acct_", 16)
        self._account_created = now()
        self.reset()

    def reset(self) -> None:
        """Forget every session, payment, event and delivery. The account id stays."""
        with self._lock:
            self._objects: dict[str, dict[str, Any]] = {}
            self._line_items: dict[str, list[dict[str, Any]]] = {}
            self._payment_intent_data: dict[str, dict[str, Any]] = {}
            self._event_ids: list[str] = []
            self._deliveries: list[dict[str, Any]] = []
            self._idempotent_responses: dict[tuple[str, str], tuple[str, Response]] = {}

    # Reading.

    def account(self) -> dict[str, Any]:
        return account_object(self.account_id, self._account_created)

    def get_object(self, object_id: str, object_type: str | None = None) -> dict[str, Any] | None:
        """Return a copy of a stored object, or None if the id or type does not match."""
        with self._lock:
            stored = self._objects.get(object_id)
            if stored is None or (object_type is not None and stored["object"] != object_type):
                return None
            return copy.deepcopy(stored)

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        return self.get_object(session_id, "checkout.session")

    def get_event(self, event_id: str) -> dict[str, Any] | None:
        return self.get_object(event_id, "event")

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(self._objects[event_id]) for event_id in self._event_ids]

    def webhook_deliveries(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._deliveries)

    def line_items(self, session_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._line_items.get(session_id, []))

    def expand(self, obj: dict[str, Any], paths: Iterable[str]) -> dict[str, Any]:
        """Return a copy of ``obj`` with the ``expand[]`` paths replaced by full objects."""
        expanded = copy.deepcopy(obj)
        with self._lock:
            for path in paths:
                self._expand_path(expanded, path.split("."), path, top_level=True)
        return expanded

    def _expand_path(
        self, node: Any, parts: list[str], path: str, *, top_level: bool = False
    ) -> None:
        if not parts or not isinstance(node, dict):
            return
        key, rest = parts[0], parts[1:]
        if key == "data" and node.get("object") == "list":
            for item in node["data"]:
                self._expand_path(item, rest, path)
            return

        if node.get("object") == "checkout.session" and key == "line_items":
            items = copy.deepcopy(self._line_items.get(node["id"], []))
            node[key] = list_object(f"/v1/checkout/sessions/{node['id']}/line_items", items)
        elif node.get("object") == "charge" and key == "refunds":
            # Charges list their refunds only when asked to.
            refunds = [
                copy.deepcopy(obj)
                for obj in reversed(self._objects.values())
                if obj["object"] == "refund" and obj["charge"] == node["id"]
            ]
            node[key] = list_object(f"/v1/charges/{node['id']}/refunds", refunds)
        elif key == "breakdown" and "amount_discount" in node:
            # Stripe fills total_details.breakdown only when it is expanded.
            node[key] = {"discounts": [], "taxes": []}
        elif key in node:
            value = node[key]
            if isinstance(value, str) and value in self._objects:
                node[key] = copy.deepcopy(self._objects[value])
        elif top_level:
            raise invalid_param("expand", f"This property cannot be expanded ({path}).")
        self._expand_path(node.get(key), rest, path)

    # Writing.

    def create_session(self, parsed: dict[str, Any], base_url: str) -> dict[str, Any]:
        session_id = new_id("cs_test_", 58)
        session = session_object(session_id, parsed, f"{base_url}/pay/{session_id}")
        line_items = [line_item_object(item, parsed["created"]) for item in parsed["items"]]
        with self._lock:
            self._objects[session_id] = session
            self._line_items[session_id] = line_items
            self._payment_intent_data[session_id] = {
                "metadata": parsed["payment_intent_metadata"],
                "description": parsed["payment_intent_description"],
            }
            logger.info(
                "Created checkout session %s for %s %s",
                session_id,
                parsed["amount"],
                parsed["currency"],
            )
            return copy.deepcopy(session)

    def record_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._objects[event["id"]] = copy.deepcopy(event)
            self._event_ids.append(event["id"])

    def record_delivery(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._deliveries.append(copy.deepcopy(record))
            stored = self._objects.get(record["event_id"])
            if record["ok"] and stored is not None:
                stored["pending_webhooks"] = max(0, stored["pending_webhooks"] - 1)

    def idempotent_response(self, api_key: str, key: str, params_text: str) -> Response | None:
        """Return the stored response for a repeated idempotency key, if any."""
        with self._lock:
            stored = self._idempotent_responses.get((api_key, key))
        if stored is None:
            return None
        stored_params, response = stored
        if stored_params != params_text:
            raise StripeApiError(
                400,
                "Keys for idempotent requests can only be used with the same parameters "
                f"they were first used with. Try using a key other than '{key}' if you "
                "meant to execute a different request.",
                error_type="idempotency_error",
            )
        return Response(
            response.status,
            response.body,
            response.content_type,
            [*response.headers, ("Idempotent-Replayed", "true")],
        )

    def store_idempotent_response(
        self, api_key: str, key: str, params_text: str, response: Response
    ) -> None:
        with self._lock:
            self._idempotent_responses[(api_key, key)] = (params_text, response)

    # Session state changes. Each one generates the event Stripe sends for it.

    def _open_session(self, session_id: str) -> dict[str, Any]:
        session = self._objects.get(session_id)
        if session is None or session["object"] != "checkout.session":
            raise no_such_object("checkout.session", session_id)
        if session["status"] != "open":
            # The error code is local to this server because Stripe's is not known here.
            raise StripeApiError(
                400,
                f"Checkout Session {session_id} is {session['status']}, and only an open "
                "session can be paid or expired.",
                code="checkout_session_not_open",
            )
        return session

    def _event_for(
        self,
        event_type: str,
        data_object: dict[str, Any],
        pending_webhooks: int,
        request: Request | None,
        previous_attributes: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        event = build_event(
            event_type,
            data_object,
            previous_attributes=previous_attributes,
            pending_webhooks=pending_webhooks,
            request_id=request.request_id if request else None,
            idempotency_key=request.headers.get("idempotency-key") if request else None,
        )
        self.record_event(event)
        return event

    def pay_session(
        self, session_id: str, *, delayed: bool = False, pending_webhooks: int = 0
    ) -> CheckoutResult:
        """Complete an open session with a card, or with a delayed method if ``delayed``.

        A card payment succeeds at once. A delayed payment leaves the session unpaid and
        the payment intent processing until ``settle_delayed_payment`` is called.
        """
        with self._lock:
            session = self._open_session(session_id)
            created = now()
            email = session["customer_email"] or DEFAULT_CUSTOMER_EMAIL
            intent_data = self._payment_intent_data.get(session_id, {})
            payment_method = payment_method_object(created, email, delayed=delayed)
            payment_intent_id = new_id("pi_")
            charge = charge_object(
                session=session,
                payment_intent_id=payment_intent_id,
                payment_method=payment_method,
                metadata=intent_data.get("metadata", {}),
                description=intent_data.get("description"),
                email=email,
                created=created,
            )
            payment_intent = payment_intent_object(
                payment_intent_id=payment_intent_id,
                session=session,
                payment_method=payment_method,
                charge_id=charge["id"],
                metadata=intent_data.get("metadata", {}),
                description=intent_data.get("description"),
                created=created,
            )
            for obj in (payment_method, charge, payment_intent):
                self._objects[obj["id"]] = obj
            if not delayed:
                self._mark_succeeded(payment_intent, charge)

            session.update(
                status="complete",
                payment_status="unpaid" if delayed else "paid",
                payment_intent=payment_intent_id,
                customer_details=customer_details(email),
                # Stripe returns a session URL only while the session is open.
                url=None,
            )
            event = self._event_for("checkout.session.completed", session, pending_webhooks, None)
            logger.info(
                "Completed checkout session %s (%s), payment intent %s",
                session_id,
                session["payment_status"],
                payment_intent_id,
            )
            return CheckoutResult(
                copy.deepcopy(session),
                copy.deepcopy(payment_intent),
                copy.deepcopy(charge),
                event,
            )

    def _mark_succeeded(self, payment_intent: dict[str, Any], charge: dict[str, Any]) -> None:
        created = now()
        balance_transaction = balance_transaction_object(charge, created)
        self._objects[balance_transaction["id"]] = balance_transaction
        charge.update(
            amount_captured=charge["amount"],
            balance_transaction=balance_transaction["id"],
            captured=True,
            paid=True,
            status="succeeded",
            outcome={
                "advice_code": None,
                "network_advice_code": None,
                "network_decline_code": None,
                "network_status": "approved_by_network",
                "reason": None,
                "risk_level": "normal",
                "risk_score": 20,
                "seller_message": "Payment complete.",
                "type": "authorized",
            },
        )
        payment_intent.update(amount_received=payment_intent["amount"], status="succeeded")

    def settle_delayed_payment(
        self, session_id: str, *, succeeded: bool, pending_webhooks: int = 0
    ) -> CheckoutResult:
        """Finish the delayed payment of a session completed with ``pay_session(delayed=True)``."""
        with self._lock:
            session = self._objects.get(session_id)
            if session is None or session["object"] != "checkout.session":
                raise no_such_object("checkout.session", session_id)
            payment_intent = self._objects.get(session["payment_intent"] or "")
            if (
                session["status"] != "complete"
                or payment_intent is None
                or payment_intent["status"] != "processing"
            ):
                raise StripeApiError(
                    400,
                    f"Checkout Session {session_id} has no delayed payment in progress. "
                    "Complete it with /_test/sessions/<id>/pay_async first.",
                    code="checkout_session_not_processing",
                )
            charge = self._objects[payment_intent["latest_charge"]]

            if succeeded:
                self._mark_succeeded(payment_intent, charge)
                session["payment_status"] = "paid"
                event_type = "checkout.session.async_payment_succeeded"
            else:
                self._mark_failed(payment_intent, charge)
                event_type = "checkout.session.async_payment_failed"
            event = self._event_for(event_type, session, pending_webhooks, None)
            logger.info("Delayed payment of checkout session %s: %s", session_id, event_type)
            return CheckoutResult(
                copy.deepcopy(session),
                copy.deepcopy(payment_intent),
                copy.deepcopy(charge),
                event,
            )

    def _mark_failed(self, payment_intent: dict[str, Any], charge: dict[str, Any]) -> None:
        message = "The customer's bank account could not be debited."
        charge.update(
            status="failed",
            failure_code="insufficient_funds",
            failure_message=message,
        )
        payment_intent.update(
            status="requires_payment_method",
            payment_method=None,
            last_payment_error={
                "code": "insufficient_funds",
                "message": message,
                "payment_method": copy.deepcopy(self._objects.get(charge["payment_method"])),
                "type": "invalid_request_error",
            },
        )

    def expire_session(
        self, session_id: str, *, pending_webhooks: int = 0, request: Request | None = None
    ) -> CheckoutResult:
        with self._lock:
            session = self._open_session(session_id)
            session.update(status="expired", url=None)
            event = self._event_for("checkout.session.expired", session, pending_webhooks, request)
            logger.info("Expired checkout session %s", session_id)
            return CheckoutResult(copy.deepcopy(session), None, None, event)

    # Refunds and disputes. Each one generates the event Stripe sends for it.

    def list_objects(self, object_type: str, filters: dict[str, str]) -> list[dict[str, Any]]:
        """Return copies of the stored objects of one type matching ``filters``, newest first."""
        with self._lock:
            matches = [
                obj
                for obj in self._objects.values()
                if obj["object"] == object_type
                and all(obj.get(name) == value for name, value in filters.items())
            ]
            return copy.deepcopy(matches[::-1])

    def session_charge_id(self, session_id: str) -> str:
        """Return the id of the charge that paid a session, or raise if it has none."""
        with self._lock:
            session = self._objects.get(session_id)
            if session is None or session["object"] != "checkout.session":
                raise no_such_object("checkout.session", session_id)
            payment_intent = self._objects.get(session["payment_intent"] or "")
            if payment_intent is None or not payment_intent.get("latest_charge"):
                raise StripeApiError(
                    400,
                    f"Checkout Session {session_id} has no payment yet. Pay it with "
                    "/_test/sessions/<id>/pay first.",
                    code="checkout_session_not_paid",
                )
            return payment_intent["latest_charge"]

    def _charge_for(self, charge_id: str | None, payment_intent_id: str | None) -> dict[str, Any]:
        if charge_id:
            charge = self._objects.get(charge_id)
            if charge is None or charge["object"] != "charge":
                raise no_such_object("charge", charge_id)
            if payment_intent_id and charge["payment_intent"] != payment_intent_id:
                raise invalid_param(
                    "payment_intent",
                    f"Charge {charge_id} does not belong to PaymentIntent {payment_intent_id}.",
                )
            return charge
        payment_intent = self._objects.get(payment_intent_id or "")
        if payment_intent is None or payment_intent["object"] != "payment_intent":
            raise no_such_object("payment_intent", payment_intent_id or "")
        charge = self._objects.get(payment_intent.get("latest_charge") or "")
        if charge is None:
            raise StripeApiError(
                400,
                f"PaymentIntent {payment_intent_id} has no charge to refund.",
                code="charge_not_refundable",
            )
        return charge

    def refund_charge(
        self,
        *,
        charge_id: str | None = None,
        payment_intent_id: str | None = None,
        amount: int | None = None,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        pending_webhooks: int = 0,
        request: Request | None = None,
    ) -> ChargeResult:
        """Refund ``amount`` (default: all that is left) of a succeeded charge.

        The charge's ``amount_refunded`` adds up every refund, and ``refunded`` turns
        true once the whole amount is refunded.
        """
        with self._lock:
            charge = self._charge_for(charge_id, payment_intent_id)
            if charge["status"] != "succeeded":
                raise StripeApiError(
                    400,
                    f"Charge {charge['id']} has not succeeded, so it cannot be refunded.",
                    code="charge_not_refundable",
                )
            dispute = self._objects.get(charge.get("dispute") or "")
            if dispute is not None and dispute["status"] != "won":
                raise StripeApiError(
                    400,
                    f"Charge {charge['id']} has been charged back, so it cannot be refunded.",
                    code="charge_disputed",
                )
            refundable = charge["amount"] - charge["amount_refunded"]
            if refundable == 0:
                raise StripeApiError(
                    400,
                    f"Charge {charge['id']} has already been refunded.",
                    code="charge_already_refunded",
                )
            amount = refundable if amount is None else amount
            if amount > refundable:
                raise StripeApiError(
                    400,
                    f"Refund amount ({format_amount(amount, charge['currency'])}) is greater "
                    "than unrefunded amount on charge "
                    f"({format_amount(refundable, charge['currency'])}).",
                    code="amount_too_large",
                    param="amount",
                )

            created = now()
            refund_id = new_id("re_")
            balance_transaction = adjustment_balance_transaction(
                source_id=refund_id,
                amount=-amount,
                currency=charge["currency"],
                created=created,
                transaction_type="refund",
                reporting_category="refund",
                description=f"Refund for charge {charge['id']}",
            )
            refund = refund_object(
                charge=charge,
                amount=amount,
                reason=reason,
                metadata=metadata or {},
                balance_transaction_id=balance_transaction["id"],
                refund_id=refund_id,
                created=created,
            )
            previous: dict[str, Any] = {"amount_refunded": charge["amount_refunded"]}
            charge["amount_refunded"] += amount
            if charge["amount_refunded"] == charge["amount"]:
                previous["refunded"] = charge["refunded"]
                charge["refunded"] = True
            for obj in (balance_transaction, refund):
                self._objects[obj["id"]] = obj
            event = self._event_for(
                "charge.refunded", charge, pending_webhooks, request, previous_attributes=previous
            )
            logger.info(
                "Refunded %s of charge %s as %s, %s refunded in all",
                amount,
                charge["id"],
                refund_id,
                charge["amount_refunded"],
            )
            return ChargeResult(copy.deepcopy(charge), event, refund=copy.deepcopy(refund))

    def open_dispute(
        self,
        charge_id: str,
        *,
        amount: int | None = None,
        reason: str = "fraudulent",
        pending_webhooks: int = 0,
    ) -> ChargeResult:
        """Open a chargeback on a succeeded charge: status ``needs_response``, funds withdrawn."""
        with self._lock:
            charge = self._charge_for(charge_id, None)
            if charge["status"] != "succeeded":
                raise StripeApiError(
                    400,
                    f"Charge {charge_id} has not succeeded, so it cannot be disputed.",
                    code="charge_not_disputable",
                )
            if charge.get("dispute"):
                raise StripeApiError(
                    400,
                    f"Charge {charge_id} already has dispute {charge['dispute']}.",
                    code="charge_already_disputed",
                )
            amount = charge["amount"] if amount is None else amount
            if amount > charge["amount"]:
                raise invalid_param(
                    "amount", f"A dispute can be at most the charge amount, {charge['amount']}."
                )
            created = now()
            dispute_id = new_id("dp_")
            balance_transaction = adjustment_balance_transaction(
                source_id=dispute_id,
                amount=-amount,
                currency=charge["currency"],
                created=created,
                transaction_type="adjustment",
                reporting_category="dispute",
                description=f"Chargeback withdrawal for {charge_id}",
                fee=DISPUTE_FEE,
            )
            dispute = dispute_object(
                charge=charge,
                amount=amount,
                reason=reason,
                dispute_id=dispute_id,
                balance_transaction=balance_transaction,
                created=created,
            )
            for obj in (balance_transaction, dispute):
                self._objects[obj["id"]] = obj
            charge.update(disputed=True, dispute=dispute_id)
            event = self._event_for("charge.dispute.created", dispute, pending_webhooks, None)
            logger.info("Opened dispute %s on charge %s for %s", dispute_id, charge_id, amount)
            return ChargeResult(copy.deepcopy(charge), event, dispute=copy.deepcopy(dispute))

    def close_dispute(
        self, dispute_id: str, *, status: str, pending_webhooks: int = 0
    ) -> ChargeResult:
        """Close an open dispute as ``won`` (funds reinstated) or ``lost``."""
        if status not in ("won", "lost"):
            raise invalid_param("status", f"Invalid status: {status}. Use won or lost.")
        with self._lock:
            dispute = self._objects.get(dispute_id)
            if dispute is None or dispute["object"] != "dispute":
                raise no_such_object("dispute", dispute_id)
            if dispute["status"] in ("won", "lost", "warning_closed"):
                raise StripeApiError(
                    400,
                    f"Dispute {dispute_id} is already closed ({dispute['status']}).",
                    code="dispute_already_closed",
                )
            charge = self._objects[dispute["charge"]]
            previous = {"status": dispute["status"]}
            if status == "won":
                reversal = adjustment_balance_transaction(
                    source_id=dispute_id,
                    amount=dispute["amount"],
                    currency=dispute["currency"],
                    created=now(),
                    transaction_type="adjustment",
                    reporting_category="dispute_reversal",
                    description=f"Chargeback reversal for {charge['id']}",
                )
                self._objects[reversal["id"]] = reversal
                dispute["balance_transactions"].append(copy.deepcopy(reversal))
            dispute["status"] = status
            event = self._event_for(
                "charge.dispute.closed",
                dispute,
                pending_webhooks,
                None,
                previous_attributes=previous,
            )
            logger.info("Closed dispute %s as %s", dispute_id, status)
            return ChargeResult(copy.deepcopy(charge), event, dispute=copy.deepcopy(dispute))


# --- HTML checkout page ----------------------------------------------------------------


def format_amount(amount: int, currency: str) -> str:
    if currency in ZERO_DECIMAL_CURRENCIES:
        return f"{amount} {currency.upper()}"
    decimals = 3 if currency in THREE_DECIMAL_CURRENCIES else 2
    return f"{amount / 10**decimals:.{decimals}f} {currency.upper()}"


def success_redirect_url(session: dict[str, Any]) -> str:
    return session["success_url"].replace("{CHECKOUT_SESSION_ID}", session["id"])


def render_page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 28rem; margin: 3rem auto; }}
body {{ padding: 0 1rem; }}
.notice {{ background: #fff4d6; padding: .5rem .75rem; border-radius: .25rem; }}
table {{ width: 100%; border-collapse: collapse; margin: 1rem 0; }}
td {{ padding: .25rem 0; }} td.amount {{ text-align: right; }}
button {{ font-size: 1.1rem; padding: .6rem 2rem; }}
</style>
</head>
<body>
<p class="notice">Local Stripe test server. No real payment is made.</p>
{body}
</body>
</html>
"""


def checkout_page(session: dict[str, Any], line_items: list[dict[str, Any]]) -> str:
    session_id = html.escape(session["id"])
    if session["status"] != "open":
        links = ""
        if session["status"] == "complete":
            links = f'<p><a href="{html.escape(success_redirect_url(session))}">Continue</a></p>'
        elif session["cancel_url"]:
            links = f'<p><a href="{html.escape(session["cancel_url"])}">Back</a></p>'
        return render_page(
            "Checkout",
            f"<h1>Checkout</h1><p>Checkout Session <code>{session_id}</code> is "
            f"{html.escape(session['status'])}, so it can no longer be paid.</p>{links}",
        )

    rows = "".join(
        f"<tr><td>{html.escape(item['description'])} &times; {item['quantity']}</td>"
        f'<td class="amount">{format_amount(item["amount_total"], item["currency"])}</td></tr>'
        for item in line_items
    )
    total = format_amount(session["amount_total"], session["currency"])
    email = html.escape(session["customer_email"] or DEFAULT_CUSTOMER_EMAIL)
    cancel = ""
    if session["cancel_url"]:
        cancel = f'<p><a href="{html.escape(session["cancel_url"])}">Cancel</a></p>'
    return render_page(
        "Checkout",
        f"""<h1>Checkout</h1>
<table>{rows}
<tr><td><strong>Total</strong></td>
<td class="amount" data-testid="total"><strong>{total}</strong></td></tr>
</table>
<p>Paying as {email} with the test card ending in 4242.</p>
<form method="post" action="/pay/{session_id}">
<button type="submit" id="pay-button">Pay</button>
</form>
{cancel}""",
    )


# --- ASGI app --------------------------------------------------------------------------


def decode_headers(raw_headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw_headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


async def read_body(receive: Receive) -> bytes | None:
    """Read the whole request body, or return None if the client disconnected first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise StripeApiError(413, f"Request body is larger than {MAX_BODY_BYTES} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_response(
    send: Send, response: Response, extra_headers: Iterable[tuple[str, str]] = ()
) -> None:
    headers = [
        (b"content-type", response.content_type.encode("latin-1")),
        (b"content-length", str(len(response.body)).encode("latin-1")),
    ]
    for name, value in (*response.headers, *extra_headers):
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


Handler = Callable[..., Awaitable[Response]]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler


class StripeServerApp:
    """ASGI app that serves the Stripe stand-in, with its state in ``self.state``."""

    def __init__(
        self,
        *,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        public_url: str | None = None,
    ) -> None:
        if bool(webhook_url) != bool(webhook_secret):
            raise ValueError("webhook_url and webhook_secret must be given together.")
        self.state = ServerState()
        self.webhook_url = webhook_url or None
        self.webhook_secret = webhook_secret or None
        self.public_url = public_url.rstrip("/") if public_url else None
        # Strong references, because the event loop keeps only weak ones to tasks.
        self._background_deliveries: set[asyncio.Task[Any]] = set()

        session_path = r"(?P<session_id>[A-Za-z0-9_]+)"
        self._routes = [
            Route("POST", re.compile(r"/v1/checkout/sessions"), self._create_session),
            Route(
                "GET",
                re.compile(rf"/v1/checkout/sessions/{session_path}/line_items"),
                self._list_line_items,
            ),
            Route(
                "POST",
                re.compile(rf"/v1/checkout/sessions/{session_path}/expire"),
                self._expire_session,
            ),
            Route("GET", re.compile(r"/v1/account"), self._retrieve_account),
            Route("POST", re.compile(r"/v1/refunds"), self._create_refund),
            Route(
                "GET",
                re.compile(r"/v1/(?P<collection>refunds|disputes)"),
                self._list_collection,
            ),
            Route(
                "GET",
                re.compile(
                    r"/v1/(?P<collection>checkout/sessions|payment_intents|charges|"
                    r"payment_methods|balance_transactions|events|customers|refunds|"
                    r"disputes)/(?P<object_id>[A-Za-z0-9_]+)"
                ),
                self._retrieve_object,
            ),
            Route("GET", re.compile(rf"/_test/sessions/{session_path}"), self._show_session),
            Route(
                "POST",
                re.compile(
                    rf"/_test/sessions/{session_path}/"
                    r"(?P<action>pay|pay_async|async_succeeded|async_failed)"
                ),
                self._session_action,
            ),
            Route(
                "POST",
                re.compile(rf"/_test/sessions/{session_path}/refund"),
                self._refund_session,
            ),
            Route(
                "POST",
                re.compile(rf"/_test/sessions/{session_path}/dispute"),
                self._dispute_session,
            ),
            Route(
                "POST",
                re.compile(r"/_test/disputes/(?P<dispute_id>[A-Za-z0-9_]+)/close"),
                self._close_dispute,
            ),
            Route("POST", re.compile(r"/_test/webhook_endpoint"), self._configure_webhook),
            Route("GET", re.compile(r"/_test/events"), self._list_events),
            Route(
                "POST",
                re.compile(r"/_test/events/(?P<event_id>[A-Za-z0-9_]+)/deliver"),
                self._redeliver_event,
            ),
            Route("GET", re.compile(r"/_test/webhook_deliveries"), self._list_deliveries),
            Route("POST", re.compile(r"/_test/reset"), self._reset),
            Route("GET", re.compile(rf"/pay/{session_path}"), self._show_checkout_page),
            Route("POST", re.compile(rf"/pay/{session_path}"), self._submit_checkout_page),
            Route("GET", re.compile(r"/"), self._index),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # Only HTTP is served.

        try:
            body = await read_body(receive)
        except StripeApiError as error:
            await send_response(send, json_response(error.status, error.body()))
            return
        if body is None:
            return
        headers = decode_headers(scope.get("headers", []))
        request = Request(
            method=scope["method"],
            path=scope["path"],
            query_string=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            body=body,
            base_url=self.public_url or self._base_url(scope, headers),
        )
        response = await self._dispatch(request)
        extra_headers = [("Request-Id", request.request_id)]
        if request.path.startswith("/v1/"):
            version = headers.get("stripe-version") or default_api_version()
            extra_headers.append(("Stripe-Version", version))
        await send_response(send, response, extra_headers)

    @staticmethod
    def _base_url(scope: Scope, headers: dict[str, str]) -> str:
        host = headers.get("host")
        if not host:
            server_host, server_port = scope.get("server") or ("127.0.0.1", 80)
            host = f"{server_host}:{server_port}"
        return f"{scope.get('scheme', 'http')}://{host}"

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._background_deliveries:
                    await asyncio.wait(self._background_deliveries, timeout=5)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _dispatch(self, request: Request) -> Response:
        is_api = request.path.startswith("/v1/")
        try:
            if is_api:
                api_key = api_key_from_headers(request.headers)
            for route in self._routes:
                match = route.pattern.fullmatch(request.path)
                if match and route.method == request.method:
                    if is_api and request.method == "POST":
                        return await self._handle_idempotently(api_key, route, match, request)
                    return await route.handler(request, **match.groupdict())
            raise StripeApiError(
                404,
                f"Unrecognized request URL ({request.method}: {request.path}). This local "
                "Stripe server implements only the endpoints listed in devtools/stripe_server.py.",
            )
        except StripeApiError as error:
            logger.info(
                "%s %s -> %d: %s", request.method, request.path, error.status, error.message
            )
            if request.path.startswith("/pay/"):
                return html_response(
                    error.status, render_page("Checkout", f"<p>{html.escape(error.message)}</p>")
                )
            return json_response(error.status, error.body())
        except Exception:
            logger.exception("Request %s %s failed", request.method, request.path)
            error = StripeApiError(
                500,
                "The local Stripe server failed to handle the request.",
                error_type="api_error",
            )
            return json_response(500, error.body())

    async def _handle_idempotently(
        self, api_key: str, route: Route, match: re.Match[str], request: Request
    ) -> Response:
        # stripe-python sends an Idempotency-Key with every POST and reuses it on retries,
        # so a retried create must return the first response, not a second session.
        key = request.headers.get("idempotency-key")
        params_text = request.body.decode("utf-8", "replace")
        if key:
            replay = self.state.idempotent_response(api_key, key, params_text)
            if replay is not None:
                return replay
        response = await route.handler(request, **match.groupdict())
        if key and response.status < 500:
            self.state.store_idempotent_response(api_key, key, params_text, response)
        return response

    # Webhook delivery.

    @property
    def pending_webhooks(self) -> int:
        return 1 if self.webhook_url else 0

    async def _deliver(self, event: dict[str, Any]) -> dict[str, Any] | None:
        if not self.webhook_url or not self.webhook_secret:
            return None
        # The target may call this server back while handling the event, as dj-stripe
        # does, so the blocking request runs in a thread to keep the event loop free.
        record = await asyncio.to_thread(
            deliver_event, self.webhook_url, event, self.webhook_secret
        )
        self.state.record_delivery(record)
        return record

    def _deliver_in_background(self, event: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(event))
        self._background_deliveries.add(task)
        task.add_done_callback(self._background_deliveries.discard)

    # Stripe API handlers.

    async def _create_session(self, request: Request) -> Response:
        params = request.form()
        parsed = parse_session_params(params)
        session = self.state.create_session(parsed, request.base_url)
        return json_response(200, self.state.expand(session, expand_paths(params)))

    async def _list_line_items(self, request: Request, session_id: str) -> Response:
        if self.state.get_session(session_id) is None:
            raise no_such_object("checkout.session", session_id)
        url = f"/v1/checkout/sessions/{session_id}/line_items"
        return json_response(200, list_object(url, self.state.line_items(session_id)))

    async def _expire_session(self, request: Request, session_id: str) -> Response:
        result = self.state.expire_session(
            session_id, pending_webhooks=self.pending_webhooks, request=request
        )
        # The caller may be the webhook target itself, so waiting for the delivery here
        # could deadlock a single-threaded server.
        if self.webhook_url:
            self._deliver_in_background(result.event)
        return json_response(200, result.session)

    async def _retrieve_account(self, request: Request) -> Response:
        return json_response(200, self.state.account())

    async def _retrieve_object(
        self, request: Request, collection: str, object_id: str
    ) -> Response:
        object_type = COLLECTION_OBJECT_TYPES[collection]
        obj = self.state.get_object(object_id, object_type)
        if obj is None:
            raise no_such_object(object_type, object_id)
        return json_response(200, self.state.expand(obj, expand_paths(request.query())))

    async def _create_refund(self, request: Request) -> Response:
        params = request.form()
        result = self.state.refund_charge(
            **parse_refund_params(params), pending_webhooks=self.pending_webhooks, request=request
        )
        # The caller may be the webhook target itself, as when an operator refunds from
        # the Django admin, so the event is delivered in the background.
        if self.webhook_url:
            self._deliver_in_background(result.event)
        return json_response(200, self.state.expand(result.refund, expand_paths(params)))

    async def _list_collection(self, request: Request, collection: str) -> Response:
        object_type = COLLECTION_OBJECT_TYPES[collection]
        params = request.query()
        parsed = parse_list_params(params, object_type)
        page = list_page(
            self.state.list_objects(object_type, parsed["filters"]),
            f"/v1/{collection}",
            object_type=object_type,
            limit=parsed["limit"],
            starting_after=parsed["starting_after"],
            ending_before=parsed["ending_before"],
        )
        return json_response(200, self.state.expand(page, expand_paths(params)))

    # Control handlers.

    async def _show_session(self, request: Request, session_id: str) -> Response:
        session = self.state.get_session(session_id)
        if session is None:
            raise no_such_object("checkout.session", session_id)
        return json_response(200, session)

    async def _session_action(self, request: Request, session_id: str, action: str) -> Response:
        pending = self.pending_webhooks
        if action in ("pay", "pay_async"):
            result = self.state.pay_session(
                session_id, delayed=action == "pay_async", pending_webhooks=pending
            )
        else:
            result = self.state.settle_delayed_payment(
                session_id, succeeded=action == "async_succeeded", pending_webhooks=pending
            )
        delivery = await self._deliver(result.event)
        return json_response(200, {**result.as_dict(), "webhook_delivery": delivery})

    async def _refund_session(self, request: Request, session_id: str) -> Response:
        params = request.form()
        reject_unknown_params(params, ("amount", "reason"))
        result = self.state.refund_charge(
            charge_id=self.state.session_charge_id(session_id),
            amount=optional_amount(params),
            reason=optional_choice(params, "reason", REFUND_REASONS, "requested_by_customer"),
            pending_webhooks=self.pending_webhooks,
        )
        delivery = await self._deliver(result.event)
        return json_response(200, {**result.as_dict(), "webhook_delivery": delivery})

    async def _dispute_session(self, request: Request, session_id: str) -> Response:
        params = request.form()
        reject_unknown_params(params, ("amount", "reason"))
        result = self.state.open_dispute(
            self.state.session_charge_id(session_id),
            amount=optional_amount(params),
            reason=optional_choice(params, "reason", DISPUTE_REASONS, "fraudulent"),
            pending_webhooks=self.pending_webhooks,
        )
        delivery = await self._deliver(result.event)
        return json_response(200, {**result.as_dict(), "webhook_delivery": delivery})

    async def _close_dispute(self, request: Request, dispute_id: str) -> Response:
        params = request.form()
        reject_unknown_params(params, ("status",))
        result = self.state.close_dispute(
            dispute_id,
            status=require_string(params, "status"),
            pending_webhooks=self.pending_webhooks,
        )
        delivery = await self._deliver(result.event)
        return json_response(200, {**result.as_dict(), "webhook_delivery": delivery})

    async def _configure_webhook(self, request: Request) -> Response:
        params = request.form()
        reject_unknown_params(params, ("url", "secret"))
        url = parse_url(params, "url", required=False)
        secret = optional_string(params, "secret")
        if bool(url) != bool(secret):
            raise StripeApiError(
                400, "Pass both url and secret, or neither to stop delivering events."
            )
        self.webhook_url = url
        self.webhook_secret = secret
        logger.info("Webhook target set to %s", url or "none")
        return json_response(200, {"webhook_url": url})

    async def _list_events(self, request: Request) -> Response:
        return json_response(200, list_object("/_test/events", self.state.events()))

    async def _redeliver_event(self, request: Request, event_id: str) -> Response:
        event = self.state.get_event(event_id)
        if event is None:
            raise no_such_object("event", event_id)
        if not self.webhook_url:
            raise StripeApiError(
                400,
                "No webhook target is configured. Start the server with --webhook-url and "
                "--webhook-secret.",
            )
        return json_response(200, await self._deliver(event))

    async def _list_deliveries(self, request: Request) -> Response:
        deliveries = self.state.webhook_deliveries()
        return json_response(200, list_object("/_test/webhook_deliveries", deliveries))

    async def _reset(self, request: Request) -> Response:
        self.state.reset()
        logger.info("Reset all state")
        return json_response(200, {"reset": True})

    async def _index(self, request: Request) -> Response:
        return json_response(
            200,
            {
                "object": "local_stripe_server",
                "api_base": request.base_url,
                "webhook_url": self.webhook_url,
            },
        )

    # Checkout page handlers.

    async def _show_checkout_page(self, request: Request, session_id: str) -> Response:
        session = self.state.get_session(session_id)
        if session is None:
            raise no_such_object("checkout.session", session_id)
        return html_response(200, checkout_page(session, self.state.line_items(session_id)))

    async def _submit_checkout_page(self, request: Request, session_id: str) -> Response:
        session = self.state.get_session(session_id)
        if session is None:
            raise no_such_object("checkout.session", session_id)
        if session["status"] != "open":
            page = checkout_page(session, self.state.line_items(session_id))
            return html_response(409, page)

        result = self.state.pay_session(session_id, pending_webhooks=self.pending_webhooks)
        await self._deliver(result.event)
        location = success_redirect_url(result.session)
        return Response(303, b"", content_type="text/plain", headers=[("Location", location)])


def build_app(
    *,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    public_url: str | None = None,
) -> StripeServerApp:
    """Create an app with empty state.

    With ``webhook_url`` and ``webhook_secret``, every generated event is POSTed there,
    signed with the secret. ``public_url`` replaces the request's scheme and host in
    session URLs, for a server reached through a proxy.
    """
    return StripeServerApp(
        webhook_url=webhook_url, webhook_secret=webhook_secret, public_url=public_url
    )


# --- Serving ---------------------------------------------------------------------------


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def run_in_thread(
    port: int = 0,
    *,
    app: StripeServerApp | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
) -> tuple[str, Callable[[], None]]:
    """Start the server on 127.0.0.1 in a daemon thread and wait until it accepts connections.

    ``port=0`` lets the OS pick a free port. Pass ``app`` to keep a handle on
    ``app.state``, or the webhook target to have one built. Returns the base URL, which
    is the value for ``stripe.api_base``, and a function that stops the server and joins
    the thread. Raises RuntimeError if the server does not start within 10 seconds.
    """
    if app is None:
        app = build_app(webhook_url=webhook_url, webhook_secret=webhook_secret)
    elif webhook_url or webhook_secret:
        raise ValueError("Pass the webhook target to build_app() when passing app.")

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    bound_port = listener.getsockname()[1]
    # log_config=None keeps uvicorn from reconfiguring the test process's logging.
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run,
        kwargs={"sockets": [listener]},
        name=f"stripe-server-{bound_port}",
        daemon=True,
    )
    thread.start()

    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            listener.close()
            raise RuntimeError(f"The Stripe stand-in failed to start on 127.0.0.1:{bound_port}.")
        time.sleep(0.01)
    if not wait_for_port("127.0.0.1", bound_port, timeout=2):
        server.should_exit = True
        raise RuntimeError(f"The Stripe stand-in on 127.0.0.1:{bound_port} refuses connections.")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()

    return f"http://127.0.0.1:{bound_port}", stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.stripe_server",
        description="Serve a local stand-in for the Stripe API and Checkout.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=12111, help="TCP port (default: %(default)s)")
    parser.add_argument(
        "--webhook-url",
        help="URL that receives signed events when a session changes, such as the "
        "dj-stripe webhook URL (default: no delivery)",
    )
    parser.add_argument(
        "--webhook-secret",
        default=os.environ.get("STRIPE_WEBHOOK_SECRET") or None,
        help="signing secret for --webhook-url, whsec_... (default: $STRIPE_WEBHOOK_SECRET)",
    )
    parser.add_argument(
        "--public-url",
        help="scheme and host that session URLs use, if clients reach this server "
        "through another address (default: the request's Host header)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level for uvicorn and this server (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.webhook_url and not args.webhook_secret:
        parser.error("--webhook-url needs --webhook-secret or $STRIPE_WEBHOOK_SECRET.")

    logging.basicConfig(
        level=args.log_level.upper(), format="%(levelname)s:  %(name)s  %(message)s"
    )
    app = build_app(
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret if args.webhook_url else None,
        public_url=args.public_url,
    )
    logger.info(
        "Serving the Stripe stand-in on http://%s:%d, webhooks %s",
        args.host,
        args.port,
        f"to {args.webhook_url}" if args.webhook_url else "off",
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on")


if __name__ == "__main__":
    main()
