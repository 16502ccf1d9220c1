"""Measure what the Tollbooth gateway adds to a request, next to the LiteLLM proxy.

Run from the repository root (`make bench` runs the first line):

    .venv/bin/python -m bench.gateway             # full run, about 5 minutes
    .venv/bin/python -m bench.gateway --quick     # smoke run, about a minute and a half

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

Phases: latency at concurrency 1 (non-streamed, then time to first token of streams;
targets take turns in rounds so background load hits all of them alike), latency at a
fixed open-loop request rate, the highest rate whose p99 stays under a bound (found by
stepping the rate), and peak RSS of each target's process tree. "Added" figures are
target minus direct, percentile by percentile.

The script prints a Markdown table and writes every figure to a JSON file (`--out`, by
default under /tmp). It stops every process it started and removes its temporary files
on exit, on errors and on Ctrl+C.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql

from bench import report
from bench.services import (
    MemoryWatch,
    Service,
    ServiceError,
    cpu_seconds,
    free_port,
    http_get_status,
    wait_idle,
)
from bench.stats import difference, summary

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/tb_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/2"
DEFAULT_LITELLM_VENV = ROOT.parent / "bench-venv"
# Pinned so that reruns compare against the same LiteLLM; httptools gives LiteLLM's
# uvicorn the same HTTP parser as Tollbooth's (LiteLLM's proxy extra leaves it out).
LITELLM_PACKAGES = ("litellm[proxy]==1.108.7", "httptools")

MODEL = "gpt-4o-mini"
PROMPT = "Write a short greeting for a benchmark run."
OUTPUT_TOKENS = 8
STREAM_TOKENS = 32
TARGETS = ("direct", "tollbooth", "litellm")

# Goals the results are checked against.
GOAL_ADDED_P50_MS = 2.0
GOAL_ADDED_P99_MS = 5.0
GOAL_THROUGHPUT_VS_LITELLM = 3.0

# Seconds a service may take to answer after it is started. LiteLLM imports a lot.
START_TIMEOUT = {"direct": 30.0, "tollbooth": 60.0, "litellm": 180.0}


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
    # The fixed-rate phase stops early once its p99 is sure to exceed this: the target
    # cannot sustain the rate, and more load would only grow its backlog.
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


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why."""


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # SystemExit unwinds through the cleanup code like Ctrl+C does.
    raise SystemExit(128 + signum)


# --- Environment ----------------------------------------------------------------------


def base_env() -> dict[str, str]:
    """Return a minimal environment, so no setting of the caller's shell leaks in."""
    env = {
        name: os.environ[name]
        for name in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
        if name in os.environ
    }
    # Loopback traffic must never be sent to a proxy server.
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def machine_info() -> dict[str, Any]:
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


# --- Load generator -------------------------------------------------------------------


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
        # Metering clients ask for the usage chunk; both gateways then read the upstream's
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


# --- PostgreSQL and Redis -------------------------------------------------------------


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def maintenance_url(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/postgres"))


def database_recreate(url: str) -> None:
    name = database_name(url)
    with psycopg.connect(maintenance_url(url), autocommit=True) as connection:
        connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def database_drop(url: str) -> None:
    with psycopg.connect(maintenance_url(url), autocommit=True) as connection:
        connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(database_name(url))
            )
        )


def postgres_version(url: str) -> str:
    with psycopg.connect(maintenance_url(url), autocommit=True) as connection:
        return connection.execute("SHOW server_version").fetchone()[0]


def backend_cpu(url: str) -> dict[int, float]:
    """Return CPU seconds of each PostgreSQL backend connected to the benchmark database."""
    with psycopg.connect(maintenance_url(url), autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (database_name(url),)
        ).fetchall()
    return {pid: cpu_seconds(pid) for (pid,) in rows}


def backend_cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    # Backends opened during the phase count from zero; closed ones are lost (rare, since
    # Django keeps its connections open).
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


