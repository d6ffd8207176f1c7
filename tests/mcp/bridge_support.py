"""Helpers for reading tool results and driving a request to `applied`."""

from __future__ import annotations

import json
from typing import Any

import anyio
from mcp import Client
from mcp_types import CallToolResult

LIFECYCLE = "database.lifecycle"
REQUEST_STATUS = "database.request_status"
LIFECYCLE_FIELDS = {
    "status",
    "request_id",
    "approval_state",
    "environment",
    "action",
    "database_name",
    "applied",
    "exists",
    "owned_by_project",
    "owner_project_id",
    "dry_run",
    "message",
    "correlation_id",
}


def ok(result: CallToolResult) -> dict[str, Any]:
    """A successful result: structured content, and the same JSON as text."""
    text = result.content[0].text if result.content else ""
    assert not result.is_error, f"expected success, got error: {text}"
    assert result.structured_content is not None, "no structured content"
    assert json.loads(text) == result.structured_content, "text and structured content differ"
    return result.structured_content


def failed(result: CallToolResult, code: str) -> dict[str, Any]:
    """An isError result with this gRPC code, an actionable message and a correlation id."""
    text = result.content[0].text if result.content else ""
    assert result.is_error, f"expected a {code} error, got success: {text}"
    body = json.loads(text)
    assert body["status"] == "error"
    assert body["code"] == code, body
    assert body["message"], body
    assert body["correlation_id"], body
    assert body["hint"], body
    return body


async def lifecycle(client: Client, tool: str = LIFECYCLE, **arguments: Any) -> CallToolResult:
    return await client.call_tool(tool, arguments)


async def create(client: Client, name: str, environment: str = "dev", **extra: Any) -> CallToolResult:
    return await lifecycle(client, action="create", environment=environment, database_name=name, **extra)


async def describe(client: Client, name: str, environment: str = "dev") -> dict[str, Any]:
    return ok(await lifecycle(client, action="describe", environment=environment, database_name=name))


async def wait_until_final(client: Client, request_id: str, seconds: int = 30, tool: str = REQUEST_STATUS) -> dict[str, Any]:
    status = ok(await client.call_tool(tool, {"request_id": request_id, "wait_seconds": seconds}))
    assert status["request_id"] == request_id
    return status


async def create_applied(client: Client, service, name: str, approver: str = "approver") -> dict[str, Any]:
    """create -> approval_required -> approved by a person over gRPC -> applied."""
    queued = ok(await create(client, name))
    assert queued["status"] == "approval_required", queued
    assert queued["approval_state"] == "requested"
    await anyio.to_thread.run_sync(service.approve, queued["request_id"], approver)
    status = await wait_until_final(client, queued["request_id"])
    assert status["state"] == "applied", status
    return queued
