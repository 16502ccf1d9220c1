"""Serve a local stand-in for the OpenAI and Anthropic HTTP APIs.

Tests, the ``make run`` demo and benchmarks point the gateway here because real
providers cannot be reached from this machine. Start it with::

    python -m devtools.upstream --host 127.0.0.1 --port 9100

or, inside a test, with ``run_in_thread()``. ``build_app()`` returns the bare ASGI app.

Endpoints:

    POST /v1/chat/completions   OpenAI Chat Completions (also at /chat/completions)
    POST /v1/messages           Anthropic Messages
    GET  /v1/models             OpenAI-shaped model list (also at /models), no auth
    GET  /_last_request         the last request sent to one of the two POST endpoints,
                                404 until there is one

Token counting is deterministic, so tests can assert exact numbers:

- Input tokens are the number of whitespace-separated words in all message text, at
  least 1. For OpenAI that is ``messages[].content``. For Anthropic it is ``system``
  plus ``messages[].content``. Content may be a string or a list of parts, and only
  ``{"type": "text", "text": ...}`` parts count, so images and tool blocks add nothing.
- The reply text is ``"tok0 tok1 ... tok{N-1}"`` and output tokens are N, where
  N = min(limit, 64). The limit is ``max_completion_tokens``, else ``max_tokens``,
  else 8. The header ``x-upstream-output-tokens`` sets N directly (0 to 100000) and
  ignores the limit.
- The stop reason is "length" (OpenAI) or "max_tokens" (Anthropic) when the request
  gave a limit and N is at least that limit, and "stop" or "end_turn" otherwise.

Control headers, all optional and all integers unless noted:

    x-upstream-output-tokens: N       reply length in tokens, see above
    x-upstream-cached-tokens: C       OpenAI: prompt_tokens_details.cached_tokens = C and
                                      prompt_tokens = input + C. Anthropic:
                                      cache_read_input_tokens = C, input_tokens unchanged.
    x-upstream-cache-write-tokens: W  Anthropic: cache_creation_input_tokens = W
    x-upstream-reasoning-tokens: R    OpenAI: completion_tokens_details.reasoning_tokens = R
                                      and completion_tokens = N + R
    x-upstream-status: S              reply with status S (400-599) and the error body of
                                      the endpoint's API, after the auth check
    x-upstream-delay-ms: D            wait D ms before handling the request
    x-upstream-chunk-delay-ms: D      wait D ms between stream events
    x-upstream-cut-after: K           drop the connection after K content events, so the
                                      stream ends without finish, usage or terminal event
    x-upstream-split-deltas: 1        Anthropic streams: send two message_delta events, the
                                      first with output_tokens N // 2 and the second with N.
                                      Both are cumulative, so a consumer must keep the last.

A request for the model ``fail-500`` always gets a 500.

Streams follow the public wire formats:

- OpenAI: one ``data:`` chunk per output token (the first one also carries
  ``"role": "assistant"``, and with N = 0 a single role chunk has empty content), a
  chunk with the finish_reason, then, only with ``stream_options.include_usage``, a
  chunk with ``"choices": []`` and the usage, then ``data: [DONE]``. With include_usage
  every other chunk has ``"usage": null``. Without it no chunk has a usage key.
- Anthropic: message_start (usage with output_tokens 1), content_block_start, ping, one
  content_block_delta per output token, content_block_stop, message_delta, message_stop.

Authentication only checks that credentials are present. OpenAI needs a non-empty
bearer token. Anthropic needs a non-empty ``x-api-key`` or bearer token, and an
``anthropic-version`` header. The recorded request replaces credential header values
with "[redacted]".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn

logger = logging.getLogger("devtools.upstream")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_OUTPUT_TOKENS = 8
MAX_DEFAULT_OUTPUT_TOKENS = 64
MAX_OUTPUT_TOKENS_OVERRIDE = 100_000
# Caps typos such as a delay given in microseconds, which would hang a test run.
MAX_DELAY_MS = 600_000
FAILING_MODEL = "fail-500"
MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5", "claude-haiku-4-5")
# A fixed timestamp keeps /v1/models byte-identical between runs.
MODELS_CREATED = 1_700_000_000
SYSTEM_FINGERPRINT = "fp_upstream_standin"
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie"}
)
# Unpaced stream events are batched into ASGI sends of about this many bytes to cut
# the per-send overhead on long streams.
STREAM_FLUSH_BYTES = 16 * 1024
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
]
CUT_STREAM_LOG_MESSAGE = "ASGI callable returned without completing response."

OPENAI_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", None),
    405: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def dump_json(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


class RequestError(Exception):
    """Error that the endpoint turns into its API's error body and status."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


