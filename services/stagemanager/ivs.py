"""The stage manager's view of IVS: create, find, describe and delete the cluster's Stages."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from services.common.errors import FanoutError, NoCapacity, NotFound, Unavailable
from services.common.ivs_calls import IvsCaller, error_code
from services.common.stage_tags import TAG_CLUSTER, TAG_DRAINING, TAG_ENDING

log = logging.getLogger(__name__)

_GONE = ("ResourceNotFoundException",)


class StageQuotaExceeded(NoCapacity):
    default_code = "stage_quota_exceeded"


class ReplicationRefused(FanoutError):
    """IVS would not start a replication (the participant's 5 replications, a full Stage, no such
    participant publishing): worth trying again later, not at once."""

    default_code = "replication_refused"


@dataclass(frozen=True)
class IvsStage:
    arn: str
    tags: Mapping[str, str]
    events_url: str = ""
    whip_url: str = ""


def _translate(operation: str, error: Exception) -> Exception:
    if isinstance(error, ClientError):
        code = error_code(error)
        if code == "ServiceQuotaExceededException":
            return StageQuotaExceeded("the account's IVS Stage quota is reached", retry_after=30)
        if code == "ResourceNotFoundException":
            return NotFound(f"{operation}: the Stage does not exist", code="stage_not_found")
        return Unavailable(f"IVS {operation} failed: {code or 'error'}", code="ivs_error", retry_after=5)
    return Unavailable(f"IVS {operation} failed: cannot reach IVS", code="ivs_unreachable", retry_after=5)


Translate = Callable[[str, Exception], Exception]

# Answers that retrying will not change; anything else (throttles past our retries, 5xx, no answer) may.
REFUSALS = frozenset(
    {
        "ServiceQuotaExceededException",
        "ValidationException",
        "AccessDeniedException",
        "PendingVerification",
    }
)


def refusal(operation: str, error: ClientError) -> str:
    code = error_code(error)
    return f"{operation} refused: {code}: {error.response.get('Error', {}).get('Message') or code}"


async def call(
    caller: IvsCaller, translate: Translate, operation: str, *, done_if: Iterable[str] = (), **params: Any
) -> Any:
    """One call; its error comes out as a domain error through `translate`, except the error codes in
    `done_if`, which mean the call's purpose is already met (the answer is then None)."""
    try:
        return await caller.call(operation, **params)
    except ClientError as error:
        if error_code(error) in done_if:
            return None
        raise translate(operation, error) from error
    except BotoCoreError as error:
        raise translate(operation, error) from error


async def items(
    caller: IvsCaller, translate: Translate, operation: str, key: str, **params: Any
) -> AsyncIterator[Mapping[str, Any]]:
    """Every item under `key` of a paginated List* operation, page after page."""
    token: str | None = None
    while True:
        page = await call(caller, translate, operation, **params, **({"nextToken": token} if token else {}))
        for item in page.get(key, []):
            yield item
        token = page.get("nextToken")
        if not token:
            return


def has_tags(tags: object, wanted: Mapping[str, str]) -> bool:
    return isinstance(tags, Mapping) and all(tags.get(k) == v for k, v in wanted.items())


class StageApi:
    """Small adapter over the boto3 client; errors come out as domain errors."""

    def __init__(self, caller: IvsCaller) -> None:
        self._caller = caller

    async def create_stage(self, name: str, tags: Mapping[str, str]) -> IvsStage:
        response = await call(self._caller, _translate, "CreateStage", name=name, tags=dict(tags))
        return _stage(response["stage"])

    async def get_stage(self, arn: str) -> IvsStage:
        return _stage((await call(self._caller, _translate, "GetStage", arn=arn))["stage"])

    async def delete_stage(self, arn: str) -> None:
        """Deletes the Stage; one that is already gone counts as deleted."""
        await call(self._caller, _translate, "DeleteStage", done_if=_GONE, arn=arn)

    async def tag_draining(self, arn: str) -> None:
        await self._tag_call("TagResource", resourceArn=arn, tags={TAG_DRAINING: "true"})

    async def untag_draining(self, arn: str) -> None:
        await self._tag_call("UntagResource", resourceArn=arn, tagKeys=[TAG_DRAINING])

    async def tag_ending(self, arn: str) -> None:
        """Records in IVS that the Stage's room is ending; unlike the drain tag, failing it fails the end."""
        await call(self._caller, _translate, "TagResource", resourceArn=arn, tags={TAG_ENDING: "true"})

    async def _tag_call(self, operation: str, **params: Any) -> None:
        # The tag only helps recovery after a restart; failing it must not fail the drain.
        try:
            await call(self._caller, _translate, operation, **params)
        except FanoutError as error:
            log.warning("%s on %s failed: %s", operation, params.get("resourceArn"), error.message)

    async def list_cluster_stages(self, cluster_id: str) -> list[IvsStage]:
        """Every Stage tagged with this cluster id (ListStages summaries carry tags)."""
        return [
            IvsStage(arn=summary["arn"], tags=summary.get("tags") or {})
            async for summary in items(self._caller, _translate, "ListStages", "stages", maxResults=100)
            if (summary.get("tags") or {}).get(TAG_CLUSTER) == cluster_id
        ]