def redis_flush(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def redis_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server").get("redis_version", ""))
    finally:
        client.close()


def check_locations(database_url: str, redis_url: str) -> None:
    """Refuse URLs whose data this script would destroy by mistake."""
    if "bench" not in database_name(database_url):
        raise BenchError(
            f"The database {database_name(database_url)!r} is dropped and created again at "
            "every run, so its name must contain 'bench' (e.g. tb_bench)."
        )
    db_number = urlsplit(redis_url).path.lstrip("/")
    if not db_number.isdigit() or db_number == "0":
        raise BenchError(
            "The Redis database is flushed at the start and end of every run; give a "
            "dedicated database number other than 0 (e.g. redis://127.0.0.1:6379/2)."
        )


# --- Targets --------------------------------------------------------------------------


class Run:
    """The processes and files of one benchmark run; `close()` removes all of them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stack = contextlib.ExitStack()
        self.workdir = Path(tempfile.mkdtemp(prefix="tollbooth-bench-"))
        self.stack.callback(shutil.rmtree, self.workdir, ignore_errors=True)
        self.watch = MemoryWatch()
        self.watch.start()
        self.stack.callback(self.watch.stop)
        self.services: dict[str, Service] = {}
        self.clients: dict[str, dict[str, Any]] = {}
        self.commands: dict[str, list[str]] = {}
        self.not_measured: dict[str, str] = {}

    def close(self) -> None:
        self.stack.close()

    def launch(self, service: Service) -> None:
        self.stack.callback(service.stop)
        service.start()
        self.services[service.name] = service
        self.watch.add(service)

    def stop(self, name: str) -> None:
        service = self.services.pop(name, None)
        if service is not None:
            service.stop()


def manage(env: dict[str, str], *arguments: str) -> str:
    """Run a manage.py command and return its standard output."""
    result = subprocess.run(
        [PYTHON, "manage.py", *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise BenchError(
            f"manage.py {arguments[0]} failed with code {result.returncode}:\n"
            + (result.stderr or result.stdout)[-2000:]
        )
    return result.stdout


def start_upstream(run: Run) -> int:
    port = free_port()
    service = Service(
        name="direct",
        argv=[
            PYTHON,
            "-m",
            "devtools.upstream",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=base_env(),
        cwd=ROOT,
        log_path=run.workdir / "upstream.log",
        port=port,
    )
    run.launch(service)
    run.commands["direct"] = service.argv
    service.wait_ready(
        timeout=START_TIMEOUT["direct"], probe=lambda: http_get_status(port, "/v1/models") == 200
    )
    run.clients["direct"] = {
        "name": "direct",
        "host": "127.0.0.1",
        "port": port,
        "path": "/v1/chat/completions",
        "headers": {"Authorization": "Bearer bench"},
    }
    return port


def tollbooth_env(
    args: argparse.Namespace, *, port: int, upstream_port: int, var_dir: Path
) -> dict[str, str]:
    env = base_env()
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "DATABASE_URL": args.database_url,
            "REDIS_URL": args.redis_url,
            "SECRET_KEY": secrets.token_urlsafe(40),
            "TOLLBOOTH_VAR_DIR": str(var_dir),
            "TOLLBOOTH_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
            "OPENAI_API_KEY": "bench",
            "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{upstream_port}",
            "ANTHROPIC_API_KEY": "bench",
        }
    )
    return env


def tollbooth_argv(port: int, workers: int) -> list[str]:
    argv = [
        PYTHON,
        "-m",
        "uvicorn",
        "portal.asgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-access-log",
    ]
    if importlib.util.find_spec("uvloop") is not None:
        argv += ["--loop", "uvloop"]
    if importlib.util.find_spec("httptools") is not None:
        argv += ["--http", "httptools"]
    return argv


def prepare_tollbooth(run: Run, *, upstream_port: int) -> tuple[dict[str, str], int]:
    """Create the database, migrate it, seed an account and a key; return env and port."""
    args = run.args
    port = free_port()
    var_dir = run.workdir / "tollbooth-var"
    var_dir.mkdir()
    env = tollbooth_env(args, port=port, upstream_port=upstream_port, var_dir=var_dir)
    redis_flush(args.redis_url)
    run.stack.callback(redis_flush, args.redis_url)
    database_recreate(args.database_url)
    if not args.keep_db:
        run.stack.callback(database_drop, args.database_url)
    manage(env, "migrate", "--no-input")
    manage(
        env,
        "create_account",
        "--email",
        "bench@tollbooth.local",
        "--name",
        "Bench",
        "--slug",
        "bench",
    )
    manage(
        env,
        "grant_credits",
        "--account",
        "bench",
        "--amount-usd",
        "10000.00",
        "--reason",
        "Benchmark",
    )
    output = manage(
        env,
        "create_access_key",
        "--account",
        "bench",
        "--name",
        "Benchmark",
        "--scope",
        "inference",
        "--scope",
        "management",
    )
    key = output.strip().splitlines()[-1].strip() if output.strip() else ""
    if not key.startswith("tb_"):
        raise BenchError("manage.py create_access_key printed no key.")
    run.clients["tollbooth"] = {
        "name": "tollbooth",
        "host": "127.0.0.1",
        "port": port,
        "path": "/v1/chat/completions",
        "headers": {"Authorization": f"Bearer {key}"},
    }
    return env, port


def start_tollbooth(run: Run, env: dict[str, str], port: int) -> None:
    service = Service(
        name="tollbooth",
        argv=tollbooth_argv(port, run.args.workers),
        env=env,
        cwd=ROOT,
        log_path=run.workdir / "tollbooth.log",
        port=port,
    )
    run.launch(service)
    run.commands["tollbooth"] = service.argv


def litellm_executable(args: argparse.Namespace) -> tuple[Path | None, str]:
    """Return LiteLLM's CLI, installing it into its virtualenv if needed, or a reason."""
    venv = Path(args.litellm_venv)
    executable = venv / "bin" / "litellm"
    if executable.exists():
        return executable, ""
    install = f"python3 -m venv {venv} && {venv}/bin/pip install " + " ".join(
        f"'{package}'" for package in LITELLM_PACKAGES
    )
    if args.no_install:
        return None, f"{executable} does not exist; install it with: {install}"
    print(f"Installing LiteLLM into {venv} (once) ...", file=sys.stderr, flush=True)
    base_python = shutil.which("python3") or PYTHON
    steps = [
        [base_python, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--quiet", *LITELLM_PACKAGES],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            return None, (
                f"`{' '.join(step)}` failed with code {result.returncode}: "
                + (result.stderr or result.stdout).strip()[-800:]
            )
    if not executable.exists():
        return None, f"the installation left no {executable}"
    return executable, ""


def litellm_versions(venv: Path) -> dict[str, Any]:
    script = (
        "import importlib.metadata as m, importlib.util as u, json, platform\n"
        "v = lambda n: m.version(n) if u.find_spec(n.replace('-', '_')) else None\n"
        "print(json.dumps({'litellm': m.version('litellm'), 'python': "
        "platform.python_version(), 'uvicorn': v('uvicorn'), 'uvloop': v('uvloop'), "
        "'httptools': v('httptools')}))"
    )
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=base_env(),
    )
    if result.returncode != 0:
        return {"error": result.stderr.strip()[-400:]}
    return json.loads(result.stdout)


def litellm_config(*, upstream_port: int, master_key: str) -> str:
    """Return the proxy config: one model name mapped to the local upstream."""
    return (
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://127.0.0.1:{upstream_port}/v1\n"
        "      api_key: bench\n"
        "general_settings:\n"
        f"  master_key: {master_key}\n"
    )


# uvicorn's logging with the access log silenced, the counterpart of Tollbooth's
# --no-access-log (LiteLLM's CLI has no such switch).
LITELLM_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "uvicorn.access": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
    },
}


