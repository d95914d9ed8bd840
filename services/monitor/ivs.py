"""The monitor's view of IVS: Stage summaries with tags and sessions, and CONNECTED participants by page."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from services.common.errors import Unavailable
from services.common.ivs_calls import IvsCaller, error_code

# ivs-facts §2.0: maxResults is 1-100; the largest page costs the same one call.
PAGE_SIZE = 100
# A publisher check reads the participants that ever published in the session; more pages than this
# would mean thousands of publish attempts, and the full scan still counts them.
MAX_PUBLISHER_PAGES = 5


@dataclass(frozen=True)
class StageSummary:
    arn: str
    tags: Mapping[str, str]
    # Absent when no session is live (nobody has joined for a while).
    active_session_id: str | None


@dataclass(frozen=True)
class ParticipantsPage:
    """One ListParticipants(filterByState=CONNECTED) page, counted: who publishes and who only watches."""

    publishers: int
    subscribers: int
    next_token: str | None


def _unavailable(operation: str, error: Exception) -> Unavailable:
    code = error_code(error) if isinstance(error, ClientError) else "unreachable"
    return Unavailable(f"IVS {operation} failed: {code or 'error'}", code="ivs_error")


class MonitorIvsApi:
    """Small adapter over IvsCaller; every failure comes out as Unavailable."""

    def __init__(self, caller: IvsCaller) -> None:
        self._caller = caller

    async def list_stages(self) -> list[StageSummary]:
        """Every Stage in the account (all clusters): summaries carry tags and activeSessionId."""
        stages: list[StageSummary] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"maxResults": PAGE_SIZE}
            if token:
                params["nextToken"] = token
            response = await self._call("ListStages", params)
            for summary in response.get("stages", []):
                tags = summary.get("tags") or {}
                stages.append(
                    StageSummary(
                        arn=str(summary["arn"]),
                        tags={str(k): str(v) for k, v in tags.items()},
                        active_session_id=summary.get("activeSessionId") or None,
                    )
                )
            token = response.get("nextToken")
            if not token:
                return stages

    async def active_session(self, stage_arn: str) -> str | None:
        response = await self._call("GetStage", {"arn": stage_arn})
        return response.get("stage", {}).get("activeSessionId") or None

    async def connected_page(
        self, stage_arn: str, session_id: str, next_token: str | None
    ) -> ParticipantsPage:
        params: dict[str, Any] = {
            "stageArn": stage_arn,
            "sessionId": session_id,
            "filterByState": "CONNECTED",
            "maxResults": PAGE_SIZE,
        }
        if next_token:
            params["nextToken"] = next_token
        response = await self._call("ListParticipants", params)
        participants = response.get("participants", [])
        publishers = sum(1 for p in participants if p.get("published"))
        return ParticipantsPage(
            publishers=publishers,
            subscribers=len(participants) - publishers,
            next_token=response.get("nextToken") or None,
        )

    async def connected_publishers(self, stage_arn: str, session_id: str) -> int:
        """CONNECTED participants that published in the session, in a page or two however big the Stage.

        IVS takes one filter per request: filtering on `published` keeps the list short, and the state
        is read from each row.
        """
        count = 0
        token: str | None = None
        for _ in range(MAX_PUBLISHER_PAGES):
            params: dict[str, Any] = {
                "stageArn": stage_arn,
                "sessionId": session_id,
                "filterByPublished": True,
                "maxResults": PAGE_SIZE,
            }
            if token:
                params["nextToken"] = token
            response = await self._call("ListParticipants", params)
            count += sum(1 for p in response.get("participants", []) if p.get("state") == "CONNECTED")
            token = response.get("nextToken")
            if not token:
                break
        return count

    async def _call(self, operation: str, params: dict[str, Any]) -> Any:
        try:
            return await self._caller.call(operation, **params)
        except (ClientError, BotoCoreError) as error:
            raise _unavailable(operation, error) from error
