"""Gateway errors in the shape of the surface the client called.

OpenAI: `{"error": {"message", "type", "code", "param"}}`.
Anthropic: `{"type": "error", "error": {"type", "message"}}`.
"""

import json
from dataclasses import dataclass, field

from django.http import HttpResponse

OPENAI = "openai"
ANTHROPIC = "anthropic"

# Anthropic's error type for each status the gateway returns.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


@dataclass
class GatewayError(Exception):
    """A request the gateway rejects itself; the message is shown to the client."""

    status: int
    message: str
    openai_type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    # Response headers such as `retry-after` (seconds), set by error_response.
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def error_body(error: GatewayError, *, surface: str) -> dict:
    if surface == ANTHROPIC:
        return {
            "type": "error",
            "error": {
                "type": ANTHROPIC_TYPES.get(error.status, "api_error"),
                "message": error.message,
            },
        }
    return {
        "error": {
            "message": error.message,
            "type": error.openai_type,
            "code": error.code,
            "param": error.param,
        }
    }


def error_response(error: GatewayError, *, surface: str, request_id: str) -> HttpResponse:
    response = HttpResponse(
        json.dumps(error_body(error, surface=surface)),
        status=error.status,
        content_type="application/json",
    )
    for name, value in error.headers.items():
        response[name] = value
    set_request_id(response, request_id=request_id, surface=surface)
    return response


def set_request_id(response: HttpResponse, *, request_id: str, surface: str) -> None:
    response["x-request-id"] = request_id
    if surface == ANTHROPIC:
        # The Anthropic SDK reads `request-id`; the OpenAI SDK reads `x-request-id`.
        response["request-id"] = request_id


def invalid_json() -> GatewayError:
    return GatewayError(400, "The request body is not valid JSON.", code="invalid_json")


def missing_key() -> GatewayError:
    return GatewayError(
        401,
        "Missing access key: send it as `Authorization: Bearer tb_...` or `x-api-key`.",
        openai_type="invalid_request_error",
        code="invalid_api_key",
    )


def invalid_key() -> GatewayError:
    return GatewayError(
        401,
        "Invalid access key: it is unknown, revoked or expired.",
        openai_type="invalid_request_error",
        code="invalid_api_key",
    )
