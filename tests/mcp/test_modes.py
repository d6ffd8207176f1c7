"""Server-side narrowing (read-only, environments), underscore tool names, and a
person confirming a delete through elicitation (or the call failing closed)."""

from __future__ import annotations

from typing import Any

import anyio
import mcp_types as types
import pytest
from bridge_support import REQUEST_STATUS, create, create_applied, describe, failed, lifecycle, ok, wait_until_final
from conftest import Service, http_client, stdio_client, unique_name
from mcp.shared.exceptions import MCPError

pytestmark = pytest.mark.anyio


async def test_read_only_offers_only_describe(connect_with_options, service: Service) -> None:
    name = unique_name()
    async with connect_with_options(["--read-only"]) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {"database.lifecycle", "database.request_status"}
        tool = tools["database.lifecycle"]
        assert tool.input_schema["properties"]["action"]["enum"] == ["describe"]
        a = tool.annotations
        assert (a.read_only_hint, a.destructive_hint) == (True, False)

        assert (await describe(client, name))["exists"] is False
        # Refused by the bridge even though the client sends them anyway.
        for action in ("create", "delete"):
            refused = failed(
                await lifecycle(client, action=action, environment="dev", database_name=name, confirm_delete=True),
                "PERMISSION_DENIED",
            )
            assert refused["origin"] == "bridge" and "read-only" in refused["message"]
    # Nothing reached the service: no request was queued for that name.
    async with stdio_client(service.url, service.tokens["requester"]) as client:
        assert ok(await create(client, name))["status"] == "approval_required"


async def test_environments_can_be_narrowed(connect_with_options) -> None:
    async with connect_with_options(["--environments", "dev, Staging"]) as client:
        tool = next(t for t in (await client.list_tools()).tools if t.name == "database.lifecycle")
        assert tool.input_schema["properties"]["environment"]["enum"] == ["dev", "staging"]
        assert (await describe(client, unique_name(), environment="STAGING"))["environment"] == "staging"
        # prod is allowed by the service, but this bridge does not offer it.
        refused = failed(await create(client, unique_name(), environment="prod"), "PERMISSION_DENIED")
        assert refused["origin"] == "bridge"
        assert "not offered by this bridge" in refused["message"] and "dev, staging" in refused["message"]


async def test_underscore_tool_names(connect_with_options, service: Service) -> None:
    async with connect_with_options(["--tool-names", "underscore"]) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert names == {"database_lifecycle", "database_request_status"}
        queued = ok(
            await lifecycle(
                client, tool="database_lifecycle", action="create", environment="dev", database_name=unique_name()
            )
        )
        assert "database_request_status" in queued["next_step"]
        await anyio.to_thread.run_sync(service.approve, queued["request_id"])
        status = await wait_until_final(client, queued["request_id"], tool="database_request_status")
        assert status["state"] == "applied"
        with pytest.raises(MCPError):
            await client.call_tool("database.lifecycle", {"action": "describe", "environment": "dev", "database_name": "x"})


async def test_both_tool_name_styles(connect_with_options) -> None:
    async with connect_with_options(["--tool-names", "both"]) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {
            "database.lifecycle",
            "database.request_status",
            "database_lifecycle",
            "database_request_status",
        }
        assert tools["database_lifecycle"].input_schema == tools["database.lifecycle"].input_schema
        assert not any("approv" in n for n in tools)
        name = unique_name()
        assert (await describe(client, name))["exists"] is False
        assert ok(await lifecycle(client, tool="database_lifecycle", action="describe", environment="dev", database_name=name))[
            "exists"
        ] is False