# --- Control headers -------------------------------------------------------------


@dataclass(frozen=True)
class Controls:
    """Test behaviour requested through the ``x-upstream-*`` headers."""

    output_tokens: int | None = None
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    status: int | None = None
    delay_ms: int = 0
    chunk_delay_ms: int = 0
    cut_after: int | None = None
    split_deltas: bool = False


def parse_header_int(
    headers: dict[str, str], name: str, *, minimum: int = 0, maximum: int | None = None
) -> int | None:
    """Parse an optional integer header, raising a 400 that names the header."""
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise RequestError(400, f"Invalid header {name}: {raw!r} is not an integer.") from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and at most {maximum}"
        raise RequestError(
            400, f"Invalid header {name}: {value} must be at least {minimum}{upper}."
        )
    return value


def parse_header_flag(headers: dict[str, str], name: str) -> bool:
    raw = headers.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise RequestError(400, f"Invalid header {name}: {raw!r}, expected 1 or 0.")


def control_values(request: Request) -> dict[str, str]:
    """Merge the ``x-upstream-*`` headers with the body's ``x_upstream`` object.

    A proxy in front of this server forwards the body but not arbitrary headers, so
    tests of such a proxy put the controls in the body: ``{"x_upstream":
    {"output-tokens": 100000}}`` acts like the header ``x-upstream-output-tokens: 100000``.
    Headers win where both are given.
    """
    values = dict(request.headers)
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        return values
    extra = body.get("x_upstream") if isinstance(body, dict) else None
    if isinstance(extra, dict):
        for name, value in extra.items():
            values.setdefault(f"x-upstream-{name}", str(value))
    return values


def parse_controls(headers: dict[str, str]) -> Controls:
    """Read the ``x-upstream-*`` headers, raising a 400 on a malformed value."""

    def number(name: str, **bounds: int) -> int:
        return parse_header_int(headers, "x-upstream-" + name, **bounds) or 0

    return Controls(
        output_tokens=parse_header_int(
            headers, "x-upstream-output-tokens", maximum=MAX_OUTPUT_TOKENS_OVERRIDE
        ),
        cached_tokens=number("cached-tokens"),
        cache_write_tokens=number("cache-write-tokens"),
        reasoning_tokens=number("reasoning-tokens"),
        status=parse_header_int(headers, "x-upstream-status", minimum=400, maximum=599),
        delay_ms=number("delay-ms", maximum=MAX_DELAY_MS),
        chunk_delay_ms=number("chunk-delay-ms", maximum=MAX_DELAY_MS),
        cut_after=parse_header_int(headers, "x-upstream-cut-after"),
        split_deltas=parse_header_flag(headers, "x-upstream-split-deltas"),
    )


# --- Request body ----------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Everything needed to write one reply, decided before the first byte is sent."""

    model: str
    input_tokens: int
    output_tokens: int
    hit_limit: bool
    stream: bool
    include_usage: bool
    controls: Controls

    def piece(self, index: int) -> str:
        """Return the text of output token ``index`` as it appears in a stream delta."""
        return f"tok{index}" if index == 0 else f" tok{index}"

    @property
    def text(self) -> str:
        return " ".join(f"tok{index}" for index in range(self.output_tokens))


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"Invalid JSON in request body: {exc}.") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "Invalid request body: expected a JSON object.")
    return payload


def count_content_words(content: Any, param: str) -> int:
    """Count words in a string or in the text parts of a content list."""
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content.split())
    if not isinstance(content, list):
        raise RequestError(400, f"Invalid {param}: expected a string or a list of parts.", param)
    words = 0
    for part in content:
        if not isinstance(part, dict):
            raise RequestError(400, f"Invalid {param}: each part must be an object.", param)
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            words += len(part["text"].split())
    return words


