"""A lean ASGI adapter for the gateway views.

Django's ASGI handler sends request signals whose receivers run in worker threads and
closes every response in a thread; together that costs milliseconds a request. The
gateway needs none of it: its views read only the method, the headers and the body,
and reach the database through their own thread pools. This adapter calls the same
view functions that Django's URL configuration maps, so Django's test client and a
WSGI server still reach them the usual way.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from django.http import HttpResponse, StreamingHttpResponse
from django.utils.datastructures import CaseInsensitiveMapping

from gateway import proxy

logger = logging.getLogger(__name__)

ROUTES: dict[str, Callable[..., Awaitable[HttpResponse]]] = {
    "/v1/chat/completions": proxy.chat_completions,
    "/v1/messages": proxy.messages,
    "/v1/models": proxy.models_list,
}


class GatewayRequest:
    """The parts of an HTTP request the gateway views read."""

    def __init__(self, *, method: str, headers: CaseInsensitiveMapping, body: bytes) -> None:
        self.method = method
        self.headers = headers
        self.body = body


async def _read_body(receive) -> bytes | None:
    """Return the request body, or None when the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _header_pairs(response: HttpResponse) -> list[tuple[bytes, bytes]]:
    return [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in response.items()
    ]


async def _send_streaming(response: StreamingHttpResponse, receive, send) -> None:
    """Send a stream until it ends or the client disconnects, which cancels it."""
    # The proxy's own generator, so closing it runs its `finally` (Django's wrapper
    # around it would leave it open).
    iterator: AsyncIterator[bytes] = getattr(response, "event_stream", None) or (
        response.streaming_content  # type: ignore[assignment]
    )

    async def pump() -> None:
        try:
            async for chunk in iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await iterator.aclose()  # type: ignore[attr-defined]

    async def wait_for_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    sender = asyncio.ensure_future(pump())
    listener = asyncio.ensure_future(wait_for_disconnect())
    done, _pending = await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
    if sender in done:
        listener.cancel()
        sender.result()
    else:
        # Cancelling the pump runs the stream's `finally`, which meters what was sent.
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


async def gateway_application(scope, receive, send) -> None:
    """Serve `/v1/...`: route by exact path, call the view and send its response."""
    view = ROUTES.get(scope["path"].rstrip("/"))
    if view is None:
        response: HttpResponse = HttpResponse(
            json.dumps(
                {
                    "error": {
                        "message": "Not found.",
                        "type": "invalid_request_error",
                        "code": "not_found",
                        "param": None,
                    }
                }
            ),
            status=404,
            content_type="application/json",
        )
    else:
        body = await _read_body(receive)
        if body is None:
            return
        headers = CaseInsensitiveMapping(
            {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        )
        request = GatewayRequest(method=scope["method"], headers=headers, body=body)
        try:
            response = await view(request)
        except Exception:
            # The ASGI server would close the connection; the client gets a JSON 500.
            logger.exception("Gateway view failed for %s", scope["path"])
            response = HttpResponse(
                json.dumps(
                    {
                        "error": {
                            "message": "Internal gateway error.",
                            "type": "api_error",
                            "code": "internal_error",
                            "param": None,
                        }
                    }
                ),
                status=500,
                content_type="application/json",
            )

    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": _header_pairs(response),
        }
    )
    if isinstance(response, StreamingHttpResponse):
        await _send_streaming(response, receive, send)
    else:
        await send({"type": "http.response.body", "body": response.content, "more_body": False})