class ReplicationApi:
    """Server-side replication of the broadcaster from an origin into its replicas (DESIGN.md §5)."""

    def __init__(self, caller: IvsCaller) -> None:
        self._caller = caller

    async def publishing_participant(self, stage_arn: str) -> str | None:
        """The participant publishing on the Stage itself (not a replica of another), newest first."""
        stage = (await call(self._caller, _translate, "GetStage", arn=stage_arn))["stage"]
        session = stage.get("activeSessionId")
        if not session:
            return None
        response = await call(
            self._caller,
            _translate,
            "ListParticipants",
            stageArn=stage_arn,
            sessionId=session,
            filterByPublished=True,
            maxResults=20,
        )
        publishing = [
            p
            for p in response.get("participants", [])
            if p.get("state") == "CONNECTED" and p.get("replicationType") != "REPLICA"
        ]
        publishing.sort(key=lambda p: p.get("firstJoinTime") or 0, reverse=True)
        return str(publishing[0]["participantId"]) if publishing else None

    async def active_replicas(self, source_arn: str, participant_id: str) -> set[str]:
        """Destination Stage ARNs into which the participant is replicated now."""
        replicas = items(
            self._caller,
            _translate,
            "ListParticipantReplicas",
            "replicas",
            sourceStageArn=source_arn,
            participantId=participant_id,
        )
        return {
            str(r["destinationStageArn"]) async for r in replicas if r.get("replicationState") == "ACTIVE"
        }

    async def start(self, source_arn: str, destination_arn: str, participant_id: str, window: int) -> None:
        """Starts the replication; one that is already running counts as started."""
        await call(
            self._caller,
            _replication_error,
            "StartParticipantReplication",
            done_if=("ConflictException",),
            sourceStageArn=source_arn,
            destinationStageArn=destination_arn,
            participantId=participant_id,
            reconnectWindowSeconds=window,
        )

    async def stop(self, source_arn: str, destination_arn: str, participant_id: str) -> None:
        """Stops the replication; one that is already gone counts as stopped."""
        await call(
            self._caller,
            _translate,
            "StopParticipantReplication",
            done_if=("ResourceNotFoundException", "ValidationException"),
            sourceStageArn=source_arn,
            destinationStageArn=destination_arn,
            participantId=participant_id,
        )


def _replication_error(operation: str, error: Exception) -> Exception:
    # No such participant publishing, a full Stage, the participant's 5 replications: later, not now.
    if isinstance(error, ClientError) and error_code(error) in (
        "ServiceQuotaExceededException",
        "ResourceNotFoundException",
        "ValidationException",
    ):
        return ReplicationRefused(refusal(operation, error))
    return _translate(operation, error)


def _stage(stage: Mapping[str, object]) -> IvsStage:
    endpoints = stage.get("endpoints") or {}
    assert isinstance(endpoints, Mapping)
    tags = stage.get("tags") or {}
    assert isinstance(tags, Mapping)
    return IvsStage(
        arn=str(stage["arn"]),
        tags={str(k): str(v) for k, v in tags.items()},
        events_url=str(endpoints.get("events", "")),
        whip_url=str(endpoints.get("whip", "")),
    )


class OverflowRefused(FanoutError):
    """IVS will not make the overflow tier (a quota, a request it rejects, a missing permission):
    trying again at once would be refused the same way."""

    default_code = "overflow_refused"


