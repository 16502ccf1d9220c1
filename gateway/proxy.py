"""The metering proxy: `/v1/chat/completions` and `/v1/messages`.

A request is admitted (key, limits, balance, routes) on the event loop with one round trip
to Redis when this process has the key and the account's configuration in memory, else
in a worker thread. It is forwarded with one pooled HTTP session per event loop, passed
back unbuffered, and metered in batches once its usage is known (gateway.metering). A
whole response is charged just after it is sent. A stream is forwarded event by event
and charged before its terminal event (`data: [DONE]` or `message_stop`) goes out, so a
client that has read the whole stream can already read its charge.
"""

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from django.conf import settings
from django.db import close_old_connections
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from gateway.errors import (
    ANTHROPIC,
    OPENAI,
    GatewayError,
    error_response,
    invalid_json,
    missing_key,
    set_request_id,
)
from gateway.limits import reservation_hold_cost
from gateway.metering import metering_queue
from gateway.models import UsageRecord
from gateway.pricing import TokenUsage, request_cost
from gateway.routing import (
    Admission,
    Route,
    models_for_key,
    request_admit,
    request_admit_cached,
)
from gateway.services import Attempt
from gateway.upstream import UpstreamError, UpstreamResponse, upstream_send
from gateway.usage import (
    StreamMeter,
    anthropic_usage,
    load_json,
    openai_usage,
    parse_sse_event,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

ANTHROPIC_DEFAULT_VERSION = "2023-06-01"
# Headers a client may send that the upstream needs to see.
ANTHROPIC_FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")
SSE_SEPARATORS = (b"\r\n\r\n", b"\n\n")

# Metering tasks that run after the response; kept so they are not collected early.
_background_tasks: set[asyncio.Task] = set()
# Admission has its own pool (metering has one in gateway.metering), so a backlog of
# metering writes cannot delay new requests.
ADMISSION_EXECUTOR = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gateway-admit")


async def run_in(executor: ThreadPoolExecutor, function: Callable[..., T], **kwargs) -> T:
    """Run a database function in a worker thread of `executor`."""

    def call() -> T:
        # Worker threads outlive requests, so they drop broken or expired connections
        # the way Django does at the start of each request.
        close_old_connections()
        return function(**kwargs)

    return await asyncio.get_running_loop().run_in_executor(executor, call)


def run_in_background(coroutine: Coroutine) -> None:
    task = asyncio.ensure_future(coroutine)
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)


