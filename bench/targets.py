"""Start the three targets of the benchmark: the upstream, Tollbooth and LiteLLM.

Tollbooth gets a PostgreSQL database that is dropped and created again at every run, a
Redis database that is flushed at the start and the end, an account with a large grant
and an access key. LiteLLM runs from its own virtualenv outside the repository, with no
database and a config file that maps one model name to the local upstream.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql

from bench.client import MODEL, loadgen, sequential_spec
from bench.services import (
    PYTHON,
    ROOT,
    BenchError,
    MemoryWatch,
    Service,
    ServiceError,
    base_env,
    cpu_seconds,
    free_port,
    http_get_status,
    progress,
)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/tb_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/2"
DEFAULT_LITELLM_VENV = ROOT.parent / "bench-venv"
# Pinned so that reruns compare against the same LiteLLM. httptools gives LiteLLM's
# uvicorn the same HTTP parser as Tollbooth's, since LiteLLM's proxy extra leaves it out.
LITELLM_PACKAGES = ("litellm[proxy]==1.108.7", "httptools")
TARGETS = ("direct", "tollbooth", "litellm")

# Seconds a service may take to respond after it is started. LiteLLM imports a lot.
START_TIMEOUT = {"direct": 30.0, "tollbooth": 60.0, "litellm": 180.0}


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def maintenance_url(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/postgres"))


def migrations_fingerprint() -> str:
    """Hash the project's migrations and locked dependencies (dj-stripe's migrations)."""
    digest = hashlib.sha256()
    for path in sorted(ROOT.glob("*/migrations/*.py")):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    lock = ROOT / "requirements.lock"
    if lock.exists():
        digest.update(lock.read_bytes())
    return digest.hexdigest()[:12]


def template_name(url: str) -> str:
    return f"{database_name(url)}_template_{migrations_fingerprint()}"


def database_recreate(url: str, *, fresh: bool) -> bool:
    """Drop and create the database, as a copy of the migrated template if there is one.

    Return whether the copy was made. dj-stripe's migrations alone take a minute of CPU,
    so the first run keeps a migrated template. Its name contains a hash of every
    migration file and of requirements.lock, so a change to either makes a new one.
    """
    name = database_name(url)
    template = template_name(url)
    with psycopg.connect(maintenance_url(url), autocommit=True) as connection:
        connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        found = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (template,)
        ).fetchone()
        if found and not fresh:
            connection.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
            return True
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return False


def template_save(url: str) -> None:
    """Keep the freshly migrated database as the template; drop older templates."""
    name = database_name(url)
    template = template_name(url)
    with psycopg.connect(maintenance_url(url), autocommit=True) as connection:
        stale = connection.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s",
            (name.replace("_", r"\_") + r"\_template\_%",),
        ).fetchall()
        for (old,) in stale:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(old))
            )
        connection.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(template), sql.Identifier(name)
            )
        )


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
    # Backends opened during the phase count from zero. Closed ones are lost, which the
    # server's DATABASE_CONN_MAX_AGE of one hour prevents.
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
    """Reject URLs whose data this script would destroy by mistake."""
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


class Run:
    """The processes and files of one benchmark run; `close()` removes all of them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stack = contextlib.ExitStack()
        self.workdir = Path(tempfile.mkdtemp(prefix="tollbooth-bench-"))
        self.stack.callback(shutil.rmtree, self.workdir, ignore_errors=True)
        if args.logs:
            # Runs after every service has stopped, so the logs are complete.
            self.stack.callback(self.copy_logs, args.logs)
        self.watch = MemoryWatch()
        self.watch.start()
        self.stack.callback(self.watch.stop)
        self.services: dict[str, Service] = {}
        self.clients: dict[str, dict[str, Any]] = {}
        self.commands: dict[str, list[str]] = {}
        self.not_measured: dict[str, str] = {}
        # Successful responses to the smoke check's requests, per target.
        self.smoke_ok: dict[str, int] = {}

    def close(self) -> None:
        self.stack.close()

    def copy_logs(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for log in self.workdir.glob("*.log"):
            shutil.copy(log, directory / log.name)

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
            # Connections older than DATABASE_CONN_MAX_AGE (60 s by default) are closed
            # between requests, and the CPU time of a PostgreSQL backend that closed during
            # a phase can no longer be read. One hour keeps each backend for the whole run.
            "DATABASE_CONN_MAX_AGE": "3600",
        }
    )
    # Gateway tuning settings set in the caller's shell reach the server, to compare them.
    env.update({name: value for name, value in os.environ.items() if name.startswith("GATEWAY_")})
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
    copied = database_recreate(args.database_url, fresh=args.fresh_db)
    if not args.keep_db:
        run.stack.callback(database_drop, args.database_url)
    if not copied:
        progress("Migrating a new database; dj-stripe's migrations take a minute or more")
    manage(env, "migrate", "--no-input")
    if not copied:
        template_save(args.database_url)

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
    progress(f"Installing LiteLLM into {venv} (once)")
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
    # Keep LiteLLM off the network. It uses its bundled cost map and header lists, and the
    # URLs it would fetch them from point at the local upstream, which returns 404.
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
        run.smoke_ok[name] = run.smoke_ok.get(name, 0) + result["ok_total"]
        if result["errors"]:
            kind = "streamed" if stream else "non-streamed"
            return f"{kind} requests failed: " + "; ".join(result["error_samples"])
    return ""


def bring_up(run: Run) -> None:
    """Start the upstream and the three targets and check each target's responses."""
    upstream_port = start_upstream(run)
    progress(f"Upstream ready on 127.0.0.1:{upstream_port}")
    if run.args.no_litellm:
        run.not_measured["litellm"] = "--no-litellm was given"
    else:
        # LiteLLM takes long to import, so it starts while Tollbooth's database is prepared.
        start_litellm(run, upstream_port=upstream_port)
    progress("Preparing Tollbooth's database (migrate, account, grant, key)")
    env, port = prepare_tollbooth(run, upstream_port=upstream_port)
    start_tollbooth(run, env, port)
    run.services["tollbooth"].wait_ready(timeout=START_TIMEOUT["tollbooth"])
    progress(f"Tollbooth ready on 127.0.0.1:{port}")
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
        else:
            progress(f"LiteLLM ready on 127.0.0.1:{run.services['litellm'].port}")
    for name in TARGETS:
        if name not in run.services:
            continue
        problem = smoke_check(run, name)
        if not problem:
            continue
        log = run.services[name].log_tail()
        if name == "litellm":
            run.not_measured["litellm"] = f"unexpected responses: {problem}\n{log}"
            run.stop("litellm")
        else:
            raise BenchError(f"{name} returned unexpected responses: {problem}\n{log}")


def measured(run: Run) -> list[str]:
    return [name for name in TARGETS if name in run.services]


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
