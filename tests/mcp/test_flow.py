"""The agent's path through the bridge, over stdio and over streamable HTTP:
list tools, create, a person approves over gRPC, follow, describe, delete."""

from __future__ import annotations

import anyio
import pytest
from bridge_support import (
    LIFECYCLE,
    LIFECYCLE_FIELDS,
    REQUEST_STATUS,
    create,
    create_applied,
    describe,
    failed,
    lifecycle,
    ok,
    wait_until_final,
)
from conftest import Service, unique_name

pytestmark = pytest.mark.anyio


async def test_tools_are_listed_with_schemas_and_honest_annotations(connect) -> None:
    async with connect() as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {LIFECYCLE, REQUEST_STATUS}
    assert not any("approv" in name for name in tools), "the bridge must never offer approval"

    lifecycle_tool = tools[LIFECYCLE]
    props = lifecycle_tool.input_schema["properties"]
    assert set(props) == {"action", "environment", "database_name", "confirm_delete", "dry_run", "project_id"}
    assert props["action"]["enum"] == ["create", "delete", "describe"]
    for name, prop in props.items():
        assert prop.get("description"), f"argument {name} is not documented"
    assert set(lifecycle_tool.input_schema["required"]) == {"action", "environment", "database_name"}
    assert LIFECYCLE_FIELDS <= set(lifecycle_tool.output_schema["properties"])
    assert LIFECYCLE_FIELDS <= set(lifecycle_tool.output_schema["required"])
    a = lifecycle_tool.annotations
    assert (a.read_only_hint, a.destructive_hint, a.idempotent_hint, a.open_world_hint) == (False, True, True, False)

    status_tool = tools[REQUEST_STATUS]
    assert status_tool.input_schema["properties"]["wait_seconds"]["maximum"] == 300
    assert status_tool.input_schema["required"] == ["request_id"]
    assert "state" in status_tool.output_schema["properties"]
    a = status_tool.annotations
    assert (a.read_only_hint, a.destructive_hint, a.idempotent_hint, a.open_world_hint) == (True, False, True, False)


async def test_create_approve_follow_describe_delete(connect, service: Service) -> None:
    name = unique_name()
    async with connect() as client:
        queued = ok(await create(client, name))
        assert queued["status"] == "approval_required"
        assert queued["approval_state"] == "requested"
        assert queued["action"] == "create"
        assert queued["environment"] == "dev" and queued["database_name"] == name
        assert queued["request_id"] and queued["correlation_id"]
        assert queued["applied"] is False
        assert "request_status" in queued["next_step"]

        pending = ok(await client.call_tool(REQUEST_STATUS, {"request_id": queued["request_id"]}))
        assert pending["state"] == "requested" and pending["is_final"] is False

        # A person (alice, an owner of project demo) approves over gRPC.
        await anyio.to_thread.run_sync(service.approve, queued["request_id"])
        applied = await wait_until_final(client, queued["request_id"])
        assert applied["state"] == "applied" and applied["is_final"] is True
        assert applied["decided_by"] == "alice"
        assert applied["requested_by"] == "demo-agent"

        described = await describe(client, name)
        assert described["status"] == "described"
        assert described["exists"] is True
        assert described["owned_by_project"] is True
        assert described["owner_project_id"] == "demo"
        assert described["request_id"] is None and described["approval_state"] is None

        deleting = ok(
            await lifecycle(client, action="delete", environment="dev", database_name=name, confirm_delete=True)
        )
        assert deleting["status"] == "approval_required" and deleting["action"] == "delete"
        await anyio.to_thread.run_sync(service.approve, deleting["request_id"])
        gone = await wait_until_final(client, deleting["request_id"])
        assert gone["state"] == "applied"

        after = await describe(client, name)
        assert after["exists"] is False and after["owned_by_project"] is False


async def test_dry_run_changes_nothing(connect) -> None:
    name = unique_name()
    async with connect() as client:
        dry = ok(await create(client, name, dry_run=True))
        assert dry["dry_run"] is True and dry["request_id"] is None
        assert (await describe(client, name))["exists"] is False
        # No open request was left behind: a real create is accepted.
        assert ok(await create(client, name))["status"] == "approval_required"


async def test_waiting_for_approval_sends_progress_and_ends_applied(connect, service: Service) -> None:
    name = unique_name()
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async with connect() as client:
        queued = ok(await create(client, name))

        async def approve_later() -> None:
            await anyio.sleep(2.5)
            await anyio.to_thread.run_sync(service.approve, queued["request_id"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(approve_later)
            result = await client.call_tool(
                REQUEST_STATUS,
                {"request_id": queued["request_id"], "wait_seconds": 60},
                progress_callback=on_progress,
            )
        status = ok(result)
    assert status["state"] == "applied"
    assert status["wait_timed_out"] is False
    assert 1 <= status["waited_seconds"] < 60
    assert progress, "no progress notification while waiting"
    assert all(total == 60 for _, total, _ in progress)
    assert any("waiting for approval" in (message or "") for _, _, message in progress)


async def test_waiting_times_out_while_still_requested(connect) -> None:
    async with connect() as client:
        queued = ok(await create(client, unique_name()))
        status = ok(await client.call_tool(REQUEST_STATUS, {"request_id": queued["request_id"], "wait_seconds": 2}))
    assert status["state"] == "requested"
    assert status["wait_timed_out"] is True
    assert status["waited_seconds"] >= 2
    assert "call again" in status["message"]


async def test_two_agents_on_one_http_bridge_see_only_their_own(http_bridge, service: Service) -> None:
    """demo-agent (project demo) and other-agent (project other) use the same HTTP
    bridge at the same time, each with its own bearer token."""
    from conftest import http_client

    names = {"requester": unique_name("demo"), "other_agent": unique_name("other")}
    approvers = {"requester": "approver", "other_agent": "other_project"}
    queued: dict[str, dict] = {}

    async def agent(principal: str) -> None:
        async with http_client(http_bridge.url, service.tokens[principal]) as client:
            queued[principal] = await create_applied(client, service, names[principal], approvers[principal])
            mine = await describe(client, names[principal])
            assert mine["exists"] and mine["owned_by_project"]

    async with anyio.create_task_group() as tg:
        for principal in names:
            tg.start_soon(agent, principal)

    assert queued["requester"]["project_id"] == "demo"
    assert queued["other_agent"]["project_id"] == "other"

    async def cross_checks(principal: str, other: str) -> None:
        async with http_client(http_bridge.url, service.tokens[principal]) as client:
            # The service does not even describe another project's database.
            failed(
                await lifecycle(client, action="describe", environment="dev", database_name=names[other]),
                "PERMISSION_DENIED",
            )
            refused = failed(
                await lifecycle(
                    client, action="delete", environment="dev", database_name=names[other], confirm_delete=True
                ),
                "PERMISSION_DENIED",
            )
            assert refused["origin"] == "service"
            failed(
                await client.call_tool(REQUEST_STATUS, {"request_id": queued[other]["request_id"]}),
                "PERMISSION_DENIED",
            )
            failed(await create(client, names[other]), "PERMISSION_DENIED")

    async with anyio.create_task_group() as tg:
        tg.start_soon(cross_checks, "requester", "other_agent")
        tg.start_soon(cross_checks, "other_agent", "requester")
