"""Real local services for the ``services`` tier: PostgreSQL, Prometheus and node-exporter.

Session fixtures. A test module imports the fixture function, whose Python name differs from the
fixture name so that test arguments do not shadow an import (ruff F811)::

    from tests.services import PostgresServer, postgres_fixture  # noqa: F401

    def test_x(postgres: PostgresServer) -> None: ...

(``pytest_plugins = ["tests.services"]`` in a test module would work too, but not together with a
module-level import of the helpers below: pytest then warns that it cannot rewrite the module's
asserts, and warnings are errors here. The conftests belong to the tiers, so they are left alone.)


``postgres`` -> :class:`PostgresServer`
    ``initdb`` into a fresh directory under /tmp and ``postgres`` started on a free 127.0.0.1
    port, its unix socket in that directory, ``max_connections=20`` and
    ``superuser_reserved_connections=3`` (a pool of 17), password (scram) authentication over
    TCP. PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` system
    user (created by the Debian package) and the directory is handed to it.
``prometheus`` -> :class:`PrometheusStack`
    ``prometheus-node-exporter`` and ``prometheus`` on free 127.0.0.1 ports, scraping every 1 s,
    storage in a temporary directory. The packages' own services are not used (and are not
    started by ``hack/ensure-debs``), so nothing binds the default ports 9090/9100.

Binaries that are missing are installed with ``hack/ensure-debs`` (Debian packages ``postgresql``,
``prometheus``, ``prometheus-node-exporter``). Every wait is bounded, servers are stopped and their
directories removed at the end of the session even when tests fail, and each server gets a
parent-death signal, so a killed pytest does not leave servers behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg
import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
ENSURE_DEBS = REPO / "hack" / "ensure-debs"
START_TIMEOUT = 60.0
"""Seconds a server gets to become ready."""
STOP_TIMEOUT = 20.0
"""Seconds a server gets to exit after its stop signal, before it is killed."""
INSTALL_TIMEOUT = 900.0

_PR_SET_PDEATHSIG = 1


class ServiceError(RuntimeError):
    """A service could not be installed or started; the message says where to look."""


# ---------------------------------------------------------------------------------------------
# Helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ensure_debs(*packages: str) -> None:
    """Install the Debian packages that are missing (hack/ensure-debs), bounded in time."""
    try:
        subprocess.run(
            [str(ENSURE_DEBS), *packages],
            check=True,
            timeout=INSTALL_TIMEOUT,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as exc:
        raise ServiceError(
            f"hack/ensure-debs {' '.join(packages)} failed ({exc.returncode}):\n"
            f"{exc.stderr[-3000:]}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise ServiceError(f"hack/ensure-debs {' '.join(packages)} timed out") from exc


def _death_signal(sig: signal.Signals) -> Callable[[], None]:
    """A preexec_fn that makes the child receive ``sig`` when the test process dies."""
    libc = ctypes.CDLL(None, use_errno=True)

    def set_pdeathsig() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return set_pdeathsig


@dataclass
class Process:
    """A server process started by a fixture, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: signal.Signals
    log_file: IO[bytes]

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop signal, a bounded wait, then SIGKILL; only this process, by its pid."""
        if self.running():
            self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=STOP_TIMEOUT)
        self.log_file.close()


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """subprocess keyword arguments that run the child as ``user`` (nothing for None)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def start_process(
    name: str,
    argv: list[str],
    log_path: Path,
    *,
    stop_signal: signal.Signals = signal.SIGTERM,
    user: pwd.struct_passwd | None = None,
    cwd: Path | None = None,
) -> Process:
    log_file = log_path.open("ab")
    popen = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        preexec_fn=_death_signal(stop_signal),  # noqa: PLW1509 - no threads run yet at setup
        **_as_user(user),
    )
    return Process(name, popen, log_path, stop_signal, log_file)


def wait_until(
    what: str, ready: Callable[[], bool], process: Process, timeout: float = START_TIMEOUT
) -> None:
    """Poll ``ready`` until it holds; fail early when the process dies, or at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.running():
            raise ServiceError(
                f"{process.name} exited ({process.popen.returncode}) before {what}; log:\n"
                f"{process.log_tail()}"
            )
        if ready():
            return
        time.sleep(0.2)
    raise ServiceError(
        f"{process.name}: no {what} after {timeout:.0f}s; log:\n{process.log_tail()}"
    )


# ---------------------------------------------------------------------------------------------
# PostgreSQL


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway PostgreSQL server."""

    host: str
    port: int
    user: str
    password: str
    socket_dir: Path
    data_dir: Path
    max_connections: int
    superuser_reserved_connections: int
    version: int

    def dsn(self, dbname: str = "postgres", **extra: str) -> str:
        params = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "password": self.password,
            "dbname": dbname,
            **extra,
        }
        return " ".join(f"{key}={value}" for key, value in params.items())

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(), connect_timeout=5, **kwargs)

    @property
    def pool_size(self) -> int:
        return self.max_connections - self.superuser_reserved_connections