async def background_tasks_drain() -> None:
    """Wait for metering still running after responses, before the server stops."""
    while _background_tasks:
        await asyncio.gather(*list(_background_tasks), return_exceptions=True)


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def raw_key_from(request: HttpRequest) -> str:
    authorization = request.headers.get("authorization", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return request.headers.get("x-api-key", "").strip()


def upstream_request_parts(
    *, route: Route, body: dict, request: HttpRequest
) -> tuple[str, dict[str, str], dict]:
    """Build the upstream URL, headers and body for a route."""
    upstream_body = dict(body)
    upstream_body["model"] = route.model
    # The fallback chain is the gateway's; providers reject the unknown parameter.
    upstream_body.pop("models", None)
    if route.api_format == OPENAI:
        url = f"{route.base_url}/chat/completions"
        # A custom provider may need no key; an empty credential header would be sent.
        headers = {"authorization": f"Bearer {route.api_key}"} if route.api_key else {}
        if upstream_body.get("stream"):
            # Ask for the usage chunk; it is removed again if the client did not ask.
            stream_options = dict(upstream_body.get("stream_options") or {})
            stream_options["include_usage"] = True
            upstream_body["stream_options"] = stream_options
    else:
        url = f"{route.base_url}/v1/messages"
        headers = {"x-api-key": route.api_key} if route.api_key else {}
        for name in ANTHROPIC_FORWARDED_HEADERS:
            if name in request.headers:
                headers[name] = request.headers[name]
        headers.setdefault("anthropic-version", ANTHROPIC_DEFAULT_VERSION)
    headers["content-type"] = "application/json"
    headers["accept"] = "text/event-stream" if upstream_body.get("stream") else "application/json"
    return url, headers, upstream_body


async def _meter(
    *,
    admission: Admission,
    route: Route,
    attempt: int,
    request_id: str,
    surface: str,
    status: str,
    http_status: int | None,
    streamed: bool,
    usage: TokenUsage,
    started: float,
    final: bool,
    error_type: str = "",
    urgent: bool = False,
) -> None:
    """Record one attempt and charge it; `final` marks the attempt that ends the request."""
    record = Attempt(
        request_id=request_id,
        attempt=attempt,
        account_id=admission.identity.account_id,
        key_id=admission.identity.key_id,
        provider=route.provider,
        model=route.model,
        surface=surface,
        key_source=route.key_source,
        status=status,
        http_status=http_status,
        streamed=streamed,
        usage=usage,
        latency_ms=int((time.monotonic() - started) * 1000),
        error_type=error_type,
        price=route.price,
        finished_at=timezone.now(),
    )
    # Settling counts the cost against the key's limits and drops the request's hold.
    await metering_queue().submit(
        attempt=record, reservation=admission.reservation, final=final, urgent=urgent
    )


# Upstream statuses after which the next model of a `models` fallback chain is tried.
RETRYABLE_STATUS = frozenset({429}) | frozenset(range(500, 600))


async def proxy(request: HttpRequest, *, surface: str) -> HttpResponse:
    request_id = new_request_id()
    started = time.monotonic()

    # 1. Authenticate and parse before anything is forwarded.
    raw_key = raw_key_from(request)
    if not raw_key:
        return error_response(missing_key(), surface=surface, request_id=request_id)
    body = load_json(request.body)
    if body is None:
        return error_response(invalid_json(), surface=surface, request_id=request_id)
    try:
        admission = await request_admit_cached(raw_key=raw_key, body=body, surface=surface)
        if admission is None:
            admission = await run_in(
                ADMISSION_EXECUTOR, request_admit, raw_key=raw_key, body=body, surface=surface
            )
    except GatewayError as error:
        return error_response(error, surface=surface, request_id=request_id)

    # 2. Try each route of the fallback chain until one responds without a retryable error.
    streamed = bool(body.get("stream"))
    routes = admission.routes
    for index, route in enumerate(routes, start=1):
        last = index == len(routes)
        meter_args = {
            "admission": admission,
            "route": route,
            "attempt": index,
            "request_id": request_id,
            "surface": surface,
            "streamed": streamed,
            "started": started,
        }
        url, headers, upstream_body = upstream_request_parts(
            route=route, body=body, request=request
        )
        try:
            upstream = await upstream_send(
                url=url,
                headers=headers,
                body=json.dumps(upstream_body).encode(),
                public_only=route.key_source == UsageRecord.KeySource.CUSTOM,
            )
        except UpstreamError as exc:
            timed_out = exc.timed_out
            logger.warning(
                "Upstream %s failed for request %s attempt %s: %s",
                route.provider,
                request_id,
                index,
                exc,
            )
            await _meter(
                **meter_args,
                status=UsageRecord.Status.FAILED,
                http_status=None,
                usage=TokenUsage(),
                final=last,
                error_type="timeout" if timed_out else "unreachable",
            )
            if not last:
                continue
            if timed_out:
                error = GatewayError(
                    504,
                    "The upstream provider timed out.",
                    openai_type="api_error",
                    code="timeout",
                )
            else:
                error = GatewayError(
                    502,
                    f"The upstream provider `{route.provider}` could not be reached.",
                    openai_type="api_error",
                    code="upstream_unreachable",
                )
            return error_response(error, surface=surface, request_id=request_id)

        if upstream.status_code in RETRYABLE_STATUS and not last:
            await upstream.close()
            await _meter(
                **meter_args,
                status=UsageRecord.Status.UPSTREAM_ERROR,
                http_status=upstream.status_code,
                usage=TokenUsage(),
                final=False,
                error_type=f"http_{upstream.status_code}",
            )
            continue

        # 3. Upstream errors pass through with their status and body, uncharged.
        if upstream.status_code >= 400 or not streamed:
            return await _whole_response(upstream=upstream, meter_args=meter_args)

        client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = _stream_events(
            upstream=upstream,
            meter_args=meter_args,
            body=body,
            client_wants_usage=client_wants_usage,
        )
        response = StreamingHttpResponse(
            events, status=upstream.status_code, content_type="text/event-stream; charset=utf-8"
        )
        response.event_stream = events  # type: ignore[attr-defined]
        response["cache-control"] = "no-cache"
        response["x-accel-buffering"] = "no"
        set_request_id(response, request_id=request_id, surface=surface)
        return response
    raise AssertionError("request_admit returned no route")


async def _whole_response(*, upstream: UpstreamResponse, meter_args: dict) -> HttpResponse:
    try:
        content = await upstream.read()
    except UpstreamError as exc:
        logger.warning(
            "Upstream broke off the response to request %s: %s", meter_args["request_id"], exc
        )
        await _meter(
            **meter_args,
            status=UsageRecord.Status.FAILED,
            http_status=upstream.status_code,
            usage=TokenUsage(),
            final=True,
            error_type="timeout" if exc.timed_out else "upstream_cut",
        )
        error = GatewayError(
            504 if exc.timed_out else 502,
            "The upstream provider timed out."
            if exc.timed_out
            else "The upstream provider broke off its response.",
            openai_type="api_error",
            code="timeout" if exc.timed_out else "upstream_unreachable",
        )
        return error_response(
            error, surface=meter_args["surface"], request_id=meter_args["request_id"]
        )
    finally:
        await upstream.close()
    succeeded = upstream.status_code < 400
    surface = meter_args["surface"]
    usage = TokenUsage()
    if succeeded:
        payload = load_json(content) or {}
        raw_usage = payload.get("usage") or {}
        usage = openai_usage(raw_usage) if surface == OPENAI else anthropic_usage(raw_usage)
    after_response = settings.GATEWAY_METER_AFTER_RESPONSE
    metering = _meter(
        **meter_args,
        status=UsageRecord.Status.SUCCEEDED if succeeded else UsageRecord.Status.UPSTREAM_ERROR,
        http_status=upstream.status_code,
        usage=usage,
        final=True,
        error_type="" if succeeded else f"http_{upstream.status_code}",
        urgent=not after_response,
    )
    admission = meter_args["admission"]
    route = meter_args["route"]
    if after_response and succeeded and admission.reservation is not None:
        cost = request_cost(usage=usage, price=route.price).total_nanousd
        await reservation_hold_cost(
            reservation=admission.reservation,
            identity=admission.identity,
            cost_nanousd=cost,
            at=timezone.now(),
        )
    if after_response:
        # The charge lands a few milliseconds after the client has its response.
        run_in_background(metering)
    else:
        await metering
    response = HttpResponse(
        content,
        status=upstream.status_code,
        content_type=upstream.headers.get("content-type", "application/json"),
    )
    if "retry-after" in upstream.headers:
        response["retry-after"] = upstream.headers["retry-after"]
    # Names the provider that responded, so an upstream 401 is not mistaken for a rejected
    # access key.
    response["x-tollbooth-provider"] = route.provider
    set_request_id(response, request_id=meter_args["request_id"], surface=surface)
    return response


def _split_event(buffer: bytes) -> tuple[bytes, bytes] | None:
    """Cut the first complete SSE event (with its blank line) off the buffer."""
    positions = [
        (buffer.find(separator), separator)
        for separator in SSE_SEPARATORS
        if buffer.find(separator) != -1
    ]
    if not positions:
        return None
    index, separator = min(positions)
    end = index + len(separator)
    return buffer[:end], buffer[end:]


def _is_usage_only_chunk(payload: dict) -> bool:
    return payload.get("choices") == [] and bool(payload.get("usage"))


# `"usage":null` as OpenAI adds it to every chunk once `include_usage` is set.
USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,')


async def _stream_events(
    *,
    upstream: UpstreamResponse,
    meter_args: dict,
    body: dict,
    client_wants_usage: bool,
) -> AsyncIterator[bytes]:
    """Forward a stream event by event, reading usage on the way.

    For an OpenAI client that did not request usage, the gateway drops the usage chunk it
    requested and removes the `"usage":null` that upstream added to the other chunks. The
    client then gets the bytes upstream would have sent without `include_usage`.
    """
    surface = meter_args["surface"]
    strip_usage = surface == OPENAI and not client_wants_usage
    meter = StreamMeter(surface=surface)
    metered = False
    completed = False
    error_type = ""
    buffer = b""

    async def meter_now(status: str, *, urgent: bool = False) -> None:
        nonlocal metered
        metered = True
        await _meter(
            **meter_args,
            status=status,
            http_status=upstream.status_code,
            usage=meter.final_usage(request_body=body),
            final=True,
            error_type=error_type,
            urgent=urgent,
        )

    try:
        try:
            async for chunk in upstream.iter_chunks():
                buffer += chunk
                while (split := _split_event(buffer)) is not None:
                    raw_event, buffer = split
                    event_type, data = parse_sse_event(raw_event)
                    terminal = False
                    if surface == OPENAI:
                        if data == b"[DONE]":
                            terminal = True
                            meter.finished = True
                        else:
                            payload = load_json(data)
                            if payload is not None:
                                meter.observe_openai(payload)
                                if strip_usage:
                                    if _is_usage_only_chunk(payload):
                                        continue
                                    raw_event = USAGE_NULL.sub(b"", raw_event)
                    else:
                        payload = load_json(data)
                        if payload is not None:
                            meter.observe_anthropic(event_type or payload.get("type", ""), payload)
                        terminal = event_type == "message_stop"
                    if terminal and not metered:
                        # The client waits for this event, so the charge skips the window.
                        await meter_now(UsageRecord.Status.SUCCEEDED, urgent=True)
                    yield raw_event
        except UpstreamError as exc:
            # Upstream cut the stream; the client is charged for what it received.
            error_type = "upstream_cut"
            logger.warning(
                "Upstream stream cut for request %s: %s",
                meter_args["request_id"],
                exc,
            )
        else:
            if buffer:
                yield buffer
            completed = True
    finally:
        if not metered:
            if completed and meter.finished:
                status = UsageRecord.Status.SUCCEEDED
            else:
                status = UsageRecord.Status.ABORTED
                error_type = error_type or ("incomplete" if completed else "client_abort")
            # The client may be gone and this generator cancelled, so the record is
            # written by a task of its own.
            run_in_background(meter_now(status))
        await upstream.close()


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return _method_not_allowed(surface=OPENAI)
    return await proxy(request, surface=OPENAI)


@csrf_exempt
async def messages(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return _method_not_allowed(surface=ANTHROPIC)
    return await proxy(request, surface=ANTHROPIC)


def _method_not_allowed(*, surface: str) -> HttpResponse:
    error = GatewayError(405, "Use POST for this endpoint.", code="method_not_allowed")
    return error_response(error, surface=surface, request_id=new_request_id())


@csrf_exempt
async def models_list(request: HttpRequest) -> HttpResponse:
    """List the models the key may call, in the OpenAI or, for Anthropic clients, its shape."""
    surface = ANTHROPIC if "anthropic-version" in request.headers else OPENAI
    request_id = new_request_id()
    raw_key = raw_key_from(request)
    if not raw_key:
        return error_response(missing_key(), surface=surface, request_id=request_id)
    try:
        models = await run_in(
            ADMISSION_EXECUTOR,
            models_for_key,
            raw_key=raw_key,
            # Anthropic clients get only what /v1/messages accepts; the OpenAI-shaped
            # list stays the full catalog.
            api_format=ANTHROPIC if surface == ANTHROPIC else None,
        )
    except GatewayError as error:
        return error_response(error, surface=surface, request_id=request_id)
    if surface == ANTHROPIC:
        data = [
            {
                "type": "model",
                "id": model["id"],
                "display_name": model["id"],
                "created_at": model["created_at"],
            }
            for model in models
        ]
        payload: dict = {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    else:
        payload = {
            "object": "list",
            "data": [
                {
                    "id": model["id"],
                    "object": "model",
                    "created": model["created"],
                    "owned_by": model["owned_by"],
                }
                for model in models
            ],
        }
    response = HttpResponse(json.dumps(payload), content_type="application/json")
    set_request_id(response, request_id=request_id, surface=surface)
    return response
