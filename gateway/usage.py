"""Read token usage from OpenAI and Anthropic responses, whole or streamed."""

import json
from dataclasses import dataclass, field

from gateway.pricing import TokenUsage

# NOTE: an estimate for responses without a usage block. About four characters a token
# fits English text; for code or other languages it can be off by a factor of two.
CHARACTERS_PER_TOKEN = 4


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def openai_usage(usage: dict) -> TokenUsage:
    """Convert an OpenAI `usage` object; `prompt_tokens` includes the cached tokens."""
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    cached = _int((usage.get("prompt_tokens_details") or {}).get("cached_tokens"))
    reasoning = _int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens"))
    cached = min(cached, prompt)
    return TokenUsage(
        input_tokens=prompt - cached,
        cache_read_tokens=cached,
        output_tokens=completion,
        reasoning_tokens=min(reasoning, completion),
    )


def anthropic_usage(usage: dict) -> TokenUsage:
    """Convert an Anthropic `usage` object; cache tokens are separate from `input_tokens`."""
    return TokenUsage(
        input_tokens=_int(usage.get("input_tokens")),
        cache_read_tokens=_int(usage.get("cache_read_input_tokens")),
        cache_write_tokens=_int(usage.get("cache_creation_input_tokens")),
        output_tokens=_int(usage.get("output_tokens")),
    )


def estimate_tokens(text: str) -> int:
    if not text:
        return 0
    return max(1, -(-len(text) // CHARACTERS_PER_TOKEN))


def request_text(body: dict) -> str:
    """Collect the text of a chat request, to estimate input tokens."""
    parts: list[str] = []
    system = body.get("system")
    if isinstance(system, str):
        parts.append(system)
    elif isinstance(system, list):
        parts.extend(block.get("text", "") for block in system if isinstance(block, dict))
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(block.get("text", "") for block in content if isinstance(block, dict))
    return "\n".join(part for part in parts if isinstance(part, str))


@dataclass
class StreamMeter:
    """Follow a stream event by event and keep the usage it reports.

    OpenAI sends usage in a last chunk with empty `choices`. Anthropic sends input and
    cache tokens in `message_start` and cumulative output tokens in each `message_delta`,
    so the last value wins and nothing is summed.
    """

    surface: str
    usage: TokenUsage | None = None
    finished: bool = False
    delivered_text: list[str] = field(default_factory=list)
    _anthropic_start: dict = field(default_factory=dict)
    _anthropic_output: int | None = None

    def observe_openai(self, payload: dict) -> None:
        if payload.get("usage"):
            self.usage = openai_usage(payload["usage"])
        for choice in payload.get("choices") or []:
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if isinstance(content, str):
                self.delivered_text.append(content)

    def observe_anthropic(self, event_type: str, payload: dict) -> None:
        if event_type == "message_start":
            self._anthropic_start = (payload.get("message") or {}).get("usage") or {}
            self._anthropic_output = _int(self._anthropic_start.get("output_tokens"))
        elif event_type == "message_delta":
            usage = payload.get("usage") or {}
            if "output_tokens" in usage:
                self._anthropic_output = _int(usage.get("output_tokens"))
            # Newer API versions repeat cumulative input and cache counts here too.
            for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
                if usage.get(name) is not None:
                    self._anthropic_start[name] = usage[name]
        elif event_type == "content_block_delta":
            delta = payload.get("delta") or {}
            text = delta.get("text") or delta.get("partial_json") or delta.get("thinking")
            if isinstance(text, str):
                self.delivered_text.append(text)
        elif event_type == "message_stop":
            self.finished = True
        if self._anthropic_start or self._anthropic_output is not None:
            combined = dict(self._anthropic_start)
            combined["output_tokens"] = self._anthropic_output or 0
            self.usage = anthropic_usage(combined)

    def final_usage(self, *, request_body: dict) -> TokenUsage:
        """Return the usage upstream reported, or an estimate marked as such."""
        delivered = estimate_tokens("".join(self.delivered_text))
        if self.usage is not None and (self.finished or self.usage.output_tokens >= delivered):
            return self.usage
        if self.usage is not None:
            # Anthropic reported input at the start but the stream stopped early.
            return TokenUsage(
                input_tokens=self.usage.input_tokens,
                cache_read_tokens=self.usage.cache_read_tokens,
                cache_write_tokens=self.usage.cache_write_tokens,
                output_tokens=delivered,
                estimated=True,
            )
        return TokenUsage(
            input_tokens=estimate_tokens(request_text(request_body)),
            output_tokens=delivered,
            estimated=True,
        )


def parse_sse_event(raw_event: bytes) -> tuple[str, bytes]:
    """Split one SSE event into its `event:` name and its joined `data:` lines."""
    event_type = ""
    data_lines: list[bytes] = []
    for line in raw_event.splitlines():
        if line.startswith(b"event:"):
            event_type = line[6:].strip().decode("utf-8", "replace")
        elif line.startswith(b"data:"):
            data_lines.append(line[5:].lstrip(b" "))
    return event_type, b"\n".join(data_lines)


def load_json(data: bytes) -> dict | None:
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None
