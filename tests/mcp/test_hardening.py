"""What a shared bridge must withstand: tokens that are no tokens, a service that
cannot vouch for a token, a service that does not answer, settings that would
silently widen what it offers, and agents that pile up waits."""

from __future__ import annotations

import os
import socket
import subprocess
import threading

import anyio
import httpx2
import pytest
from bridge_support import REQUEST_STATUS, create, failed, lifecycle, ok, wait_until_final
from conftest import BRIDGE_BIN, RestartableService, Service, http_client, stdio_client, stdio_parameters, unique_name
from mcp import Client
from test_errors import INITIALIZE, MCP_HEADERS

pytestmark = pytest.mark.anyio


async def test_http_oversized_or_garbled_tokens_get_no_session(service: Service, start_http_bridge) -> None:
    """A bearer token the service's HTTP/2 layer could not even take (16 KiB and
    more) used to pass as 'the service cannot be asked' and got a session; and one
    huge header closed the connection every agent shares. Now such tokens are
    refused at the door, and other agents' calls go on."""
    bridge = start_http_bridge(service.url)
    agent = service.tokens["requester"]
    async with http_client(bridge.url, agent) as client, httpx2.AsyncClient(timeout=30) as http:
        for token, reason in [
            ("x" * 4097, "longer than 4096 bytes"),
            ("y" * 16 * 1024, "longer than 4096 bytes"),
            ("z" * 200 * 1024, "longer than 4096 bytes"),
            ("two words", "visible ASCII"),
        ]:
            refused = await http.post(bridge.url, json=INITIALIZE, headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"})
            assert refused.status_code == 401, refused.text
            assert reason in refused.text, refused.text
            assert "mcp-session-id" not in refused.headers
            # The agent's session still works after each attempt.
            assert ok(await lifecycle(client, action="describe", environment="dev", database_name=unique_name()))[
                "exists"
            ] is False
        # A token of the largest accepted size reaches the service, which refuses it.
        longest = await http.post(bridge.url, json=INITIALIZE, headers={**MCP_HEADERS, "Authorization": "Bearer " + "t" * 4096})
        assert longest.status_code == 401 and "does not accept this token" in longest.text, longest.text
    assert "yyyy" not in bridge.process.tail(400)


async def test_http_opens_no_session_while_the_service_cannot_vouch_for_the_token(
    restartable_service: RestartableService, start_http_bridge
) -> None:
    bridge = start_http_bridge(restartable_service.url)
    token = restartable_service.dev.tokens["requester"]
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(timeout=60) as http:
        await anyio.to_thread.run_sync(restartable_service.stop)
        for junk in ("junk-a", token):
            refused = await http.post(bridge.url, json=INITIALIZE, headers={**headers, "Authorization": f"Bearer {junk}"})
            assert refused.status_code == 503, refused.text
            assert refused.headers.get("retry-after"), refused.headers
            assert "mcp-session-id" not in refused.headers
            assert "cannot be reached" in refused.text
        await anyio.to_thread.run_sync(restartable_service.start)
        opened = await http.post(bridge.url, json=INITIALIZE, headers=headers)
        assert opened.status_code == 200, opened.text
        assert opened.headers.get("mcp-session-id")
        still_junk = await http.post(bridge.url, json=INITIALIZE, headers={**headers, "Authorization": "Bearer junk-a"})
        assert still_junk.status_code == 401, still_junk.text


class SilentServer:
    """A TCP listener that accepts connections and never answers: a hung service."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.stopped = True
        self.sock.close()
        for conn in self.conns:
            conn.close()


async def test_a_service_that_does_not_answer_is_deadline_exceeded(service: Service) -> None:
    silent = SilentServer()
    try:
        async with stdio_client(
            f"http://127.0.0.1:{silent.port}",
            service.tokens["requester"],
            "--request-timeout",
            "2s",
            "--connect-timeout",
            "20s",
        ) as client:
            started = anyio.current_time()
            hung = failed(
                await lifecycle(client, action="create", environment="dev", database_name=unique_name()),
                "DEADLINE_EXCEEDED",
            )
            assert "did not answer within 2s" in hung["message"], hung
            assert "may or may not have been processed" in hung["message"], hung
            assert "nothing was changed" not in hung["message"], hung
            assert hung["retryable"] is True
            # A wait ends close to when it promised, not a request timeout later.
            waited = failed(
                await client.call_tool(REQUEST_STATUS, {"request_id": "01a23d13-6700-76fc-bf5f-79024d62c0ed", "wait_seconds": 3}),
                "DEADLINE_EXCEEDED",
            )
            assert waited["correlation_id"]
            assert anyio.current_time() - started < 15
    finally:
        silent.close()


def _run_bridge(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BRIDGE_BIN), *args],
        env={"PATH": os.environ.get("PATH", ""), "DB_LIFECYCLE_TOKEN": "some-token", **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("value", ["", " ", ",", " , "])
def test_an_environments_setting_naming_none_refuses_to_start(value: str) -> None:
    """Set but empty must not mean 'every environment': the bridge refuses to start."""
    result = _run_bridge({"DB_LIFECYCLE_MCP_ENVIRONMENTS": value})
    assert result.returncode != 0
    assert "names no environment" in result.stderr, result.stderr
    flag = _run_bridge({}, "--environments", value)
    assert flag.returncode != 0 and "names no environment" in flag.stderr, flag.stderr


@pytest.mark.parametrize("value", ["yes", "1", "on", "true"])
async def test_read_only_variable_takes_the_usual_spellings(value: str, service: Service) -> None:
    params = stdio_parameters(service.url, service.tokens["requester"])
    params.env["DB_LIFECYCLE_MCP_READ_ONLY"] = value
    async with Client(params) as client:
        tools = (await client.list_tools()).tools
        lifecycle_tool = next(t for t in tools if t.name == "database.lifecycle")
        assert lifecycle_tool.input_schema["properties"]["action"]["enum"] == ["describe"]
        refused = failed(
            await lifecycle(client, action="create", environment="dev", database_name=unique_name()),
            "PERMISSION_DENIED",
        )
        assert refused["origin"] == "bridge"


async def test_a_token_of_several_projects_names_the_project(service: Service) -> None:
    """The admin token covers every project: the call must say which one (project_id),
    and the service still decides what that token may do there."""
    name = unique_name()
    async with stdio_client(service.url, service.tokens["admin"]) as client:
        unnamed = failed(
            await lifecycle(client, action="describe", environment="dev", database_name=name), "INVALID_ARGUMENT"
        )
        assert "project_id" in unnamed["message"], unnamed
        named = ok(await lifecycle(client, action="describe", environment="dev", database_name=name, project_id="demo"))
        assert named["project_id"] == "demo" and named["exists"] is False
    async with stdio_client(service.url, service.tokens["requester"]) as client:
        # A project outside the token's scope is the service's refusal, not the bridge's.
        outside = failed(
            await lifecycle(client, action="describe", environment="dev", database_name=name, project_id="other"),
            "PERMISSION_DENIED",
        )
        assert outside["origin"] == "service"


async def test_waits_per_token_are_bounded_and_end_when_applied(service: Service, start_http_bridge) -> None:
    bridge = start_http_bridge(service.url)
    agent = service.tokens["requester"]
    async with http_client(bridge.url, agent) as client:
        queued = ok(await create(client, unique_name()))
        request_id = queued["request_id"]
        results: list[dict] = []

        async def wait_once() -> None:
            results.append(await wait_until_final(client, request_id, seconds=120))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(wait_once)
            await anyio.sleep(3)
            ninth = failed(
                await client.call_tool(REQUEST_STATUS, {"request_id": request_id, "wait_seconds": 30}),
                "RESOURCE_EXHAUSTED",
            )
            assert "8 waits" in ninth["message"], ninth
            # Reading the state without waiting is still possible.
            assert ok(await client.call_tool(REQUEST_STATUS, {"request_id": request_id}))["state"] == "requested"
            # Another agent's waits are not counted against this one.
            async with http_client(bridge.url, service.tokens["other_agent"]) as other:
                theirs = ok(await create(other, unique_name()))
                status = ok(await other.call_tool(REQUEST_STATUS, {"request_id": theirs["request_id"], "wait_seconds": 1}))
                assert status["wait_timed_out"] is True
            await anyio.to_thread.run_sync(service.approve, request_id)
        assert len(results) == 8 and all(r["state"] == "applied" for r in results), results
        # The slots are free again.
        again = ok(await client.call_tool(REQUEST_STATUS, {"request_id": request_id, "wait_seconds": 1}))
        assert again["state"] == "applied"