def person(typed: str | None = None, action: str = "accept", asked: list[str] | None = None):
    """An elicitation callback standing in for the person behind the client."""

    async def answer(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        if asked is not None:
            asked.append(params.message)
        assert params.requested_schema["required"] == ["database_name"]
        content = {"database_name": typed} if action == "accept" else None
        return types.ElicitResult(action=action, content=content)

    return answer


@pytest.fixture(params=["auto", "legacy"])
def protocol_mode(request: pytest.FixtureRequest) -> str:
    """auto: the SDK's default, 2026-07-28 (the bridge asks with InputRequiredResult);
    legacy: the initialize handshake (the bridge sends elicitation/create)."""
    return request.param


async def delete_unconfirmed(client, name: str):
    return await lifecycle(client, action="delete", environment="dev", database_name=name)


async def test_person_confirms_delete_by_typing_the_name(connect, service: Service, protocol_mode: str) -> None:
    name = unique_name()
    asked: list[str] = []
    async with connect(elicitation_callback=person(name, asked=asked), mode=protocol_mode) as client:
        await create_applied(client, service, name)
        queued = ok(await delete_unconfirmed(client, name))
        assert queued["status"] == "approval_required" and queued["action"] == "delete"
        assert len(asked) == 1 and name in asked[0]
        await anyio.to_thread.run_sync(service.approve, queued["request_id"])
        assert (await wait_until_final(client, queued["request_id"]))["state"] == "applied"
        assert (await describe(client, name))["exists"] is False


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (person("some_other_db"), "not `"),
        (person(action="decline"), "declined"),
        (person(action="cancel"), "cancelled"),
    ],
    ids=["mismatch", "decline", "cancel"],
)
async def test_delete_stops_unless_the_person_confirms(
    connect, service: Service, protocol_mode: str, answer, says: str
) -> None:
    name = unique_name()
    async with connect(elicitation_callback=answer, mode=protocol_mode) as client:
        await create_applied(client, service, name)
        stopped = failed(await delete_unconfirmed(client, name), "FAILED_PRECONDITION")
        assert says in stopped["message"] and "nothing was deleted" in stopped["message"]
        still = await describe(client, name)
        assert still["exists"] and still["owned_by_project"]
        # Nothing was queued: a confirmed delete is accepted, not "already open".
        confirmed = ok(
            await lifecycle(client, action="delete", environment="dev", database_name=name, confirm_delete=True)
        )
        assert confirmed["status"] == "approval_required"


async def test_the_typed_name_must_match_exactly(connect, service: Service, protocol_mode: str) -> None:
    name = unique_name()
    async with connect(elicitation_callback=person(f"{name} "), mode=protocol_mode) as client:
        await create_applied(client, service, name)
        stopped = failed(await delete_unconfirmed(client, name), "FAILED_PRECONDITION")
        assert "nothing was deleted" in stopped["message"]
        assert (await describe(client, name))["exists"]


async def test_no_person_is_asked_for_a_delete_the_service_would_refuse(connect, protocol_mode: str) -> None:
    asked: list[str] = []
    async with connect(elicitation_callback=person("x", asked=asked), mode=protocol_mode) as client:
        failed(await delete_unconfirmed(client, unique_name()), "NOT_FOUND")
    assert asked == []


async def test_client_without_elicitation_fails_closed(connect, service: Service, protocol_mode: str) -> None:
    name = unique_name()
    async with connect(mode=protocol_mode) as client:
        await create_applied(client, service, name)
        refused = failed(await delete_unconfirmed(client, name), "FAILED_PRECONDITION")
        assert "confirm_delete=true" in refused["message"]
        assert refused["origin"] == "service"
        assert (await describe(client, name))["exists"] is True


async def test_request_status_of_a_narrowed_away_environment_is_refused(
    service: Service, start_http_bridge
) -> None:
    token = service.tokens["requester"]
    async with stdio_client(service.url, token) as client:
        queued = ok(await create(client, unique_name(), environment="staging"))
    bridge = start_http_bridge(service.url, "--environments", "dev")
    async with http_client(bridge.url, token) as client:
        refused = failed(
            await client.call_tool(REQUEST_STATUS, {"request_id": queued["request_id"]}), "PERMISSION_DENIED"
        )
    assert "staging" in refused["message"]
