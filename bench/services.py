"""Start, watch and stop the server processes of a benchmark run.

Every process runs in its own session (process group), so stopping it also stops
anything it forked, and a Ctrl+C in the terminal reaches only the benchmark script,
which then stops the servers itself. Memory and CPU figures are read from /proc and
cover the whole process tree of a service.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Tollbooth, the upstream and the load generator run on the interpreter of this script.
PYTHON = sys.executable

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
# Loaded before any fork: a child must not load libraries between fork and exec.
_LIBC = ctypes.CDLL(None, use_errno=True)
_STARTED = time.monotonic()


class BenchError(RuntimeError):
    """An error that ends the benchmark; the message gives the reason."""


class ServiceError(RuntimeError):
    """A service failed to start or stopped responding."""


def progress(message: str) -> None:
    """Print a progress line with the seconds since the start to standard error."""
    print(f"[{time.monotonic() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


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


def die_with_parent() -> None:
    """Ask the kernel to send SIGTERM to this child if the benchmark script dies."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def http_get_status(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    """GET a path on 127.0.0.1 and return the status (http.client ignores proxy settings)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


# --- /proc readings ------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Return the fields of /proc/<pid>/stat after the command name, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode(errors="replace")
    except OSError:
        return None
    # The command name may contain spaces and parentheses, but it ends at the last ")".
    return raw[raw.rfind(")") + 2 :].split()


def children_map() -> dict[int, list[int]]:
    """Map every process id to the ids of its children."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children[int(fields[1])].append(int(entry.name))
    return children


def process_tree(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """Return `root` and all its descendants that are alive."""
    children = children if children is not None else children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def hwm_bytes(pid: int) -> int:
    """Return the process's peak RSS (VmHWM) as the kernel recorded it."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """Return user + system CPU time of a process and of the children it has waited for."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # utime, stime, cutime and cstime are fields 14-17 of stat, and the list starts at 3.
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


def tree_cpu_seconds(root: int) -> float:
    return sum(cpu_seconds(pid) for pid in process_tree(root))


# --- Services -----------------------------------------------------------------------


class Service:
    """One server process (and whatever it forks) with its log file."""

    def __init__(
        self,
        *,
        name: str,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        log_path: Path,
        port: int,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.port = port
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, *, timeout: float, probe: Callable[[], bool] | None = None) -> None:
        """Wait until the port accepts connections and `probe` (if any) returns True."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServiceError(
                    f"{self.name} exited with code {self.process.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if port_open(self.port) and (probe is None or probe()):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise ServiceError(
            f"{self.name} did not respond on 127.0.0.1:{self.port} within {timeout:.0f} s; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process group: SIGTERM, then SIGKILL for whatever is left."""
        if self.process is None:
            return
        group = self.process.pid
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=timeout)

    def tree(self, children: dict[int, list[int]] | None = None) -> list[int]:
        return process_tree(self.pid, children) if self.alive() else []

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid) if self.alive() else 0.0


class MemoryWatch:
    """Sample the summed RSS of each service's process tree in a background thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.services: list[Service] = []
        self.peak_rss: dict[str, int] = {}
        self.peak_hwm: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)

    def add(self, service: Service) -> None:
        with self._lock:
            self.services.append(service)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self, *, with_hwm: bool = False) -> None:
        """Read every watched tree once; `with_hwm` also sums the kernel's per-process peaks."""
        children = children_map()
        with self._lock:
            services = list(self.services)
        for service in services:
            tree = service.tree(children)
            if not tree:
                continue
            rss = sum(rss_bytes(pid) for pid in tree)
            self.peak_rss[service.name] = max(self.peak_rss.get(service.name, 0), rss)
            if with_hwm:
                hwm = sum(hwm_bytes(pid) for pid in tree)
                self.peak_hwm[service.name] = max(self.peak_hwm.get(service.name, 0), hwm)


def wait_idle(services: list[Service], *, limit: float = 15.0, busy_share: float = 0.05) -> float:
    """Wait until no service uses more than `busy_share` of a core; return the seconds waited.

    A rate step beyond a server's capacity leaves a backlog that the server keeps working
    through after the client gave up. The next step must not start on top of it.
    """
    started = time.monotonic()
    window = 0.2
    while time.monotonic() - started < limit:
        before = [service.cpu_seconds() for service in services]
        time.sleep(window)
        after = [service.cpu_seconds() for service in services]
        if all(b - a <= busy_share * window for a, b in zip(before, after, strict=True)):
            break
    return time.monotonic() - started