def postgres_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin that has initdb and postgres."""
    candidates = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            with contextlib.suppress(ValueError):
                candidates.append((int(bindir.parent.name), bindir))
    return max(candidates)[1] if candidates else None


def _server_user() -> pwd.struct_passwd | None:
    """None when we are not root; the postgres system user when we are (postgres refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError(
            "running as root and there is no 'postgres' user to run the server as; install the "
            "postgresql package (hack/ensure-debs postgresql) or run the tests as a normal user"
        ) from None


@contextlib.contextmanager
def run_postgres(
    max_connections: int = 20, superuser_reserved: int = 3
) -> Iterator[PostgresServer]:
    bindir = postgres_bindir()
    if bindir is None:
        ensure_debs("postgresql")
        bindir = postgres_bindir()
    if bindir is None:
        raise ServiceError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin after install")
    user = _server_user()
    base = Path(tempfile.mkdtemp(prefix="capacity-pg-"))
    process: Process | None = None
    try:
        data = base / "data"
        pwfile = base / "pwfile"
        password = "capacity-test"
        pwfile.write_text(password + "\n", encoding="utf-8")
        if user is not None:
            for path in (base, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        base.chmod(0o700)
        initdb = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "capacity",
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=base,
            check=False,
            **_as_user(user),
        )
        if initdb.returncode != 0:
            raise ServiceError(f"initdb failed ({initdb.returncode}):\n{initdb.stderr[-3000:]}")
        log_path = base / "postgres.log"
        log_path.touch()
        if user is not None:
            os.chown(log_path, user.pw_uid, user.pw_gid)
        for attempt in range(3):  # a free port can be taken between the probe and the bind
            port = free_port()
            process = start_process(
                "postgres",
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-c",
                    f"port={port}",
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={base}",
                    "-c",
                    f"max_connections={max_connections}",
                    "-c",
                    f"superuser_reserved_connections={superuser_reserved}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "shared_buffers=16MB",
                ],
                log_path,
                stop_signal=signal.SIGINT,  # fast shutdown: disconnect clients, then exit
                user=user,
                cwd=base,
            )
            server = PostgresServer(
                host="127.0.0.1",
                port=port,
                user="capacity",
                password=password,
                socket_dir=base,
                data_dir=data,
                max_connections=max_connections,
                superuser_reserved_connections=superuser_reserved,
                version=int(bindir.parent.name),
            )

            def accepting(server: PostgresServer = server) -> bool:
                try:
                    with server.connect() as conn:
                        conn.execute("SELECT 1")
                except psycopg.OperationalError:
                    return False
                return True

            try:
                wait_until("connection accepted", accepting, process)
            except ServiceError:
                if attempt < 2 and "could not bind" in process.log_tail():
                    process.stop()
                    continue
                raise
            break
        assert process is not None
        yield server
    finally:
        if process is not None:
            process.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session", name="postgres")
def postgres_fixture() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (max_connections 20, 3 reserved)."""
    with run_postgres() as server:
        yield server


# ---------------------------------------------------------------------------------------------
# Prometheus and node-exporter


@dataclass(frozen=True)
class PrometheusStack:
    """A running Prometheus scraping a running node-exporter every second."""

    url: str
    """Prometheus base URL."""
    exporter_url: str
    """node-exporter base URL (its /metrics is what Prometheus scrapes)."""
    instance: str
    """The ``instance`` label of the node-exporter target."""
    job: str
    scrape_interval: float
    started: float
    """time.time() when the first scrape of node-exporter was seen."""

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result


def _binary(name: str) -> str | None:
    return shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)


def _http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


@contextlib.contextmanager
def run_prometheus(scrape_interval: float = 1.0) -> Iterator[PrometheusStack]:
    if _binary("prometheus") is None or _binary("prometheus-node-exporter") is None:
        ensure_debs("prometheus", "prometheus-node-exporter")
    prometheus_bin = _binary("prometheus")
    exporter_bin = _binary("prometheus-node-exporter")
    if prometheus_bin is None or exporter_bin is None:
        raise ServiceError("prometheus or prometheus-node-exporter still missing after install")
    base = Path(tempfile.mkdtemp(prefix="capacity-prom-"))
    processes: list[Process] = []
    try:
        exporter_port = free_port()
        exporter = start_process(
            "node-exporter",
            [
                exporter_bin,
                f"--web.listen-address=127.0.0.1:{exporter_port}",
                "--collector.disable-defaults",
                "--collector.cpu",
                "--collector.meminfo",
                "--collector.loadavg",
                "--collector.pressure",
            ],
            base / "node-exporter.log",
        )
        processes.append(exporter)
        exporter_url = f"http://127.0.0.1:{exporter_port}"
        wait_until("metrics served", lambda: _http_ok(f"{exporter_url}/metrics"), exporter)

        instance = f"127.0.0.1:{exporter_port}"
        job = "node"
        config = base / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {scrape_interval:g}s\n"
            f"  scrape_timeout: {scrape_interval:g}s\n"
            f"  evaluation_interval: {scrape_interval:g}s\n"
            "scrape_configs:\n"
            f"  - job_name: {job}\n"
            "    static_configs:\n"
            f"      - targets: ['{instance}']\n",
            encoding="utf-8",
        )
        prometheus_port = free_port()
        prometheus = start_process(
            "prometheus",
            [
                prometheus_bin,
                f"--config.file={config}",
                f"--storage.tsdb.path={base / 'data'}",
                "--storage.tsdb.retention.time=1h",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            base / "prometheus.log",
            cwd=base,
        )
        processes.append(prometheus)
        url = f"http://127.0.0.1:{prometheus_port}"
        wait_until("readiness", lambda: _http_ok(f"{url}/-/ready"), prometheus)
        stack = PrometheusStack(url, exporter_url, instance, job, scrape_interval, 0.0)

        def scraped() -> bool:
            # two successful scrapes: the first moment a rate() has a value
            try:
                up = stack.query(f'sum_over_time(up{{job="{job}"}}[1m])')
            except requests.RequestException:
                return False
            return bool(up) and float(up[0]["value"][1]) >= 2

        wait_until("two successful scrapes of node-exporter", scraped, prometheus)
        yield PrometheusStack(url, exporter_url, instance, job, scrape_interval, time.time())
    finally:
        for process in reversed(processes):
            process.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session", name="prometheus")
def prometheus_fixture() -> Iterator[PrometheusStack]:
    """Prometheus scraping node-exporter on this machine every second, for the whole session."""
    with run_prometheus() as stack:
        yield stack
