"""Start Tollbooth on this machine: portal and gateway, Celery worker and beat, demo upstream.

With no environment set, this uses SQLite, an embedded Celery broker (SQLite through
SQLAlchemy), a local upstream that speaks the OpenAI and Anthropic formats and a local
Stripe stand-in, so it works on a bare machine. Variables that are set (DATABASE_URL,
REDIS_URL, STRIPE_SECRET_KEY, OPENAI_API_KEY and the rest) take precedence.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PORT = int(os.environ.get("PORT", "8000"))
UPSTREAM_PORT = int(os.environ.get("DEMO_UPSTREAM_PORT", "9100"))
STRIPE_PORT = int(os.environ.get("DEMO_STRIPE_PORT", "12111"))
DEMO_WEBHOOK_SECRET = "whsec_tollboothdemo0000000000000000"
DEMO_WEBHOOK_UUID = "00000000-0000-4000-8000-000000000001"


def demo_environment() -> dict[str, str]:
    """Fill in local stand-ins for whatever the environment leaves unset."""
    env = dict(os.environ)
    env.setdefault("DEBUG", "1")
    env.setdefault("TOLLBOOTH_PUBLIC_URL", f"http://127.0.0.1:{PORT}")
    if not env.get("OPENAI_API_KEY"):
        env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{UPSTREAM_PORT}/v1"
        env["OPENAI_API_KEY"] = "demo-upstream-key"
    if not env.get("ANTHROPIC_API_KEY"):
        env["ANTHROPIC_BASE_URL"] = f"http://127.0.0.1:{UPSTREAM_PORT}"
        env["ANTHROPIC_API_KEY"] = "demo-upstream-key"
    if not env.get("STRIPE_SECRET_KEY"):
        env["STRIPE_API_HOST"] = f"http://127.0.0.1:{STRIPE_PORT}"
        env["STRIPE_WEBHOOK_SECRET"] = DEMO_WEBHOOK_SECRET
        env["STRIPE_WEBHOOK_UUID"] = DEMO_WEBHOOK_UUID
    return env


class SetupError(Exception):
    """A manage.py command failed while setting up; the message has its output."""


def manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [PYTHON, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise SetupError(
            f"manage.py {args[0]} failed with exit code {result.returncode}:\n{output[-3000:]}"
        )
    return result.stdout.strip()


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"Nothing listens on 127.0.0.1:{port} after {timeout:.0f} s.")


def main() -> int:
    env = demo_environment()
    os.chdir(ROOT)

    # 1. Database, static files, webhook endpoint and demo data.
    try:
        print("Migrating the database (the first run takes a minute or two)...", flush=True)
        manage(env, "migrate", "--no-input")
        manage(env, "collectstatic", "--no-input")
        if env.get("STRIPE_WEBHOOK_SECRET"):
            webhook_url = manage(env, "configure_stripe_webhook")
        else:
            webhook_url = "(set STRIPE_WEBHOOK_SECRET and run manage.py configure_stripe_webhook)"
        demo_key = manage(env, "seed_demo")
    except SetupError as error:
        print(error, file=sys.stderr)
        return 1

    # 2. Processes.
    commands: list[list[str]] = []
    if env.get("OPENAI_API_KEY") == "demo-upstream-key":
        commands.append(
            [
                PYTHON,
                "-m",
                "devtools.upstream",
                "--host",
                "127.0.0.1",
                "--port",
                str(UPSTREAM_PORT),
            ]
        )
    if env.get("STRIPE_API_HOST", "").startswith("http://127.0.0.1"):
        commands.append(
            [
                PYTHON,
                "-m",
                "devtools.stripe_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(STRIPE_PORT),
                "--webhook-url",
                webhook_url,
                "--webhook-secret",
                env["STRIPE_WEBHOOK_SECRET"],
            ]
        )
    commands += [
        [
            PYTHON,
            "-m",
            "uvicorn",
            "portal.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(PORT),
            "--no-access-log",
        ],
        [
            PYTHON,
            "-m",
            "celery",
            "-A",
            "portal",
            "worker",
            "--loglevel",
            "INFO",
            "--concurrency",
            "2",
            "--pool",
            "threads",
        ],
        [PYTHON, "-m", "celery", "-A", "portal", "beat", "--loglevel", "INFO"],
    ]
    processes = [subprocess.Popen(command, cwd=ROOT, env=env) for command in commands]

    stopping = False

    def stop(*_args) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.poll() is None:
                process.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    try:
        wait_for_port(PORT)
    except RuntimeError as error:
        stop()
        print(error, file=sys.stderr)
        return 1

    base = env["TOLLBOOTH_PUBLIC_URL"]
    key_line = demo_key or "(printed on the first run only; create one at /keys/)"
    key_value = demo_key or "tb_..."
    print(
        f"""
Tollbooth is running at {base}/
  Sign in:        demo@tollbooth.local / tollbooth-demo  (or sign up at {base}/accounts/signup/)
  Admin:          {base}/admin/  (create staff with: .venv/bin/python manage.py createsuperuser)
  API docs:       {base}/api/docs
  Stripe webhook: {webhook_url}
  Demo key:       {key_line}

Try it:
  curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {key_value}' \\
    -H 'Content-Type: application/json' \\
    -d '{{"model": "openai:gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  curl -s {base}/api/credits/balance -H 'Authorization: Bearer {key_value}'

  .venv/bin/python -c "from openai import OpenAI; \\
client = OpenAI(base_url='{base}/v1', api_key='{key_value}'); \\
print(client.chat.completions.create(model='gpt-4o-mini', \\
messages=[{{'role': 'user', 'content': 'Hello'}}]).choices[0].message.content)"

Press Ctrl+C to stop.
""",
        flush=True,
    )

    exit_code = 0
    while True:
        for process in processes:
            code = process.poll()
            if code is not None:
                # A stop asked for with Ctrl+C or SIGTERM is a clean exit.
                exit_code = 0 if stopping else code
                stop()
                for other in processes:
                    other.wait()
                return exit_code
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