def count_message_words(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "Invalid messages: expected a non-empty list.", "messages")
    words = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            param = f"messages.{index}"
            raise RequestError(400, f"Invalid {param}: expected an object.", param)
        words += count_content_words(message.get("content"), f"messages.{index}.content")
    return words


def bearer_token(headers: dict[str, str]) -> str:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "Missing required parameter: model.", "model")
    if model == FAILING_MODEL:
        raise RequestError(500, f"Simulated server error: the model {FAILING_MODEL} always fails.")
    return model


def optional_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"Invalid {name}: expected a boolean, got {value!r}.", name)
    return value


def optional_limit(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(400, f"Invalid {name}: expected an integer >= 1, got {value!r}.", name)
    return value


def make_plan(
    *,
    model: str,
    words: int,
    limit: int | None,
    stream: bool,
    include_usage: bool,
    controls: Controls,
) -> Plan:
    """Apply the token counting rules from the module docstring."""
    if controls.output_tokens is not None:
        output_tokens = controls.output_tokens
    else:
        output_tokens = min(limit or DEFAULT_OUTPUT_TOKENS, MAX_DEFAULT_OUTPUT_TOKENS)
    return Plan(
        model=model,
        input_tokens=max(words, 1),
        output_tokens=output_tokens,
        hit_limit=limit is not None and output_tokens >= limit,
        stream=stream,
        include_usage=include_usage,
        controls=controls,
    )


# --- OpenAI Chat Completions -----------------------------------------------------


# A stream event as (kind, encoded bytes). The kind is "head", "content" or "tail".
Event = tuple[str, bytes]


class OpenAIChat:
    """Wire format of ``POST /v1/chat/completions``."""

    request_id_header = b"x-request-id"

    def authenticate(self, headers: dict[str, str]) -> None:
        if not bearer_token(headers):
            raise RequestError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.")

    def error_body(self, error: RequestError) -> dict[str, Any]:
        error_type, code = OPENAI_ERROR_TYPES.get(error.status, ("server_error", None))
        return {
            "error": {
                "message": error.message,
                "type": error_type,
                "param": error.param,
                "code": code,
            }
        }

    def plan(self, body: dict[str, Any], controls: Controls) -> Plan:
        model = require_model(body)
        words = count_message_words(body.get("messages"))
        stream = optional_bool(body, "stream")
        include_usage = self._include_usage(body, stream)
        limit = optional_limit(body, "max_completion_tokens")
        if limit is None:
            limit = optional_limit(body, "max_tokens")
        return make_plan(
            model=model,
            words=words,
            limit=limit,
            stream=stream,
            include_usage=include_usage,
            controls=controls,
        )

    def _include_usage(self, body: dict[str, Any], stream: bool) -> bool:
        options = body.get("stream_options")
        if options is None:
            return False
        # OpenAI rejects stream_options without stream: true with a 400 on param
        # "stream_options", so a gateway that always adds it fails here as in production.
        if not stream:
            raise RequestError(
                400,
                "Invalid stream_options: only allowed when stream is true.",
                "stream_options",
            )
        if not isinstance(options, dict):
            raise RequestError(
                400, "Invalid stream_options: expected an object.", "stream_options"
            )
        return optional_bool(options, "include_usage")

    def usage(self, plan: Plan) -> dict[str, Any]:
        controls = plan.controls
        prompt_tokens = plan.input_tokens + controls.cached_tokens
        completion_tokens = plan.output_tokens + controls.reasoning_tokens
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": controls.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": controls.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def finish_reason(self, plan: Plan) -> str:
        return "length" if plan.hit_limit else "stop"

    def response_body(self, plan: Plan) -> dict[str, Any]:
        return {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": plan.model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": plan.text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": self.finish_reason(plan),
                }
            ],
            "usage": self.usage(plan),
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def stream_events(self, plan: Plan) -> Iterator[Event]:
        completion_id = new_id("chatcmpl-")
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], usage: Any = None) -> bytes:
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": plan.model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": choices,
            }
            if plan.include_usage:
                payload["usage"] = usage
            return b"data: " + dump_json(payload) + b"\n\n"

        def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

        if plan.output_tokens == 0:
            yield "head", chunk([choice({"role": "assistant", "content": ""})])
        for index in range(plan.output_tokens):
            delta = {"content": plan.piece(index)}
            if index == 0:
                delta = {"role": "assistant", **delta}
            yield "content", chunk([choice(delta)])
        yield "tail", chunk([choice({}, self.finish_reason(plan))])
        if plan.include_usage:
            yield "tail", chunk([], self.usage(plan))
        yield "tail", b"data: [DONE]\n\n"


