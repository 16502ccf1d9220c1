"""Measure what the Tollbooth gateway adds to a request, next to the LiteLLM proxy.

Run from the repository root (`make bench` runs the first line):

    .venv/bin/python -m bench.gateway             # full run, about 4 minutes when idle
    .venv/bin/python -m bench.gateway --quick     # smoke run, about a minute

One run starts a local upstream (`devtools.upstream`, OpenAI wire format) and sends the
same load, with the same client (`bench.loadgen`, a separate process), to three
targets that all reach that upstream:

    direct      the upstream itself
    tollbooth   `uvicorn portal.asgi:application` with metering on: PostgreSQL database
                (dropped and created again at every run), Redis cache, an account with
                a large grant and an access key
    litellm     the LiteLLM proxy (`litellm --config ...`), no database, from its own
                virtualenv outside the repository (created on first use unless
                --no-install is given); when it cannot be installed or started, its
                columns read "not measured" and the rest of the run goes on

Phases, in order:

1. latency at concurrency 1, non-streamed; targets take turns in rounds, so background
   load hits all of them alike;
2. time to first token of streams at concurrency 1, in the same way;
3. latency at a fixed open-loop request rate;
4. the highest rate whose p99 stays under a bound, found by stepping the rate.

Peak RSS of each target's process tree is sampled throughout. "Added" figures are the
target's minus the direct target's, percentile by percentile.

The script prints a Markdown table and writes every figure to a JSON file (`--out`, by
default under /tmp). It stops every process it started and removes its temporary files
on exit, on errors and on Ctrl+C.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench import report
from bench.client import MODEL, OUTPUT_TOKENS, PROMPT, STREAM_TOKENS
from bench.phases import (
    FULL,
    QUICK,
    phase_capacity,
    phase_concurrency1,
    phase_fixed_rate,
)
from bench.services import BenchError, ServiceError, progress
from bench.stats import difference
from bench.targets import (
    DEFAULT_DATABASE_URL,
    DEFAULT_LITELLM_VENV,
    DEFAULT_REDIS_URL,
    Run,
    bring_up,
    check_locations,
    litellm_versions,
    measured,
    postgres_version,
    redis_version,
    verify_metering,
)

# Goals the results are checked against.
GOAL_ADDED_P50_MS = 2.0
GOAL_ADDED_P99_MS = 5.0
GOAL_THROUGHPUT_VS_LITELLM = 3.0


def machine_info() -> dict[str, Any]:
    """Describe the processor, memory and kernel from /proc and /etc/os-release."""
    cpu_model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
                break
    os_name = ""
    with contextlib.suppress(OSError), open("/etc/os-release") as handle:
        for line in handle:
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    return {
        "cpu_model": cpu_model,
        "nproc": len(os.sched_getaffinity(0)),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": os_name,
    }


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # SystemExit unwinds through the cleanup code like Ctrl+C does.
    raise SystemExit(128 + signum)


def added(results: dict[str, Any], section: str, metric: str) -> dict[str, Any]:
    """Return target minus direct for p50, p99 and mean of one metric of one section."""
    out: dict[str, Any] = {}
    base = results[section].get("direct")
    for name in ("tollbooth", "litellm"):
        entry = results[section].get(name)
        if entry is None or base is None:
            out[name] = None
            continue
        out[name] = {
            q: difference(entry[metric][q], base[metric][q]) for q in ("p50", "p99", "mean")
        }
    return out


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    c1 = results["added"]["concurrency1"]["tollbooth"]
    capacity = results["capacity"]
    out = [
        {
            "name": "Added latency p50 at concurrency 1",
            "goal": f"< {GOAL_ADDED_P50_MS:g} ms",
            "value": c1["p50"],
            "unit": "ms",
            "passed": c1["p50"] < GOAL_ADDED_P50_MS,
        },
        {
            "name": "Added latency p99 at concurrency 1",
            "goal": f"< {GOAL_ADDED_P99_MS:g} ms",
            "value": c1["p99"],
            "unit": "ms",
            "passed": c1["p99"] < GOAL_ADDED_P99_MS,
        },
    ]
    bound = capacity["tollbooth"]["bound_ms"]
    throughput = {
        "name": f"Throughput at p99 <= {bound:g} ms, Tollbooth / LiteLLM",
        "goal": f">= {GOAL_THROUGHPUT_VS_LITELLM:g}x",
        "unit": "x",
    }
    litellm = capacity.get("litellm")
    if litellm is None:
        throughput.update(value=None, passed=None)
    elif litellm["rate"] == 0:
        # LiteLLM met the bound at no rate tried, so any rate of Tollbooth's is more.
        throughput.update(
            value=None,
            text="LiteLLM met the bound at no rate",
            passed=capacity["tollbooth"]["rate"] > 0,
        )
    else:
        value = round(capacity["tollbooth"]["rate"] / litellm["rate"], 3)
        passed = value >= GOAL_THROUGHPUT_VS_LITELLM
        # A search that passed at its ceiling rate gives only a lower bound. Then only one
        # outcome of the comparison is certain.
        if capacity["tollbooth"]["capped"] and litellm["capped"]:
            passed = None
        elif capacity["tollbooth"]["capped"] and not passed:
            passed = None
        elif litellm["capped"] and passed:
            passed = None
        throughput.update(value=value, passed=passed)
    out.append(throughput)
    return out


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else FULL
    if args.rate is not None:
        plan = replace(plan, fixed_rate=args.rate)
    if args.p99_bound_ms is not None:
        plan = replace(plan, p99_bound_ms=args.p99_bound_ms)
    check_locations(args.database_url, args.redis_url)
    started = time.monotonic()
    results: dict[str, Any] = {
        "kind": "quick" if args.quick else "full",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_before": [round(value, 2) for value in os.getloadavg()],
        "plan": asdict(plan),
        "request": {
            "model": MODEL,
            "prompt": PROMPT,
            "output_tokens": OUTPUT_TOKENS,
            "stream_output_tokens": STREAM_TOKENS,
        },
        "workers": args.workers,
        "versions": {
            "python": platform.python_version(),
            **{
                name: package_version(name)
                for name in ("django", "uvicorn", "uvloop", "httptools", "httpx", "psycopg")
            },
            "postgresql": postgres_version(args.database_url),
            "redis": redis_version(args.redis_url),
        },
    }
    run = Run(args)
    try:
        bring_up(run)
        if "litellm" in run.services:
            results["versions"]["litellm_venv"] = litellm_versions(Path(args.litellm_venv))
        results["commands"] = run.commands
        progress("Targets up: " + ", ".join(measured(run)))

        phase_seconds = results["phase_seconds"] = {"start": round(time.monotonic() - started, 1)}

        def timed(
            name: str, message: str, function: Callable[..., Any], *arguments: Any, **options: Any
        ) -> None:
            progress(message)
            phase_started = time.monotonic()
            results[name] = function(*arguments, **options)
            phase_seconds[name] = round(time.monotonic() - phase_started, 1)

        timed(
            "concurrency1",
            "Concurrency 1, non-streamed",
            phase_concurrency1,
            run,
            plan,
            stream=False,
        )
        timed("streams", "Concurrency 1, streams", phase_concurrency1, run, plan, stream=True)
        timed("fixed_rate", f"Fixed rate {plan.fixed_rate:g} req/s", phase_fixed_rate, run, plan)
        timed(
            "capacity",
            f"Rate steps to p99 <= {plan.p99_bound_ms:g} ms",
            phase_capacity,
            run,
            plan,
            results["concurrency1"],
        )

        run.watch.sample(with_hwm=True)
        results["memory"] = {
            name: {
                "peak_rss_mib": round(run.watch.peak_rss.get(name, 0) / 2**20, 1),
                "peak_hwm_sum_mib": round(run.watch.peak_hwm.get(name, 0) / 2**20, 1),
            }
            for name in measured(run)
        }
        results["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
        tollbooth_ok = (
            results["concurrency1"]["tollbooth"]["ok_total"]
            + results["streams"]["tollbooth"]["ok_total"]
            + results["fixed_rate"]["tollbooth"]["ok_total"]
            + results["capacity"]["tollbooth"]["ok_total"]
            + run.smoke_ok["tollbooth"]
        )
        # Stop Tollbooth first so that every request it took is metered before counting.
        run.stop("tollbooth")
        results["metering"] = verify_metering(run, tollbooth_ok)
    finally:
        run.close()
    results["not_measured"] = run.not_measured
    results["added"] = {
        "concurrency1": added(results, "concurrency1", "latency"),
        "streams_ttft": added(results, "streams", "ttft"),
        "fixed_rate": added(results, "fixed_rate", "latency"),
    }
    results["checks"] = checks(results)
    results["duration_s"] = round(time.monotonic() - started, 1)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway",
        description="Compare the latency, throughput and memory of Tollbooth and LiteLLM "
        "against a local upstream.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short phases (a smoke run of about a minute)",
    )

    parser.add_argument(
        "--out", type=Path, help="JSON results file (default: /tmp/tollbooth-bench-<time>.json)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server worker processes for Tollbooth and LiteLLM (default: 1)",
    )
    parser.add_argument("--rate", type=float, help="request rate of the fixed-rate phase")
    parser.add_argument(
        "--p99-bound-ms", type=float, help="p99 bound of the throughput search (default: 50)"
    )

    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="PostgreSQL database to drop, create and use (default: %(default)s)",
    )
    parser.add_argument(
        "--fresh-db",
        action="store_true",
        help="migrate from scratch instead of copying the migrated template database",
    )
    parser.add_argument(
        "--keep-db", action="store_true", help="leave the database in place after the run"
    )
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="Redis database to flush and use (default: %(default)s)",
    )

    parser.add_argument(
        "--litellm-venv",
        default=str(DEFAULT_LITELLM_VENV),
        help="virtualenv with LiteLLM (default: %(default)s)",
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not create the LiteLLM virtualenv when it is missing",
    )
    parser.add_argument(
        "--logs", type=Path, help="copy the servers' log files into this directory at the end"
    )
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out")

    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        results = benchmark(args)
    except KeyboardInterrupt:
        print("Interrupted; the servers were stopped.", file=sys.stderr)
        return 130
    except SystemExit:
        print("Stopped by a signal; the servers were stopped.", file=sys.stderr)
        raise
    except (BenchError, ServiceError) as error:
        print(f"The benchmark failed: {error}", file=sys.stderr)
        return 1
    except (psycopg.OperationalError, redis.ConnectionError) as error:
        print(
            f"The benchmark failed to reach PostgreSQL or Redis: {error}\n"
            "Start them with `make services`, or pass --database-url and --redis-url.",
            file=sys.stderr,
        )
        return 1
    except (psycopg.Error, redis.RedisError) as error:
        print(f"The benchmark failed: {error}", file=sys.stderr)
        return 1
    out = args.out or Path(tempfile.gettempdir()) / (
        "tollbooth-bench-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + ".json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(report.markdown(results))
    print(f"\nResults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
