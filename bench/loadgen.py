"""Send benchmark requests to HTTP targets and print per-request timings as JSON.

Runs as its own process (`python -m bench.loadgen < spec.json`), started by
`bench.gateway` for each phase, so the client's CPU time is spent outside the process
that manages the servers. The client is a bare HTTP/1.1 keep-alive client on uvloop
with httptools' response parser. Both are uvicorn dependencies, so they are in the
project's virtualenv. On a 2-core machine this client takes less CPU from the servers
under test than httpx or aiohttp would. Every target is measured with this same client,
and the benchmark reports differences to the direct target, so the client's own cost
cancels out of the added latency.

Timestamps are `time.perf_counter()` readings taken inside the protocol callbacks, when
the bytes arrive, so event loop wake-ups after a response are not counted.

Spec, one JSON object on stdin:

    mode        "sequential" (one connection per target, one request at a time) or
                "rate" (open loop: requests start on a fixed schedule, whatever the
                responses do)
    targets     [{"name", "host", "port", "path", "headers": {name: value}}]; rate mode
                uses the first one
    body        request body (a JSON object), the same for every target
    stream      whether the body requests a stream
    expect      the exact assistant text every response must carry
    timeout     seconds to wait for one response (sequential) or for the stragglers
                after the last scheduled request (rate)
    sequential: requests, warmup (per target), round (requests to one target before
                moving to the next, so drifting background load hits all targets alike)
    rate:       rate (requests per second), duration and warmup (seconds; requests
                scheduled in the warm-up are sent but not reported), max_connections,
                late_ms and late_share (optional: stop as soon as more than late_share
                of the planned requests are later than late_ms, counted from their due
                time, since the percentile 1 - late_share is then above late_ms)

Output, one JSON object on stdout; all times in milliseconds:

    sequential: {"targets": {name: {"latency_ms": [...], "ttft_ms": [...], "completed",
                 "ok_total", "errors", "error_samples"}}}
    rate:       {"latency_ms": [...] (from the send), "latency_sched_ms": [...] (from
                 the scheduled start, so waiting for a free connection counts),
                 "planned", "offered", "completed", "ok_total", "errors",
                 "error_samples", "stopped_early", "abandoned" (requests cancelled by the
                 early stop), "lag_ms_p99", "lag_ms_max", "connections"}

"completed" counts the reported (measured) requests that succeeded; "ok_total" also
counts successful warm-up requests, so it equals the requests the target served.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import sys
from collections import deque
from time import perf_counter
from typing import Any

import httptools
import uvloop

# Only the first few failures are kept, to say what went wrong without flooding the output.
MAX_ERROR_SAMPLES = 5
# Connections opened before a rate phase starts, so connection set-up is not timed.
PREFILL_CONNECTIONS = 16
# uvicorn closes keep-alive connections after 5 idle seconds. A request sent just as the
# server closes would fail, so connections idle for longer than this are replaced first.
MAX_IDLE_SECONDS = 3.0


class ResponseError(Exception):
    """A response arrived but is not the one the benchmark expects."""


class Exchange:
    """Timings and raw parts of one request and its response."""

    __slots__ = ("sent", "first_token", "done", "status", "chunks", "keep_alive")

    def __init__(self) -> None:
        self.sent = 0.0
        self.first_token = 0.0
        self.done = 0.0
        self.status = 0
        self.chunks: list[bytes] = []
        self.keep_alive = True

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


def first_content(events: bytes) -> bool:
    """Tell whether these complete SSE events hold an OpenAI chunk with non-empty content."""
    for line in events.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            continue
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            return True
    return False


def stream_text(body: bytes) -> tuple[str, bool]:
    """Join the content deltas of an OpenAI event stream; return them and whether [DONE] came."""
    parts: list[str] = []
    done = False
    for line in body.replace(b"\r\n", b"\n").split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        for choice in chunk.get("choices") or []:
            parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts), done


def check_response(exchange: Exchange, *, stream: bool, expect: str) -> None:
    """Raise ResponseError unless the response is a 200 with exactly the expected text."""
    body = exchange.body
    if exchange.status != 200:
        raise ResponseError(f"HTTP {exchange.status}: {body[:300]!r}")
    try:
        if stream:
            text, done = stream_text(body)
            if not done:
                raise ResponseError("the stream ended without data: [DONE]")
        else:
            text = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise ResponseError(f"unreadable body ({error}): {body[:300]!r}") from None
    if text != expect:
        raise ResponseError(f"unexpected text {text[:80]!r}")


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that carries one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange = Exchange()
        self.waiter: asyncio.Future | None = None
        self.stream = False
        self.pending_events = b""
        self.closed = False
        self.last_used = perf_counter()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError("the server closed the connection before the response ended"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(ResponseError(f"malformed HTTP response: {error}"))
            self.close()

    # httptools callbacks

    def on_headers_complete(self) -> None:
        self.exchange.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        arrived = perf_counter()
        exchange = self.exchange
        exchange.chunks.append(body)
        if self.stream and not exchange.first_token:
            self.pending_events += body.replace(b"\r\n", b"\n")
            end = self.pending_events.rfind(b"\n\n")
            if end != -1:
                complete, self.pending_events = (
                    self.pending_events[: end + 2],
                    self.pending_events[end + 2 :],
                )
                if first_content(complete):
                    exchange.first_token = arrived

    def on_message_complete(self) -> None:
        exchange = self.exchange
        exchange.done = self.last_used = perf_counter()
        exchange.keep_alive = self.parser.should_keep_alive()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(exchange)

    # use

    def _fail(self, error: Exception) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def stale(self) -> bool:
        """Tell whether the connection is closed or idle long enough to be closing."""
        return self.closed or perf_counter() - self.last_used > MAX_IDLE_SECONDS

    async def request(self, payload: bytes, *, stream: bool) -> Exchange:
        """Send one request and wait for the whole response."""
        if self.closed:
            raise ConnectionError("the connection is closed")
        exchange = Exchange()
        self.exchange = exchange
        self.stream = stream
        self.pending_events = b""
        self.waiter = asyncio.get_running_loop().create_future()
        exchange.sent = perf_counter()
        self.transport.write(payload)
        return await self.waiter


async def connect(host: str, port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(Connection, host, port)
    return protocol


def build_request(target: dict[str, Any], body: dict[str, Any]) -> bytes:
    """Encode the whole HTTP/1.1 request once; every send reuses the same bytes."""
    content = json.dumps(body, separators=(",", ":")).encode()
    lines = [
        f"POST {target['path']} HTTP/1.1",
        f"Host: {target['host']}:{target['port']}",
        "User-Agent: tollbooth-bench",
        "Content-Type: application/json",
        f"Content-Length: {len(content)}",
    ]
    lines += [f"{name}: {value}" for name, value in target.get("headers", {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + content


def ms(seconds: float) -> float:
    return round(seconds * 1000, 4)


class ErrorLog:
    """Count failures and keep a few messages."""

    def __init__(self) -> None:
        self.count = 0
        self.samples: list[str] = []

    def add(self, error: BaseException) -> None:
        self.count += 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples.append(f"{type(error).__name__}: {error}"[:400])


# --- Sequential mode: one request in flight per target ---------------------------


async def run_sequential(spec: dict[str, Any]) -> dict[str, Any]:
    stream = bool(spec.get("stream"))
    expect = spec["expect"]
    timeout = float(spec.get("timeout", 10.0))
    requests = int(spec["requests"])
    per_round = max(1, int(spec.get("round", 100)))
    targets = spec["targets"]
    payloads = {t["name"]: build_request(t, spec["body"]) for t in targets}
    connections: dict[str, Connection | None] = {t["name"]: None for t in targets}
    results = {
        t["name"]: {
            "latency_ms": [],
            "ttft_ms": [],
            "errors": ErrorLog(),
            "completed": 0,
            "ok_total": 0,
        }
        for t in targets
    }

    async def one(target: dict[str, Any], *, record: bool) -> None:
        name = target["name"]
        result = results[name]
        connection = connections[name]
        if record and (connection is None or connection.stale):
            # The first request on a new connection also pays for the server's connection
            # set-up, which the other requests do not, so it goes unrecorded.
            await one(target, record=False)
        try:
            connection = connections[name]
            if connection is None or connection.stale:
                if connection is not None:
                    connection.close()
                connection = connections[name] = await connect(target["host"], target["port"])
            exchange = await asyncio.wait_for(
                connection.request(payloads[name], stream=stream), timeout
            )
            if not exchange.keep_alive:
                connection.close()
            check_response(exchange, stream=stream, expect=expect)
        except (OSError, ResponseError, TimeoutError) as error:
            result["errors"].add(error)
            if connections[name] is not None:
                connections[name].close()
                connections[name] = None
            return
        if stream and not exchange.first_token:
            result["errors"].add(ResponseError("no content chunk was seen"))
            return
        result["ok_total"] += 1
        if record:
            result["completed"] += 1
            result["latency_ms"].append(ms(exchange.done - exchange.sent))
            if stream:
                result["ttft_ms"].append(ms(exchange.first_token - exchange.sent))

    for target in targets:
        for _ in range(int(spec.get("warmup", 0))):
            await one(target, record=False)
    # Warm-up failures are counted too, since they mean the target is broken.
    remaining = {t["name"]: requests for t in targets}
    while any(remaining.values()):
        for target in targets:
            count = min(per_round, remaining[target["name"]])
            remaining[target["name"]] -= count
            for _ in range(count):
                await one(target, record=True)
        gc.collect()
    for connection in connections.values():
        if connection is not None:
            connection.close()

    return {
        "targets": {
            name: {
                "latency_ms": result["latency_ms"],
                "ttft_ms": result["ttft_ms"],
                "completed": result["completed"],
                "ok_total": result["ok_total"],
                "errors": result["errors"].count,
                "error_samples": result["errors"].samples,
            }
            for name, result in results.items()
        }
    }


# --- Rate mode: open loop at a fixed request rate -----------------------------------


class Pool:
    """Keep-alive connections to one target, at most `limit` at once."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host = host
        self.port = port
        self.limit = limit
        self.idle: list[Connection] = []
        self.count = 0
        self.peak = 0
        self.waiters: deque[asyncio.Future] = deque()

    async def open(self, count: int) -> None:
        for _ in range(min(count, self.limit)):
            self.count += 1
            try:
                self.idle.append(await connect(self.host, self.port))
            except OSError:
                self.count -= 1
                raise
        self.peak = max(self.peak, self.count)

    async def acquire(self) -> Connection:
        while True:
            while self.idle:
                connection = self.idle.pop()
                if not connection.stale:
                    return connection
                connection.close()
                self.count -= 1
            if self.count < self.limit:
                self.count += 1
                self.peak = max(self.peak, self.count)
                try:
                    return await connect(self.host, self.port)
                except BaseException:
                    self.count -= 1
                    self._wake()
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter

    def release(self, connection: Connection, *, reusable: bool) -> None:
        if reusable and not connection.closed:
            self.idle.append(connection)
        else:
            connection.close()
            self.count -= 1
        self._wake()

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


