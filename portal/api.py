"""REST API error format: `{"error": {"code", "message", "fields"}}` for every error."""

from django.core.exceptions import PermissionDenied
from django.http import Http404
from rest_framework import exceptions
from rest_framework.views import exception_handler as drf_exception_handler


def _first_message(detail) -> str:
    if isinstance(detail, list) and detail:
        return _first_message(detail[0])
    if isinstance(detail, dict) and detail:
        key, value = next(iter(detail.items()))
        message = _first_message(value)
        if key == "non_field_errors" or message.startswith(f"{key} "):
            return message
        return f"{key}: {message}"
    return str(detail)


def exception_handler(exc, context):
    if isinstance(exc, Http404):
        exc = exceptions.NotFound("Not found.")
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    detail = response.data
    codes = exc.get_codes() if hasattr(exc, "get_codes") else None
    code = codes if isinstance(codes, str) else "invalid"
    if isinstance(detail, dict) and set(detail) == {"detail"}:
        message = str(detail["detail"])
        fields = {}
    else:
        message = _first_message(detail)
        fields = detail if isinstance(detail, dict) else {}
    response.data = {"error": {"code": code, "message": message, "fields": fields}}
    return response