def litellm_env(venv: Path, *, home: Path, upstream_port: int) -> dict[str, str]:
    env = base_env()
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env["HOME"] = str(home)
    # Keep LiteLLM off the network: its bundled cost map and header lists are used, and
    # the URLs it would fetch them from point at the local upstream, which answers 404.
    local = f"http://127.0.0.1:{upstream_port}/not-found"
    env.update(
        {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
            "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
            "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
            "LITELLM_LOCAL_BLOG_POSTS": "True",
            "LITELLM_TELEMETRY_DISABLED": "True",
            "LITELLM_MODEL_COST_MAP_URL": local,
            "LITELLM_BLOG_POSTS_URL": local,
            "LITELLM_ANTHROPIC_BETA_HEADERS_URL": local,
            "LITELLM_AUTOROUTER_PRESETS_URL": local,
        }
    )
    return env


def start_litellm(run: Run, *, upstream_port: int) -> None:
    """Start the LiteLLM proxy, or note in `run.not_measured` why it is left out."""
    args = run.args
    executable, reason = litellm_executable(args)
    if executable is None:
        run.not_measured["litellm"] = reason
        return
    venv = Path(args.litellm_venv)
    port = free_port()
    master_key = "sk-bench-" + secrets.token_hex(16)
    config_path = run.workdir / "litellm.yaml"
    config_path.write_text(litellm_config(upstream_port=upstream_port, master_key=master_key))
    log_config_path = run.workdir / "litellm-logging.json"
    log_config_path.write_text(json.dumps(LITELLM_LOG_CONFIG))
    home = run.workdir / "litellm-home"
    home.mkdir()
    service = Service(
        name="litellm",
        argv=[
            str(executable),
            "--config",
            str(config_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            str(args.workers),
            "--log_config",
            str(log_config_path),
        ],
        env=litellm_env(venv, home=home, upstream_port=upstream_port),
        cwd=run.workdir,
        log_path=run.workdir / "litellm.log",
        port=port,
    )
    run.launch(service)
    run.commands["litellm"] = service.argv
    run.clients["litellm"] = {
        "name": "litellm",
        "host": "127.0.0.1",
        "port": port,
        "path": "/v1/chat/completions",
        "headers": {"Authorization": f"Bearer {master_key}"},
    }


def smoke_check(run: Run, name: str) -> str:
    """Send a few plain and streamed requests; return an error description or ''."""
    client = run.clients[name]
    for stream in (False, True):
        spec = sequential_spec([client], stream=stream, requests=3, warmup=0, round_size=3)
        result = loadgen(spec, timeout=60)["targets"][name]
        if result["errors"]:
            kind = "streamed" if stream else "non-streamed"
            return f"{kind} requests failed: " + "; ".join(result["error_samples"])
    return ""


def bring_up(run: Run) -> None:
    """Start the upstream and the three targets and check that each answers correctly."""
    upstream_port = start_upstream(run)
    if run.args.no_litellm:
        run.not_measured["litellm"] = "--no-litellm was given"
    else:
        # LiteLLM takes long to import; it starts while Tollbooth's database is prepared.
        start_litellm(run, upstream_port=upstream_port)
    env, port = prepare_tollbooth(run, upstream_port=upstream_port)
    start_tollbooth(run, env, port)
    run.services["tollbooth"].wait_ready(timeout=START_TIMEOUT["tollbooth"])
    if "litellm" in run.services:
        try:
            run.services["litellm"].wait_ready(
                timeout=START_TIMEOUT["litellm"],
                probe=lambda: (
                    http_get_status(run.services["litellm"].port, "/health/liveliness") == 200
                ),
            )
        except ServiceError as error:
            run.not_measured["litellm"] = str(error)
            run.stop("litellm")
    for name in TARGETS:
        if name not in run.services:
            continue
        problem = smoke_check(run, name)
        if not problem:
            continue
        log = run.services[name].log_tail()
        if name == "litellm":
            run.not_measured["litellm"] = f"the proxy answered wrongly: {problem}\n{log}"
            run.stop("litellm")
        else:
            raise BenchError(f"{name} answered wrongly: {problem}\n{log}")


# --- Phases ---------------------------------------------------------------------------


def measured(run: Run) -> list[str]:
    return [name for name in TARGETS if name in run.services]


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
    """Send `rate` requests per second to one target; add CPU per request to the result."""
    wait_idle(list(run.services.values()))
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
    # CPU time is divided among the requests that were answered, warm-up included.
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
    return {
        name: rate_run(
            run,
            name,
            rate=plan.fixed_rate,
            seconds=plan.fixed_seconds,
            warmup=plan.fixed_warmup,
            timeout=plan.rate_timeout,
            late_ms=plan.fixed_give_up_ms,
        )
        for name in measured(run)
    }


def capacity_search(run: Run, plan: Plan, name: str, *, start: float) -> dict[str, Any]:
    """Find the highest request rate whose p99 (from the scheduled start) stays in bound.

    The rate goes up by `step_factor` from `start` while steps pass (or down while they
    fail), then the gap between the last pass and the first failure is bisected
    geometrically `refine` times. A step passes when every request got the expected
    answer and the p99 latency, counted from when the request was due, is at most
    `p99_bound_ms`; counting from the due time makes queueing in the client count too.
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
        # A server that answers one request in L ms at concurrency 1 serves at least
        # about 1000/L per second once requests overlap; starting at half of that saves
        # steps without starting above the capacity.
        mean_ms = concurrency1[name]["latency"]["mean"] or 10.0
        out[name] = capacity_search(run, plan, name, start=500.0 / mean_ms)
    return out


def verify_metering(run: Run, ok_responses: int) -> dict[str, Any]:
    """Count the usage records Tollbooth wrote and run its ledger check."""
    env = tollbooth_env(run.args, port=0, upstream_port=0, var_dir=run.workdir)
    script = "from gateway.models import UsageRecord; print(UsageRecord.objects.count())"
    records = int(manage(env, "shell", "-c", script).strip().splitlines()[-1])
    ledger = subprocess.run(
        [PYTHON, "manage.py", "check_ledger"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return {
        "usage_records": records,
        "ok_responses": ok_responses,
        "check_ledger_exit_code": ledger.returncode,
        "check_ledger_output": (ledger.stdout + ledger.stderr).strip()[-500:],
    }


# --- Results --------------------------------------------------------------------------


def added(results: dict[str, Any], section: str, metric: str) -> dict[str, Any]:
    """Return target minus direct for p50 and p99 of one metric of one section."""
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
        throughput.update(value=None, passed=capacity["tollbooth"]["rate"] > 0)
    else:
        value = round(capacity["tollbooth"]["rate"] / litellm["rate"], 3)
        throughput.update(value=value, passed=value >= GOAL_THROUGHPUT_VS_LITELLM)
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
        print("Targets up: " + ", ".join(measured(run)), file=sys.stderr, flush=True)

        print("Concurrency 1, non-streamed ...", file=sys.stderr, flush=True)
        results["concurrency1"] = phase_concurrency1(run, plan, stream=False)
        print("Concurrency 1, streams ...", file=sys.stderr, flush=True)
        results["streams"] = phase_concurrency1(run, plan, stream=True)
        print(f"Fixed rate {plan.fixed_rate:g} req/s ...", file=sys.stderr, flush=True)
        results["fixed_rate"] = phase_fixed_rate(run, plan)
        print(f"Rate steps to p99 <= {plan.p99_bound_ms:g} ms ...", file=sys.stderr, flush=True)
        results["capacity"] = phase_capacity(run, plan, results["concurrency1"])

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
            + 6  # the smoke check's requests
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
        help="short phases (a smoke run of about a minute and a half)",
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
    except (BenchError, ServiceError, psycopg.Error, redis.RedisError) as error:
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
