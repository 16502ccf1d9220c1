"""The measuring phases: concurrency 1, a fixed request rate, and the rate search."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bench.client import loadgen, rate_spec, sequential_spec
from bench.services import progress, wait_idle
from bench.stats import summary
from bench.targets import Run, backend_cpu, backend_cpu_delta, measured


@dataclass(frozen=True)
class Plan:
    """How much load each phase sends."""

    requests: int  # concurrency 1, non-streamed, per target
    warmup: int
    stream_requests: int
    stream_warmup: int
    round: int  # requests to one target before the next target's turn
    fixed_rate: float  # requests per second
    fixed_seconds: float
    fixed_warmup: float
    step_seconds: float
    step_warmup: float
    step_factor: float
    refine: int  # bisections between the last passing and the first failing rate
    min_rate: float
    max_rate: float
    p99_bound_ms: float
    rate_timeout: float  # seconds to wait for stragglers after a rate phase
    # The fixed-rate phase stops early once its p99 is sure to exceed this, because the
    # target cannot sustain the rate and more load would only grow its backlog.
    fixed_give_up_ms: float


FULL = Plan(
    requests=2000,
    warmup=200,
    stream_requests=1000,
    stream_warmup=100,
    round=100,
    fixed_rate=200.0,
    fixed_seconds=20.0,
    fixed_warmup=1.0,
    step_seconds=4.0,
    step_warmup=0.5,
    step_factor=1.4,
    refine=2,
    min_rate=10.0,
    max_rate=4000.0,
    p99_bound_ms=50.0,
    rate_timeout=10.0,
    fixed_give_up_ms=2000.0,
)


QUICK = Plan(
    requests=200,
    warmup=30,
    stream_requests=100,
    stream_warmup=20,
    round=50,
    fixed_rate=200.0,
    fixed_seconds=3.0,
    fixed_warmup=0.5,
    step_seconds=2.0,
    step_warmup=0.25,
    step_factor=1.6,
    refine=1,
    min_rate=10.0,
    max_rate=4000.0,
    p99_bound_ms=50.0,
    rate_timeout=5.0,
    fixed_give_up_ms=2000.0,
)


def phase_concurrency1(run: Run, plan: Plan, *, stream: bool) -> dict[str, Any]:
    names = measured(run)
    spec = sequential_spec(
        [run.clients[name] for name in names],
        stream=stream,
        requests=plan.stream_requests if stream else plan.requests,
        warmup=plan.stream_warmup if stream else plan.warmup,
        round_size=plan.round,
    )
    total = len(names) * (spec["requests"] + spec["warmup"])
    raw = loadgen(spec, timeout=120 + total * 0.1)["targets"]
    out = {}
    for name in names:
        result = raw[name]
        out[name] = {
            "latency": summary(result["latency_ms"]),
            "errors": result["errors"],
            "error_samples": result["error_samples"],
            "ok_total": result["ok_total"],
        }
        if stream:
            out[name]["ttft"] = summary(result["ttft_ms"])
    return out


def rate_run(
    run: Run,
    name: str,
    *,
    rate: float,
    seconds: float,
    warmup: float,
    timeout: float,
    late_ms: float,
) -> dict[str, Any]:
    """Send `rate` requests per second to one target and measure its CPU per request."""
    waited = wait_idle(list(run.services.values()))
    if waited > 1.0:
        progress(f"Waited {waited:.1f} s for the servers to finish earlier requests")

    service = run.services[name]
    spec = rate_spec(
        run.clients[name],
        rate=rate,
        seconds=seconds,
        warmup=warmup,
        timeout=timeout,
        late_ms=late_ms,
    )
    cpu_before = service.cpu_seconds()
    pg_before = backend_cpu(run.args.database_url) if name == "tollbooth" else {}
    raw = loadgen(spec, timeout=seconds + warmup + timeout + 60)
    cpu = service.cpu_seconds() - cpu_before

    # CPU time is divided among the successful responses, warm-up included.
    answered = max(raw["ok_total"], 1)
    result = {
        "rate": rate,
        "seconds": seconds,
        "latency": summary(raw["latency_ms"]),
        "latency_sched": summary(raw["latency_sched_ms"]),
        "planned": raw["planned"],
        "offered": raw["offered"],
        "completed": raw["completed"],
        "ok_total": raw["ok_total"],
        "errors": raw["errors"],
        "error_samples": raw["error_samples"],
        "stopped_early": raw["stopped_early"],
        "abandoned": raw["abandoned"],
        "client_lag_ms_p99": raw["lag_ms_p99"],
        "connections": raw["connections"],
        "cpu_ms_per_request": round(cpu * 1000 / answered, 4),
    }
    if name == "tollbooth":
        pg_cpu = backend_cpu_delta(pg_before, backend_cpu(run.args.database_url))
        result["postgres_cpu_ms_per_request"] = round(pg_cpu * 1000 / answered, 4)
    return result


def phase_fixed_rate(run: Run, plan: Plan) -> dict[str, Any]:
    out = {}
    for name in measured(run):
        result = out[name] = rate_run(
            run,
            name,
            rate=plan.fixed_rate,
            seconds=plan.fixed_seconds,
            warmup=plan.fixed_warmup,
            timeout=plan.rate_timeout,
            late_ms=plan.fixed_give_up_ms,
        )
        latency = result["latency"]
        overloaded = ", stopped early: overloaded" if result["stopped_early"] else ""
        progress(
            f"{name}: p50 {latency['p50']} ms, p99 {latency['p99']} ms, "
            f"{result['errors']} failed{overloaded}"
        )
    return out


def capacity_search(run: Run, plan: Plan, name: str, *, start: float) -> dict[str, Any]:
    """Find the highest request rate whose p99 (from the scheduled start) stays in bound.

    The rate goes up by `step_factor` from `start` while steps pass (or down while they
    fail), then the gap between the last pass and the first failure is bisected
    geometrically `refine` times. A step passes when every response is the expected one
    and the p99 latency, counted from when the request was due, is at most
    `p99_bound_ms`. Counting from the due time makes queueing in the client count too.
    A step stops early, and fails, as soon as more than 1% of its requests are later
    than the bound.
    """
    steps: list[dict[str, Any]] = []
    ok_total = 0

    def trial(rate: float) -> bool:
        nonlocal ok_total
        result = rate_run(
            run,
            name,
            rate=rate,
            seconds=plan.step_seconds,
            warmup=plan.step_warmup,
            timeout=plan.rate_timeout,
            late_ms=plan.p99_bound_ms,
        )
        ok_total += result["ok_total"]
        p99 = result["latency_sched"]["p99"]
        passed = (
            not result["stopped_early"]
            and result["errors"] == 0
            and p99 is not None
            and p99 <= plan.p99_bound_ms
        )
        verdict = "pass" if passed else "fail"
        if result["stopped_early"]:
            verdict += " (stopped early)"
        shown = "n/a" if p99 is None else f"{p99:.1f} ms"
        progress(f"{name}: {rate:g} req/s, p99 {shown}, {verdict}")
        steps.append(
            {
                "rate": rate,
                "p50_ms": result["latency_sched"]["p50"],
                "p99_ms": p99,
                "stopped_early": result["stopped_early"],
                "errors": result["errors"],
                "cpu_ms_per_request": result["cpu_ms_per_request"],
                "passed": passed,
            }
        )
        return passed

    passed_rate: float | None = None
    failed_rate: float | None = None
    rate = float(round(min(max(start, plan.min_rate), plan.max_rate)))
    if trial(rate):
        passed_rate = rate
        while rate < plan.max_rate:
            rate = float(round(min(rate * plan.step_factor, plan.max_rate)))
            if trial(rate):
                passed_rate = rate
            else:
                failed_rate = rate
                break
    else:
        failed_rate = rate
        while rate > plan.min_rate:
            rate = float(round(max(rate / plan.step_factor, plan.min_rate)))
            if trial(rate):
                passed_rate = rate
                break
            failed_rate = rate
    if passed_rate is not None and failed_rate is not None:
        for _ in range(plan.refine):
            middle = float(round(math.sqrt(passed_rate * failed_rate)))
            if middle in (passed_rate, failed_rate):
                break
            if trial(middle):
                passed_rate = middle
            else:
                failed_rate = middle
    return {
        "rate": passed_rate or 0.0,
        # True when even the highest rate tried passed: the real capacity is higher.
        "capped": failed_rate is None,
        "bound_ms": plan.p99_bound_ms,
        "steps": steps,
        "ok_total": ok_total,
    }


def phase_capacity(run: Run, plan: Plan, concurrency1: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name in measured(run):
        # A server that responds in L ms at concurrency 1 serves at least about 1000/L
        # requests per second once requests overlap (an estimate: the client and the
        # upstream share that time). Half of it is a start below the capacity.
        mean_ms = concurrency1[name]["latency"]["mean"] or 10.0
        out[name] = capacity_search(run, plan, name, start=500.0 / mean_ms)
    return out