def _overflow_error(what: str) -> Translate:
    def translate(operation: str, error: Exception) -> Exception:
        if isinstance(error, ClientError):
            code = error_code(error)
            if code in REFUSALS:
                return OverflowRefused(refusal(operation, error))
            if code == "ResourceNotFoundException":
                return NotFound(f"{operation}: the {what} does not exist", code=f"{what}_not_found")
            if code == "ConflictException":
                return Unavailable(f"IVS {operation}: conflict", code="ivs_conflict", retry_after=2)
        return _translate(operation, error)

    return translate


_ENCODER_ERROR = _overflow_error("encoder_configuration")
_STAGE_ERROR = _overflow_error("stage")
_COMPOSITION_ERROR = _overflow_error("composition")


@dataclass(frozen=True)
class IvsComposition:
    arn: str
    stage_arn: str
    # STARTING, ACTIVE, STOPPING, STOPPED or FAILED (the model's CompositionState).
    state: str
    tags: Mapping[str, str]
    channel_arns: tuple[str, ...] = ()

    @property
    def running(self) -> bool:
        return self.state in ("STARTING", "ACTIVE", "STOPPING")


class CompositionApi:
    """Server-side composition of a Stage into a channel, and the encoder configuration it uses."""

    def __init__(self, caller: IvsCaller) -> None:
        self._caller = caller

    async def find_encoder_configuration(self, tags: Mapping[str, str]) -> str | None:
        """The oldest encoder configuration carrying all of `tags`."""
        configurations = items(
            self._caller, _ENCODER_ERROR, "ListEncoderConfigurations", "encoderConfigurations", maxResults=100
        )
        async for summary in configurations:
            if has_tags(summary.get("tags"), tags):
                return str(summary["arn"])
        return None

    async def create_encoder_configuration(
        self, name: str, video: Mapping[str, int], tags: Mapping[str, str]
    ) -> str:
        response = await call(
            self._caller,
            _ENCODER_ERROR,
            "CreateEncoderConfiguration",
            name=name,
            video=dict(video),
            tags=dict(tags),
        )
        return str(response["encoderConfiguration"]["arn"])

    async def start(
        self, stage_arn: str, channel_arn: str, encoder_configuration_arn: str, tags: Mapping[str, str]
    ) -> IvsComposition:
        channel = {"channelArn": channel_arn, "encoderConfigurationArn": encoder_configuration_arn}
        response = await call(
            self._caller,
            _STAGE_ERROR,
            "StartComposition",
            stageArn=stage_arn,
            destinations=[{"channel": channel}],
            tags=dict(tags),
        )
        return _composition(response["composition"])

    async def get(self, arn: str) -> IvsComposition:
        response = await call(self._caller, _COMPOSITION_ERROR, "GetComposition", arn=arn)
        return _composition(response["composition"])

    async def list_on_stage(self, stage_arn: str) -> list[IvsComposition]:
        """The Stage's compositions (ended ones too, until IVS deletes them), with their tags."""
        compositions = items(
            self._caller,
            _STAGE_ERROR,
            "ListCompositions",
            "compositions",
            filterByStageArn=stage_arn,
            maxResults=100,
        )
        return [_composition(summary) async for summary in compositions]

    async def stop(self, arn: str) -> None:
        """Stops the composition; one already stopping, ended or gone counts as stopped."""
        await call(
            self._caller,
            _COMPOSITION_ERROR,
            "StopComposition",
            done_if=("ResourceNotFoundException", "ConflictException"),
            arn=arn,
        )


def _composition(data: Mapping[str, object]) -> IvsComposition:
    tags = data.get("tags") or {}
    assert isinstance(tags, Mapping)
    destinations = data.get("destinations") or []
    assert isinstance(destinations, list)
    channels = tuple(
        str(d["configuration"]["channel"]["channelArn"])
        for d in destinations
        if isinstance(d, Mapping) and "channel" in (d.get("configuration") or {})
    )
    return IvsComposition(
        arn=str(data["arn"]),
        stage_arn=str(data.get("stageArn", "")),
        state=str(data.get("state", "")),
        tags={str(k): str(v) for k, v in tags.items()},
        channel_arns=channels,
    )
