"""Run `bench.loadgen` phases and build the requests every target gets."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from bench.services import PYTHON, ROOT, BenchError, base_env, die_with_parent

MODEL = "gpt-4o-mini"
PROMPT = "Write a short greeting for a benchmark run."
OUTPUT_TOKENS = 8
STREAM_TOKENS = 32


def loadgen(spec: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """Run one phase in a fresh `bench.loadgen` process and return its JSON result."""
    process = subprocess.Popen(
        [PYTHON, "-m", "bench.loadgen"],
        cwd=ROOT,
        env=base_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    try:
        out, err = process.communicate(json.dumps(spec).encode(), timeout=timeout)
    except BaseException:
        process.kill()
        process.wait()
        raise
    if process.returncode != 0:
        raise BenchError(
            f"The load generator exited with code {process.returncode}:\n"
            + err.decode(errors="replace")[-2000:]
        )
    return json.loads(out)


def non_stream_body() -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": OUTPUT_TOKENS,
    }


def stream_body() -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": STREAM_TOKENS,
        "stream": True,
        # Metering clients request the usage chunk, so both gateways read the upstream's
        # token counts instead of counting tokens themselves.
        "stream_options": {"include_usage": True},
    }


def expected_text(tokens: int) -> str:
    """Return the reply text of the local upstream for `tokens` output tokens."""
    return " ".join(f"tok{index}" for index in range(tokens))


def sequential_spec(
    targets: list[dict[str, Any]], *, stream: bool, requests: int, warmup: int, round_size: int
) -> dict[str, Any]:
    return {
        "mode": "sequential",
        "targets": targets,
        "body": stream_body() if stream else non_stream_body(),
        "stream": stream,
        "expect": expected_text(STREAM_TOKENS if stream else OUTPUT_TOKENS),
        "requests": requests,
        "warmup": warmup,
        "round": round_size,
        "timeout": 10.0,
    }


def rate_spec(
    target: dict[str, Any],
    *,
    rate: float,
    seconds: float,
    warmup: float,
    timeout: float,
    late_ms: float,
) -> dict[str, Any]:
    return {
        "mode": "rate",
        "targets": [target],
        "body": non_stream_body(),
        "stream": False,
        "expect": expected_text(OUTPUT_TOKENS),
        "rate": rate,
        "duration": seconds,
        "warmup": warmup,
        "timeout": timeout,
        "max_connections": 256,
        "late_ms": late_ms,
        "late_share": 0.01,
    }