async def run_rate(spec: dict[str, Any]) -> dict[str, Any]:
    target = spec["targets"][0]
    stream = bool(spec.get("stream"))
    expect = spec["expect"]
    rate = float(spec["rate"])
    warmup = float(spec.get("warmup", 0.0))
    total = int(round(rate * (warmup + float(spec["duration"]))))
    planned = int(round(rate * float(spec["duration"])))
    payload = build_request(target, spec["body"])
    pool = Pool(target["host"], target["port"], int(spec.get("max_connections", 256)))
    await pool.open(PREFILL_CONNECTIONS)
    # Once more than `late_share` of the planned requests took (or have been waiting)
    # longer than `late_ms` from their due time, that percentile is already lost: the run
    # stops instead of piling more load on a server that cannot keep up.
    late_seconds = float(spec["late_ms"]) / 1000 if spec.get("late_ms") else None
    late_limit = math.ceil(float(spec.get("late_share", 0.01)) * planned) + 1

    interval = 1.0 / rate
    start = perf_counter() + 0.05
    measured_from = start + warmup
    latency: list[float] = []
    latency_sched: list[float] = []
    lags: list[float] = []
    errors = ErrorLog()
    counts = {"offered": 0, "completed": 0, "ok_total": 0, "late": 0}

    async def one(due: float) -> None:
        measured = due >= measured_from
        if measured:
            counts["offered"] += 1
        connection = None
        try:
            connection = await pool.acquire()
            exchange = await connection.request(payload, stream=stream)
            pool.release(connection, reusable=exchange.keep_alive)
            connection = None
            check_response(exchange, stream=stream, expect=expect)
        except (OSError, ResponseError) as error:
            if measured:
                errors.add(error)
            if connection is not None:
                pool.release(connection, reusable=False)
            return
        except asyncio.CancelledError:
            if connection is not None:
                pool.release(connection, reusable=False)
            raise
        counts["ok_total"] += 1
        if measured:
            counts["completed"] += 1
            latency.append(ms(exchange.done - exchange.sent))
            latency_sched.append(ms(exchange.done - due))
            lags.append(exchange.sent - due)
            if late_seconds is not None and exchange.done - due > late_seconds:
                counts["late"] += 1

    def too_late(now: float) -> bool:
        """Tell whether the late requests, done or still waiting, exceed the limit."""
        while outstanding and outstanding[0][1].done():
            outstanding.popleft()
        waiting = 0
        for due, task in outstanding:
            if due >= now - late_seconds:
                break
            if due >= measured_from and not task.done():
                waiting += 1
        return counts["late"] + waiting > late_limit

    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task] = []
    outstanding: deque[tuple[float, asyncio.Task]] = deque()
    stopped_early = False
    last_check = start
    for index in range(total):
        due = start + index * interval
        now = perf_counter()
        if late_seconds is not None and now - last_check > 0.02:
            last_check = now
            if too_late(now):
                stopped_early = True
                break
        if due > now:
            await asyncio.sleep(due - now)
        task = loop.create_task(one(due))
        tasks.append(task)
        outstanding.append((due, task))
    pending: set[asyncio.Task] = set()
    if tasks and not stopped_early:
        _, pending = await asyncio.wait(tasks, timeout=float(spec.get("timeout", 10.0)))
    elif stopped_early:
        pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    if pending and not stopped_early:
        errors.count += len(pending)
        errors.samples.append(f"{len(pending)} requests had no response after the run")
    pool.close()

    lags.sort()
    return {
        "latency_ms": latency,
        "latency_sched_ms": latency_sched,
        "planned": planned,
        "offered": counts["offered"],
        "completed": counts["completed"],
        "ok_total": counts["ok_total"],
        "errors": errors.count,
        "error_samples": errors.samples[:MAX_ERROR_SAMPLES],
        "stopped_early": stopped_early,
        "abandoned": len(pending) if stopped_early else 0,
        "lag_ms_p99": ms(lags[int(0.99 * (len(lags) - 1))]) if lags else None,
        "lag_ms_max": ms(lags[-1]) if lags else None,
        "connections": pool.peak,
    }


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["mode"] == "sequential":
        return await run_sequential(spec)
    if spec["mode"] == "rate":
        return await run_rate(spec)
    raise ValueError(f"Unknown mode {spec['mode']!r}; expected 'sequential' or 'rate'.")


def main() -> int:
    spec = json.load(sys.stdin)
    # Collections of cyclic garbage would pause the client at random. Refcounting frees
    # everything a request allocates, and sequential mode collects between rounds.
    gc.collect()
    gc.freeze()
    gc.disable()
    result = uvloop.run(run(spec))
    json.dump(result, sys.stdout, separators=(",", ":"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
