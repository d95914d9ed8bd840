"""The overflow tier's low-latency channels, through the `ivs` service (not ivs-realtime): create, find
by name and tags, describe, delete. Errors come out as domain errors, as in ivs.py."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError

from services.common.errors import NotFound, Unavailable
from services.common.ivs_calls import IvsCaller, error_code
from services.stagemanager.ivs import OverflowRefused

log = logging.getLogger(__name__)

_REFUSALS = frozenset(
    {
        "ServiceQuotaExceededException",
        "ValidationException",
        "AccessDeniedException",
        "PendingVerification",
    }
)


class ChannelLive(Unavailable):
    """DeleteChannel refused: the channel still broadcasts (its composition has not stopped yet)."""

    default_code = "channel_live"


@dataclass(frozen=True)
class IvsChannel:
    arn: str
    name: str
    playback_url: str
    tags: Mapping[str, str]


def _translate(operation: str, error: Exception) -> Exception:
    if isinstance(error, ClientError):
        code = error_code(error)
        if code in _REFUSALS:
            message = error.response.get("Error", {}).get("Message") or code
            return OverflowRefused(f"{operation} refused: {code}: {message}")
        if code == "ResourceNotFoundException":
            return NotFound(f"{operation}: the channel does not exist", code="channel_not_found")
        if code == "ConflictException":
            return ChannelLive(f"{operation}: the channel is live", retry_after=2)
        return Unavailable(f"IVS {operation} failed: {code or 'error'}", code="ivs_error", retry_after=5)
    return Unavailable(f"IVS {operation} failed: cannot reach IVS", code="ivs_unreachable", retry_after=5)


class ChannelApi:
    """Small adapter over the boto3 `ivs` client."""

    def __init__(self, caller: IvsCaller) -> None:
        self._caller = caller

    async def create_channel(self, name: str, tags: Mapping[str, str]) -> IvsChannel:
        """A LOW latency STANDARD channel, open to every viewer (no playback authorization)."""
        try:
            response = await self._caller.call(
                "CreateChannel",
                name=name,
                latencyMode="LOW",
                type="STANDARD",
                authorized=False,
                tags=dict(tags),
            )
        except (ClientError, BotoCoreError) as error:
            raise _translate("CreateChannel", error) from error
        return _channel(response["channel"])

    async def get_channel(self, arn: str) -> IvsChannel:
        try:
            response = await self._caller.call("GetChannel", arn=arn)
        except (ClientError, BotoCoreError) as error:
            raise _translate("GetChannel", error) from error
        return _channel(response["channel"])

    async def delete_channel(self, arn: str) -> None:
        """Deletes the channel; one that is already gone counts as deleted."""
        try:
            await self._caller.call("DeleteChannel", arn=arn)
        except ClientError as error:
            if error_code(error) != "ResourceNotFoundException":
                raise _translate("DeleteChannel", error) from error
        except BotoCoreError as error:
            raise _translate("DeleteChannel", error) from error

    async def list_channels(self, tags: Mapping[str, str], name: str | None = None) -> list[IvsChannel]:
        """Every channel carrying all of `tags` (ListChannels summaries carry tags), by name if given."""
        found: list[IvsChannel] = []
        token: str | None = None
        while True:
            params: dict[str, object] = {"maxResults": 100}
            if name is not None:
                params["filterByName"] = name
            if token:
                params["nextToken"] = token
            try:
                response = await self._caller.call("ListChannels", **params)
            except (ClientError, BotoCoreError) as error:
                raise _translate("ListChannels", error) from error
            for summary in response.get("channels", []):
                channel_tags = summary.get("tags") or {}
                if all(channel_tags.get(k) == v for k, v in tags.items()):
                    found.append(_channel(summary))
            token = response.get("nextToken")
            if not token:
                return found


def _channel(data: Mapping[str, object]) -> IvsChannel:
    tags = data.get("tags") or {}
    assert isinstance(tags, Mapping)
    return IvsChannel(
        arn=str(data["arn"]),
        name=str(data.get("name") or ""),
        # ChannelSummary has no playbackUrl: GetChannel gives it.
        playback_url=str(data.get("playbackUrl") or ""),
        tags={str(k): str(v) for k, v in tags.items()},
    )
