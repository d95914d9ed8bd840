"""The overflow tier's low-latency channels, through the `ivs` service (not ivs-realtime): create, find
by name and tags, describe, delete. Errors come out as domain errors, as in ivs.py."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from botocore.exceptions import ClientError

from services.common.errors import NotFound, Unavailable
from services.common.ivs_calls import IvsCaller, error_code
from services.stagemanager.ivs import REFUSALS, OverflowRefused, call, has_tags, items, refusal

log = logging.getLogger(__name__)


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
        if code in REFUSALS:
            return OverflowRefused(refusal(operation, error))
        if code == "ResourceNotFoundException":
            return NotFound(f"{operation}: the channel does not exist", code="channel_not_found")
        if code == "ConflictException":
            return ChannelLive(f"{operation}: the channel is live", retry_after=2)
        return Unavailable(f"IVS {operation} failed: {code or 'error'}", code="ivs_error", retry_after=5)
    return Unavailable(f"IVS {operation} failed: cannot reach IVS", code="ivs_unreachable", retry_after=5)


class ChannelApi:
    """Small adapter over the boto3 `ivs` client."""

    def __init__(self, caller: IvsCaller, playback_url_template: str | None = None) -> None:
        self._caller = caller
        # Locally the emulator, not the channel, serves the composition: "…/{channel_id}/index.m3u8".
        self._playback = playback_url_template

    async def create_channel(self, name: str, tags: Mapping[str, str]) -> IvsChannel:
        """A LOW latency STANDARD channel, open to every viewer (no playback authorization)."""
        response = await call(
            self._caller,
            _translate,
            "CreateChannel",
            name=name,
            latencyMode="LOW",
            type="STANDARD",
            authorized=False,
            tags=dict(tags),
        )
        return self._channel(response["channel"])

    async def get_channel(self, arn: str) -> IvsChannel:
        return self._channel((await call(self._caller, _translate, "GetChannel", arn=arn))["channel"])

    async def delete_channel(self, arn: str) -> None:
        """Deletes the channel; one that is already gone counts as deleted."""
        await call(self._caller, _translate, "DeleteChannel", done_if=("ResourceNotFoundException",), arn=arn)

    async def list_channels(self, tags: Mapping[str, str], name: str | None = None) -> list[IvsChannel]:
        """Every channel carrying all of `tags` (ListChannels summaries carry tags), by name if given."""
        by_name = {"filterByName": name} if name is not None else {}
        channels = items(self._caller, _translate, "ListChannels", "channels", maxResults=100, **by_name)
        return [
            self._channel(summary) async for summary in channels if has_tags(summary.get("tags") or {}, tags)
        ]

    def _channel(self, data: Mapping[str, object]) -> IvsChannel:
        tags = data.get("tags") or {}
        assert isinstance(tags, Mapping)
        arn = str(data["arn"])
        # ChannelSummary has no playbackUrl: GetChannel gives it.
        playback_url = str(data.get("playbackUrl") or "")
        if self._playback and playback_url:
            playback_url = self._playback.format(channel_id=arn.rsplit("/", 1)[-1])
        return IvsChannel(
            arn=arn,
            name=str(data.get("name") or ""),
            playback_url=playback_url,
            tags={str(k): str(v) for k, v in tags.items()},
        )