# --- Anthropic Messages ----------------------------------------------------------


class AnthropicMessages:
    """Wire format of ``POST /v1/messages``."""

    request_id_header = b"request-id"

    def authenticate(self, headers: dict[str, str]) -> None:
        # The pinned anthropic SDK (2.17.0) sends api_key as 'Authorization: Bearer',
        # so that is accepted as well as x-api-key.
        if not headers.get("x-api-key", "").strip() and not bearer_token(headers):
            raise RequestError(
                401,
                "Missing API key: send it in the x-api-key header "
                "or as 'Authorization: Bearer <key>'.",
            )
        if not headers.get("anthropic-version", "").strip():
            raise RequestError(
                400,
                "Missing anthropic-version header, for example 'anthropic-version: 2023-06-01'.",
            )

    def error_body(self, error: RequestError) -> dict[str, Any]:
        error_type = ANTHROPIC_ERROR_TYPES.get(error.status, "api_error")
        return {"type": "error", "error": {"type": error_type, "message": error.message}}

    def plan(self, body: dict[str, Any], controls: Controls) -> Plan:
        model = require_model(body)
        words = count_content_words(body.get("system"), "system")
        words += count_message_words(body.get("messages"))
        return make_plan(
            model=model,
            words=words,
            limit=optional_limit(body, "max_tokens"),
            stream=optional_bool(body, "stream"),
            include_usage=True,
            controls=controls,
        )

    def stop_reason(self, plan: Plan) -> str:
        return "max_tokens" if plan.hit_limit else "end_turn"

    def input_usage(self, plan: Plan) -> dict[str, int]:
        return {
            "input_tokens": plan.input_tokens,
            "cache_creation_input_tokens": plan.controls.cache_write_tokens,
            "cache_read_input_tokens": plan.controls.cached_tokens,
        }

    def response_body(self, plan: Plan) -> dict[str, Any]:
        return {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": plan.model,
            "content": [{"type": "text", "text": plan.text}],
            "stop_reason": self.stop_reason(plan),
            "stop_sequence": None,
            "usage": {**self.input_usage(plan), "output_tokens": plan.output_tokens},
        }

    def stream_events(self, plan: Plan) -> Iterator[Event]:
        def event(name: str, payload: dict[str, Any]) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + dump_json(payload) + b"\n\n"

        def message_delta(stop_reason: str | None, output_tokens: int) -> bytes:
            return event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens},
                },
            )

        message = {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": plan.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**self.input_usage(plan), "output_tokens": 1},
        }
        yield "head", event("message_start", {"type": "message_start", "message": message})
        yield (
            "head",
            event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
        )
        yield "head", event("ping", {"type": "ping"})
        for index in range(plan.output_tokens):
            delta = {"type": "text_delta", "text": plan.piece(index)}
            yield (
                "content",
                event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                ),
            )
        yield "tail", event("content_block_stop", {"type": "content_block_stop", "index": 0})
        if plan.controls.split_deltas:
            yield "tail", message_delta(None, plan.output_tokens // 2)
        yield "tail", message_delta(self.stop_reason(plan), plan.output_tokens)
        yield "tail", event("message_stop", {"type": "message_stop"})


Surface = OpenAIChat | AnthropicMessages


# --- ASGI plumbing ---------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    body: bytes

    def record(self) -> dict[str, Any]:
        """Describe the request for ``/_last_request`` with credential values redacted."""
        headers = {
            name: "[redacted]" if name in CREDENTIAL_HEADERS else value
            for name, value in self.headers.items()
        }
        try:
            payload = json.loads(self.body) if self.body else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            payload = None
        return {
            "method": self.method,
            "path": self.path,
            "query_string": self.query_string,
            "headers": headers,
            "json": payload,
        }


def decode_headers(raw_headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw_headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


async def read_body(receive: Receive) -> bytes | None:
    """Read the whole request body, or return None if the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_json(
    send: Send, status: int, payload: Any, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = dump_json(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class EventWriter:
    """Send SSE events, batching them unless a chunk delay is set."""

    def __init__(self, send: Send, chunk_delay_ms: int) -> None:
        self._send = send
        self._chunk_delay = chunk_delay_ms / 1000
        self._buffer: list[bytes] = []
        self._buffered_bytes = 0
        self._events_written = 0

    async def write(self, event: bytes) -> None:
        if self._chunk_delay and self._events_written:
            await self.flush()
            await asyncio.sleep(self._chunk_delay)
        self._buffer.append(event)
        self._buffered_bytes += len(event)
        self._events_written += 1
        if self._chunk_delay or self._buffered_bytes >= STREAM_FLUSH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            body = b"".join(self._buffer)
            self._buffer.clear()
            self._buffered_bytes = 0
            await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def finish(self) -> None:
        await self.flush()
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


async def watch_disconnect(receive: Receive, disconnected: asyncio.Event) -> None:
    """Set ``disconnected`` when the client goes away, so a long stream stops early."""
    while (await receive())["type"] != "http.disconnect":
        pass
    disconnected.set()


async def send_stream(
    send: Send,
    receive: Receive,
    events: Iterator[Event],
    controls: Controls,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """Send ``events`` as an SSE response, honouring the chunk delay and the cut."""
    await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *headers]})
    writer = EventWriter(send, controls.chunk_delay_ms)
    disconnected = asyncio.Event()
    watcher = asyncio.create_task(watch_disconnect(receive, disconnected))
    content_sent = 0
    try:
        for kind, event in events:
            if disconnected.is_set():
                logger.info("Client disconnected after %d content events.", content_sent)
                return
            # The cut comes before anything that follows the K-th content event, but
            # leaves the head events alone so K = 0 still yields a valid stream start.
            if (
                controls.cut_after is not None
                and kind != "head"
                and content_sent >= controls.cut_after
            ):
                await writer.flush()
                logger.info(
                    "Cutting the stream after %d content events as requested.", content_sent
                )
                # Returning before the final body message makes uvicorn close the
                # connection without the chunked-encoding terminator, which clients
                # see as a broken transfer rather than a clean end of stream.
                return
            await writer.write(event)
            content_sent += kind == "content"
        await writer.finish()
    finally:
        watcher.cancel()


class UpstreamApp:
    """ASGI app that serves the stand-in endpoints and stores the last request."""

    def __init__(self) -> None:
        self.last_request: dict[str, Any] | None = None
        # Paths outside the two APIs get errors in the OpenAI shape.
        self._openai = OpenAIChat()
        anthropic_messages = AnthropicMessages()
        self._routes: dict[str, tuple[str, Callable[..., Awaitable[None]]]] = {
            "/v1/chat/completions": ("POST", self._generation_handler(self._openai)),
            "/chat/completions": ("POST", self._generation_handler(self._openai)),
            "/v1/messages": ("POST", self._generation_handler(anthropic_messages)),
            "/v1/models": ("GET", self._list_models),
            "/models": ("GET", self._list_models),
            "/_last_request": ("GET", self._show_last_request),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            # Closing before accepting makes uvicorn reject the handshake with 403.
            await receive()
            await send({"type": "websocket.close"})
            return
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if body is None:
            return
        request = Request(
            method=scope["method"],
            path=scope["path"],
            query_string=scope.get("query_string", b"").decode("latin-1"),
            headers=decode_headers(scope.get("headers", [])),
            body=body,
        )
        route = self._routes.get(request.path.rstrip("/") or "/")
        if route is None:
            error = RequestError(404, f"Not found: {request.method} {request.path}.")
            await send_json(send, 404, self._openai.error_body(error))
            return
        method, handler = route
        if request.method != method:
            error = RequestError(
                405, f"Method {request.method} not allowed on {request.path}, use {method}."
            )
            await send_json(
                send, 405, self._openai.error_body(error), [(b"allow", method.encode())]
            )
            return
        await handler(request, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _generation_handler(self, surface: Surface) -> Callable[..., Awaitable[None]]:
        async def handle(request: Request, receive: Receive, send: Send) -> None:
            self.last_request = request.record()
            await self._generate(surface, request, receive, send)

        return handle

    async def _generate(
        self, surface: Surface, request: Request, receive: Receive, send: Send
    ) -> None:
        headers = [(surface.request_id_header, new_id("req_").encode())]
        try:
            controls = parse_controls(control_values(request))
            if controls.delay_ms:
                await asyncio.sleep(controls.delay_ms / 1000)
            surface.authenticate(request.headers)
            if controls.status is not None:
                raise RequestError(
                    controls.status, f"Simulated error: x-upstream-status {controls.status}."
                )
            plan = surface.plan(parse_json_object(request.body), controls)
        except RequestError as error:
            logger.info(
                "%s %s -> %d: %s", request.method, request.path, error.status, error.message
            )
            await send_json(send, error.status, surface.error_body(error), headers)
            return
        if plan.stream:
            await send_stream(send, receive, surface.stream_events(plan), controls, headers)
        else:
            await send_json(send, 200, surface.response_body(plan), headers)

    async def _list_models(self, request: Request, receive: Receive, send: Send) -> None:
        models = [
            {
                "id": model_id,
                "object": "model",
                "created": MODELS_CREATED,
                "owned_by": "anthropic" if model_id.startswith("claude") else "openai",
            }
            for model_id in MODEL_IDS
        ]
        await send_json(send, 200, {"object": "list", "data": models})

    async def _show_last_request(self, request: Request, receive: Receive, send: Send) -> None:
        if self.last_request is None:
            error = RequestError(404, "No request recorded yet.")
            await send_json(send, 404, self._openai.error_body(error))
            return
        await send_json(send, 200, self.last_request)


def build_app() -> UpstreamApp:
    """Create a fresh app with an empty last-request record."""
    return UpstreamApp()


# --- Serving ---------------------------------------------------------------------


class _DropCutStreamError(logging.Filter):
    """Drop uvicorn's error line for streams that ``x-upstream-cut-after`` cut on purpose.

    This app leaves a response incomplete only in that case, so the line would always
    be a false alarm in test and benchmark output.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != CUT_STREAM_LOG_MESSAGE


def install_log_filter() -> None:
    uvicorn_logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(item, _DropCutStreamError) for item in uvicorn_logger.filters):
        uvicorn_logger.addFilter(_DropCutStreamError())


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def run_in_thread(port: int = 0) -> tuple[str, Callable[[], None]]:
    """Start the server on 127.0.0.1 in a daemon thread and wait until it accepts connections.

    ``port=0`` lets the OS pick a free port. Returns the base URL without a path (append
    ``/v1`` for the OpenAI SDK) and a function that stops the server and joins the thread.
    Raises RuntimeError if the server does not start within 10 seconds.
    """
    install_log_filter()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    bound_port = listener.getsockname()[1]
    # log_config=None keeps uvicorn from reconfiguring the test process's logging.
    config = uvicorn.Config(
        build_app(), log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run,
        kwargs={"sockets": [listener]},
        name=f"upstream-{bound_port}",
        daemon=True,
    )
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=5)
        listener.close()

    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"The upstream stand-in failed to start on 127.0.0.1:{bound_port}.")
        time.sleep(0.01)
    if not wait_for_port("127.0.0.1", bound_port, timeout=2):
        stop()
        raise RuntimeError(
            f"The upstream stand-in on 127.0.0.1:{bound_port} is not accepting connections."
        )

    return f"http://127.0.0.1:{bound_port}", stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.upstream",
        description="Serve a local stand-in for the OpenAI and Anthropic APIs.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=9100, help="TCP port (default: %(default)s)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level for uvicorn and this server (default: %(default)s)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log every request (off by default for benchmarks)",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=args.log_level.upper(), format="%(levelname)s:  %(name)s  %(message)s"
    )
    install_log_filter()
    uvicorn.run(
        build_app(),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
