"""Every error class of design §5 reaches the agent as an isError tool result with
the gRPC code, a message and a correlation id; an outage is "unavailable" and the
bridge recovers; the HTTP endpoint refuses what it must."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import uuid

import anyio
import httpx2
import pytest
from bridge_support import REQUEST_STATUS, create, create_applied, failed, lifecycle, ok
from conftest import RestartableService, Service, http_client, stdio_client, unique_name

pytestmark = pytest.mark.anyio

MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}


def psql_binary() -> str:
    found = shutil.which("psql") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))), None)
    if not found:
        pytest.fail("psql not found (Debian: apt-get install -y postgresql-client)")
    return found


def make_unmanaged_database(service: Service, name: str) -> None:
    """A database the service did not create (made directly with psql)."""
    subprocess.run(
        [psql_binary(), service.admin_url, "-v", "ON_ERROR_STOP=1", "-qc", f'CREATE DATABASE "{name}"'],
        check=True,
        capture_output=True,
        timeout=60,
    )


async def test_service_refusals_arrive_as_tool_errors(connect, service: Service) -> None:
    unmanaged = unique_name("unmanaged")
    await anyio.to_thread.run_sync(make_unmanaged_database, service, unmanaged)
    busy = unique_name()
    async with connect() as client:
        invalid = failed(await create(client, "Not A Valid Name!"), "INVALID_ARGUMENT")
        assert invalid["origin"] == "service" and "database_name" in invalid["message"]

        not_allowed = failed(await create(client, unique_name(), environment="nowhere"), "PERMISSION_DENIED")
        assert "allowed environments" in not_allowed["message"]
        failed(await create(client, "postgres"), "PERMISSION_DENIED")

        # A delete is open for `busy`; a create of it conflicts with that request.
        await create_applied(client, service, busy)
        deleting = ok(
            await lifecycle(client, action="delete", environment="dev", database_name=busy, confirm_delete=True)
        )
        open_request = failed(await create(client, busy), "FAILED_PRECONDITION")
        assert deleting["request_id"] in open_request["message"]

        exists = failed(await create(client, unmanaged), "ALREADY_EXISTS")
        assert "not managed" in exists["message"]
        failed(
            await lifecycle(client, action="delete", environment="dev", database_name=unmanaged, confirm_delete=True),
            "NOT_FOUND",
        )
        unknown = failed(await client.call_tool(REQUEST_STATUS, {"request_id": str(uuid.uuid4())}), "NOT_FOUND")
        assert unknown["retryable"] is False
        failed(await client.call_tool(REQUEST_STATUS, {"request_id": "not-a-uuid"}), "INVALID_ARGUMENT")

    # The correlation id is the service's: the refusal is in the audit trail under it.
    events = await anyio.to_thread.run_sync(
        lambda: service.grpc("ListFlowEvents", {"correlation_id": not_allowed["correlation_id"]}, service.tokens["admin"])
    )
    assert any(e.get("statusCode") == "PERMISSION_DENIED" for e in events.get("events", [])), events


async def test_bad_token_is_unauthenticated(transport: str, service: Service, http_bridge) -> None:
    if transport == "http":
        # Over HTTP no session is opened for a token the service refuses (401).
        async with httpx2.AsyncClient() as http:
            refused = await http.post(
                http_bridge.url, json=INITIALIZE, headers={**MCP_HEADERS, "Authorization": "Bearer not-a-valid-token"}
            )
        assert refused.status_code == 401, refused.text
        assert "does not accept this token" in refused.text and "correlation id" in refused.text, refused.text
        assert "mcp-session-id" not in refused.headers
        assert "not-a-valid-token" not in refused.text
        return
    async with stdio_client(service.url, "not-a-valid-token") as client:
        refused = failed(
            await lifecycle(client, action="describe", environment="dev", database_name="orders"), "UNAUTHENTICATED"
        )
    assert refused["origin"] == "service"


async def _open_session(http: httpx2.AsyncClient, url: str, token: str) -> httpx2.Response:
    return await http.post(url, json=INITIALIZE, headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"})


async def _list_tools(http: httpx2.AsyncClient, url: str, token: str, session: str) -> int:
    listed = await http.post(
        url,
        json={"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}},
        headers={**MCP_HEADERS, "Authorization": f"Bearer {token}", "mcp-session-id": session},
    )
    return listed.status_code


async def test_http_sessions_cannot_be_flooded_away(service: Service, start_http_bridge) -> None:
    """Callers without a valid token get no session, so they cannot push an agent's
    session out; one token holds a bounded number of sessions and only displaces
    its own oldest."""
    bridge = start_http_bridge(service.url)
    agent, other = service.tokens["requester"], service.tokens["other_agent"]
    async with httpx2.AsyncClient(timeout=30) as http:
        theirs = (await _open_session(http, bridge.url, other)).headers["mcp-session-id"]
        for i in range(200):
            junk = await _open_session(http, bridge.url, f"junk-{i}")
            assert junk.status_code == 401 and "mcp-session-id" not in junk.headers, junk.text
        assert await _list_tools(http, bridge.url, other, theirs) == 200

        mine = [(await _open_session(http, bridge.url, agent)).headers["mcp-session-id"] for _ in range(17)]
        # The 17th closed the token's oldest session; the rest, and the other
        # agent's, still work.
        assert await _list_tools(http, bridge.url, agent, mine[0]) == 404
        for session in mine[1:]:
            assert await _list_tools(http, bridge.url, agent, session) == 200
        assert await _list_tools(http, bridge.url, other, theirs) == 200


async def test_bridge_checks_argument_shapes(connect) -> None:
    async with connect() as client:
        bad_action = failed(
            await lifecycle(client, action="drop", environment="dev", database_name="x"), "INVALID_ARGUMENT"
        )
        assert bad_action["origin"] == "bridge" and "create, delete or describe" in bad_action["message"]
        failed(await client.call_tool("database.lifecycle", {"action": "create", "environment": "dev"}), "INVALID_ARGUMENT")
        too_long = failed(
            await client.call_tool(REQUEST_STATUS, {"request_id": str(uuid.uuid4()), "wait_seconds": 301}),
            "INVALID_ARGUMENT",
        )
        assert "300" in too_long["message"]


async def test_stopped_service_is_unavailable_and_the_bridge_recovers(
    transport: str, restartable_service: RestartableService, start_http_bridge
) -> None:
    token = restartable_service.dev.tokens["requester"]
    if transport == "stdio":
        opened = stdio_client(restartable_service.url, token)
    else:
        opened = http_client(start_http_bridge(restartable_service.url).url, token)
    async with opened as client:
        name = unique_name()
        assert ok(await lifecycle(client, action="describe", environment="dev", database_name=name))["exists"] is False

        await anyio.to_thread.run_sync(restartable_service.stop)
        down = failed(await lifecycle(client, action="describe", environment="dev", database_name=name), "UNAVAILABLE")
        assert "service unavailable" in down["message"]
        assert down["retryable"] is True and down["origin"] == "bridge"
        # Waiting on a request while the service is down ends with the same answer.
        waiting = failed(
            await client.call_tool(REQUEST_STATUS, {"request_id": str(uuid.uuid4()), "wait_seconds": 2}), "UNAVAILABLE"
        )
        assert "service unavailable" in waiting["message"]

        await anyio.to_thread.run_sync(restartable_service.start)
        # The same bridge process and MCP session: the channel reconnects by itself.
        recovered = None
        with anyio.fail_after(30):
            while recovered is None:
                result = await lifecycle(client, action="describe", environment="dev", database_name=name)
                if not result.is_error:
                    recovered = ok(result)
                else:
                    await anyio.sleep(0.5)
        assert recovered["status"] == "described"


async def test_http_requires_a_bearer_token(http_bridge, service: Service) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with httpx2.AsyncClient() as http:
        missing = await http.post(http_bridge.url, json=body, headers=headers)
        wrong_scheme = await http.post(
            http_bridge.url, json=body, headers={**headers, "Authorization": "Basic dXNlcjpwYXNz"}
        )
        # Two Authorization headers (a valid token among them): neither is used.
        token = service.tokens["requester"]
        doubled = await http.post(
            http_bridge.url,
            json=body,
            headers=httpx2.Headers([*headers.items(), ("Authorization", f"Bearer {token}"), ("Authorization", "Bearer x")]),
        )
        health = await http.get(http_bridge.url.replace("/mcp", "/healthz"))
    assert doubled.status_code == 401 and "more than one" in doubled.text
    assert token not in doubled.text
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert wrong_scheme.status_code == 401
    assert health.status_code == 200


async def test_http_bounds_the_request_body(service: Service, start_http_bridge) -> None:
    bridge = start_http_bridge(service.url, "--max-body-bytes", "4096")
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {service.tokens['requester']}",
    }
    big = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "database.lifecycle", "arguments": {"database_name": "x" * 10_000}},
    }
    async with httpx2.AsyncClient() as http:
        response = await http.post(bridge.url, content=json.dumps(big), headers=headers)
    assert response.status_code == 413


async def test_http_allowed_hosts_are_configurable(service: Service, start_http_bridge) -> None:
    token = service.tokens["requester"]
    default_bridge = start_http_bridge(service.url)
    pod_bridge = start_http_bridge(service.url, "--allowed-hosts", "db-lifecycle-mcp.team.svc,localhost")
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {token}",
        "Host": "db-lifecycle-mcp.team.svc",
    }
    async with httpx2.AsyncClient() as http:
        refused = await http.post(default_bridge.url, json=body, headers=headers)
        accepted = await http.post(pod_bridge.url, json=body, headers=headers)
    # Loopback only by default (DNS rebinding protection); the pod's name when configured.
    assert refused.status_code == 403, refused.text
    assert accepted.status_code != 403, accepted.text
    # And a real client reaches the pod bridge under that name.
    async with http_client(pod_bridge.url.replace("127.0.0.1", "localhost"), token) as client:
        names = {t.name for t in (await client.list_tools()).tools}
    assert "database.lifecycle" in names



async def test_tokens_never_reach_the_logs(service: Service, start_http_bridge) -> None:
    token = service.tokens["requester"]
    bridge = start_http_bridge(service.url, env={"DB_LIFECYCLE_LOG": "debug"})
    async with http_client(bridge.url, token) as client:
        ok(await lifecycle(client, action="describe", environment="dev", database_name=unique_name()))
        failed(await create(client, "Bad Name"), "INVALID_ARGUMENT")
    async with httpx2.AsyncClient() as http:
        refused = await _open_session(http, bridge.url, "an-invalid-token-value")
        assert refused.status_code == 401, refused.text
    logs = bridge.process.stderr_path.read_text() + bridge.process.stdout_path.read_text()
    assert "forwarding database.lifecycle" in logs, "the debug log was not written"
    assert token not in logs and "an-invalid-token-value" not in logs


def test_stdio_refuses_to_start_without_a_token(service: Service) -> None:
    from conftest import BRIDGE_BIN

    env = {k: v for k, v in os.environ.items() if k != "DB_LIFECYCLE_TOKEN"}
    result = subprocess.run(
        [str(BRIDGE_BIN), "--service-url", service.url],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "DB_LIFECYCLE_TOKEN" in result.stderr
    assert result.stdout == "", "stdout is the MCP channel: nothing else may be written there"


async def test_http_sessions_belong_to_the_token_that_opened_them(http_bridge, service: Service) -> None:
    headers = MCP_HEADERS
    initialize = INITIALIZE
    mine = {**headers, "Authorization": f"Bearer {service.tokens['requester']}"}
    theirs = {**headers, "Authorization": f"Bearer {service.tokens['other_agent']}"}
    tools = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    async with httpx2.AsyncClient() as http:
        opened = await http.post(http_bridge.url, json=initialize, headers=mine)
        assert opened.status_code == 200, opened.text
        session = opened.headers["mcp-session-id"]
        initialized = await http.post(
            http_bridge.url,
            json={"jsonrpc": "2.0", "method": "notifications/initialized"},
            headers={**mine, "mcp-session-id": session},
        )
        assert initialized.status_code == 202, initialized.text
        # Another agent's token, or any bearer string, cannot use or end the session.
        used = await http.post(http_bridge.url, json=tools, headers={**theirs, "mcp-session-id": session})
        ended = await http.delete(
            http_bridge.url, headers={**headers, "Authorization": "Bearer garbage", "mcp-session-id": session}
        )
        assert (used.status_code, ended.status_code) == (404, 404), (used.text, ended.text)
        listed = await http.post(http_bridge.url, json=tools, headers={**mine, "mcp-session-id": session})
        assert listed.status_code == 200 and "database.lifecycle" in listed.text, listed.text
        # Its owner can end it; then it is gone.
        closed = await http.delete(http_bridge.url, headers={**mine, "mcp-session-id": session})
        assert closed.status_code in (200, 202, 204), closed.text
        after = await http.post(http_bridge.url, json=tools, headers={**mine, "mcp-session-id": session})
        assert after.status_code == 404
