"""Check the upstream stand-in against the official OpenAI and Anthropic SDKs."""

import json

import anthropic
import httpx
import openai
import pytest

from devtools.upstream import run_in_thread

OPENAI_AUTH = {"authorization": "Bearer test-key"}
ANTHROPIC_AUTH = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
USER_MESSAGE = [{"role": "user", "content": "one two three four"}]


@pytest.fixture(scope="module")
def base_url():
    url, stop = run_in_thread()
    yield url
    stop()


@pytest.fixture
def openai_client(base_url):
    # Retries would repeat injected failures and add backoff time to the run.
    return openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)


@pytest.fixture
def anthropic_client(base_url):
    return anthropic.Anthropic(base_url=base_url, api_key="x", max_retries=0)


def post_raw(base_url, path, headers, body):
    return httpx.post(base_url + path, headers=headers, json=body, timeout=5)


def parse_sse(text):
    """Split an SSE body into (event name or None, data string) pairs."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name = None
        data = None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
        events.append((name, data))
    return events


# --- OpenAI ----------------------------------------------------------------------


def test_openai_plain_completion(openai_client):
    completion = openai_client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "one two  three"}]},
        ],
    )

    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 5
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == 13
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    assert completion.usage.completion_tokens_details.reasoning_tokens == 0


def test_openai_max_tokens_sets_length(openai_client):
    completion = openai_client.chat.completions.create(
        model="gpt-4o", messages=USER_MESSAGE, max_completion_tokens=3
    )

    assert completion.choices[0].message.content == "tok0 tok1 tok2"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 3


def test_openai_default_output_capped_at_64(openai_client):
    completion = openai_client.chat.completions.create(
        model="gpt-4o", messages=USER_MESSAGE, max_tokens=500
    )

    assert completion.usage.completion_tokens == 64
    assert completion.choices[0].finish_reason == "stop"


def test_openai_usage_override_headers(openai_client):
    completion = openai_client.chat.completions.create(
        model="gpt-4o",
        messages=USER_MESSAGE,
        extra_headers={
            "x-upstream-output-tokens": "200",
            "x-upstream-cached-tokens": "10",
            "x-upstream-reasoning-tokens": "7",
        },
    )

    assert completion.usage.prompt_tokens == 4 + 10
    assert completion.usage.prompt_tokens_details.cached_tokens == 10
    assert completion.usage.completion_tokens == 200 + 7
    assert completion.usage.completion_tokens_details.reasoning_tokens == 7
    assert completion.usage.total_tokens == 14 + 207
    assert len(completion.choices[0].message.content.split()) == 200


def test_openai_stream_with_usage(openai_client):
    stream = openai_client.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER_MESSAGE,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 4
    assert chunks[-1].usage.completion_tokens == 5
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_openai_stream_usage_key_wire_format(base_url):
    body = {"model": "gpt-4o", "messages": USER_MESSAGE, "max_tokens": 2, "stream": True}

    with_usage = post_raw(
        base_url,
        "/v1/chat/completions",
        OPENAI_AUTH,
        {**body, "stream_options": {"include_usage": True}},
    )
    without_usage = post_raw(base_url, "/v1/chat/completions", OPENAI_AUTH, body)

    assert with_usage.headers["content-type"] == "text/event-stream"
    events = parse_sse(with_usage.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert len(chunks) == 2 + 1 + 1
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["usage"]["total_tokens"] == 6

    events = parse_sse(without_usage.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert len(chunks) == 2 + 1
    assert all("usage" not in chunk for chunk in chunks)
    first_data = events[0][1]
    assert first_data == json.dumps(json.loads(first_data), separators=(",", ":"))


def test_openai_missing_bearer_is_401(base_url):
    response = post_raw(
        base_url, "/v1/chat/completions", {}, {"model": "gpt-4o", "messages": USER_MESSAGE}
    )

    assert response.status_code == 401
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_openai_injected_500(openai_client):
    with pytest.raises(openai.InternalServerError) as caught:
        openai_client.chat.completions.create(
            model="gpt-4o", messages=USER_MESSAGE, extra_headers={"x-upstream-status": "500"}
        )

    assert caught.value.status_code == 500
    assert caught.value.body["type"] == "server_error"


def test_openai_fail_model_is_500(openai_client):
    with pytest.raises(openai.InternalServerError):
        openai_client.chat.completions.create(model="fail-500", messages=USER_MESSAGE)


def test_openai_injected_429(openai_client):
    with pytest.raises(openai.RateLimitError):
        openai_client.chat.completions.create(
            model="gpt-4o", messages=USER_MESSAGE, extra_headers={"x-upstream-status": "429"}
        )


def test_stream_cut_after_breaks_transfer(base_url):
    headers = {**OPENAI_AUTH, "x-upstream-cut-after": "2"}
    body = {"model": "gpt-4o", "messages": USER_MESSAGE, "stream": True}
    received = b""

    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream(
            "POST", base_url + "/v1/chat/completions", headers=headers, json=body, timeout=5
        ) as response:
            for data in response.iter_raw():
                received += data

    assert received.count(b"data: ") == 2
    assert b"[DONE]" not in received
    assert b'finish_reason":"stop' not in received


def test_last_request_redacts_keys(base_url, openai_client):
    openai_client.chat.completions.create(
        model="gpt-4o",
        messages=USER_MESSAGE,
        stream=True,
        stream_options={"include_usage": True},
    ).close()

    record = httpx.get(base_url + "/_last_request", timeout=5).json()

    assert record["path"] == "/v1/chat/completions"
    assert record["json"]["stream_options"] == {"include_usage": True}
    assert record["headers"]["authorization"] == "[redacted]"
    assert "Bearer x" not in json.dumps(record)


def test_models_list(openai_client):
    model_ids = [model.id for model in openai_client.models.list()]

    assert model_ids == ["gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5", "claude-haiku-4-5"]


# --- Anthropic -------------------------------------------------------------------


def test_anthropic_plain_message(anthropic_client):
    message = anthropic_client.messages.create(
        model="claude-haiku-4-5",
        max_tokens=100,
        system=[{"type": "text", "text": "you are terse"}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
        extra_headers={"x-upstream-cached-tokens": "30", "x-upstream-cache-write-tokens": "12"},
    )

    assert message.id.startswith("msg_")
    assert message.model == "claude-haiku-4-5"
    assert message.content[0].text == " ".join(f"tok{index}" for index in range(64))
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    assert message.usage.input_tokens == 5
    assert message.usage.output_tokens == 64
    assert message.usage.cache_read_input_tokens == 30
    assert message.usage.cache_creation_input_tokens == 12


def test_anthropic_max_tokens_stop_reason(anthropic_client):
    message = anthropic_client.messages.create(
        model="claude-sonnet-4-5", max_tokens=4, messages=USER_MESSAGE
    )

    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 4


def test_anthropic_stream_final_usage(anthropic_client):
    with anthropic_client.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=1000,
        system="answer briefly",
        messages=USER_MESSAGE,
        extra_headers={"x-upstream-output-tokens": "20", "x-upstream-cached-tokens": "3"},
    ) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()

    assert text == " ".join(f"tok{index}" for index in range(20))
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 6
    assert message.usage.cache_read_input_tokens == 3
    assert message.usage.output_tokens == 20


def test_anthropic_stream_event_sequence(base_url):
    body = {"model": "claude-haiku-4-5", "max_tokens": 3, "messages": USER_MESSAGE, "stream": True}

    response = post_raw(base_url, "/v1/messages", ANTHROPIC_AUTH, body)
    events = parse_sse(response.text)

    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = json.loads(events[0][1])
    assert start["message"]["usage"]["output_tokens"] == 1
    assert start["message"]["usage"]["input_tokens"] == 4
    delta = json.loads(events[-2][1])
    assert delta["delta"]["stop_reason"] == "max_tokens"
    assert delta["usage"]["output_tokens"] == 3


def test_anthropic_split_deltas_keep_last(base_url, anthropic_client):
    headers = {"x-upstream-split-deltas": "1", "x-upstream-output-tokens": "10"}

    with anthropic_client.messages.stream(
        model="claude-haiku-4-5", max_tokens=50, messages=USER_MESSAGE, extra_headers=headers
    ) as stream:
        message = stream.get_final_message()
    raw = post_raw(
        base_url,
        "/v1/messages",
        {**ANTHROPIC_AUTH, **headers},
        {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": USER_MESSAGE, "stream": True},
    )
    deltas = [json.loads(data) for name, data in parse_sse(raw.text) if name == "message_delta"]

    assert [delta["usage"]["output_tokens"] for delta in deltas] == [5, 10]
    assert message.usage.output_tokens == 10


def test_anthropic_injected_500(anthropic_client):
    with pytest.raises(anthropic.InternalServerError) as caught:
        anthropic_client.messages.create(
            model="claude-haiku-4-5",
            max_tokens=10,
            messages=USER_MESSAGE,
            extra_headers={"x-upstream-status": "500"},
        )

    assert caught.value.status_code == 500
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "Simulated error: x-upstream-status 500."},
    }


def test_anthropic_auth_errors(base_url):
    body = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": USER_MESSAGE}

    no_key = post_raw(base_url, "/v1/messages", {"anthropic-version": "2023-06-01"}, body)
    no_version = post_raw(base_url, "/v1/messages", {"x-api-key": "k"}, body)

    assert no_key.status_code == 401
    assert no_key.json()["error"]["type"] == "authentication_error"
    assert no_version.status_code == 400
    assert no_version.json()["type"] == "error"
