"""The stage manager's view of IVS: create, find, describe and delete the cluster's Stages."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError

from services.common.errors import FanoutError, NoCapacity, NotFound, Unavailable
from services.common.ivs_calls import IvsCaller, error_code
from services.common.stage_tags import TAG_CLUSTER, TAG_DRAINING, TAG_ENDING

log = logging.getLogger(__name__)


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


class StageApi:
    """Small adapter over the boto3 client; errors come out as domain errors."""

    def __init__(self, caller: IvsCaller) -> None:
        self._caller = caller

    async def create_stage(self, name: str, tags: Mapping[str, str]) -> IvsStage:
        try:
            response = await self._caller.call("CreateStage", name=name, tags=dict(tags))
        except (ClientError, BotoCoreError) as error:
            raise _translate("CreateStage", error) from error
        return _stage(response["stage"])

    async def get_stage(self, arn: str) -> IvsStage:
        try:
            response = await self._caller.call("GetStage", arn=arn)
        except (ClientError, BotoCoreError) as error:
            raise _translate("GetStage", error) from error
        return _stage(response["stage"])

    async def delete_stage(self, arn: str) -> None:
        """Deletes the Stage; one that is already gone counts as deleted."""
        try:
            await self._caller.call("DeleteStage", arn=arn)
        except ClientError as error:
            if error_code(error) != "ResourceNotFoundException":
                raise _translate("DeleteStage", error) from error
        except BotoCoreError as error:
            raise _translate("DeleteStage", error) from error

    async def tag_draining(self, arn: str) -> None:
        await self._tag_call("TagResource", resourceArn=arn, tags={TAG_DRAINING: "true"})

    async def untag_draining(self, arn: str) -> None:
        await self._tag_call("UntagResource", resourceArn=arn, tagKeys=[TAG_DRAINING])

    async def tag_ending(self, arn: str) -> None:
        """Records in IVS that the Stage's room is ending; unlike the drain tag, failing it fails the end."""
        try:
            await self._caller.call("TagResource", resourceArn=arn, tags={TAG_ENDING: "true"})
        except (ClientError, BotoCoreError) as error:
            raise _translate("TagResource", error) from error

    async def _tag_call(self, operation: str, **params: object) -> None:
        # The tag only helps recovery after a restart; failing it must not fail the drain.
        try:
            await self._caller.call(operation, **params)
        except (ClientError, BotoCoreError) as error:
            log.warning(
                "%s on %s failed: %s", operation, params.get("resourceArn"), _translate(operation, error)
            )

    async def list_cluster_stages(self, cluster_id: str) -> list[IvsStage]:
        """Every Stage tagged with this cluster id (ListStages summaries carry tags)."""
        stages: list[IvsStage] = []
        token: str | None = None
        while True:
            params: dict[str, object] = {"maxResults": 100}
            if token:
                params["nextToken"] = token
            try:
                response = await self._caller.call("ListStages", **params)
            except (ClientError, BotoCoreError) as error:
                raise _translate("ListStages", error) from error
            for summary in response.get("stages", []):
                tags = summary.get("tags") or {}
                if tags.get(TAG_CLUSTER) == cluster_id:
                    stages.append(IvsStage(arn=summary["arn"], tags=tags))
            token = response.get("nextToken")
            if not token:
                return stages


class ReplicationApi:
    """Server-side replication of the broadcaster from an origin into its replicas (DESIGN.md §5)."""

    def __init__(self, caller: IvsCaller) -> None:
        self._caller = caller

    async def publishing_participant(self, stage_arn: str) -> str | None:
        """The participant publishing on the Stage itself (not a replica of another), newest first."""
        try:
            stage = (await self._caller.call("GetStage", arn=stage_arn))["stage"]
            session = stage.get("activeSessionId")
            if not session:
                return None
            response = await self._caller.call(
                "ListParticipants",
                stageArn=stage_arn,
                sessionId=session,
                filterByPublished=True,
                maxResults=20,
            )
        except (ClientError, BotoCoreError) as error:
            raise _translate("ListParticipants", error) from error
        publishing = [
            p
            for p in response.get("participants", [])
            if p.get("state") == "CONNECTED" and p.get("replicationType") != "REPLICA"
        ]
        publishing.sort(key=lambda p: p.get("firstJoinTime") or 0, reverse=True)
        return str(publishing[0]["participantId"]) if publishing else None

    async def active_replicas(self, source_arn: str, participant_id: str) -> set[str]:
        """Destination Stage ARNs into which the participant is replicated now."""
        active: set[str] = set()
        token: str | None = None
        while True:
            params: dict[str, object] = {"sourceStageArn": source_arn, "participantId": participant_id}
            if token:
                params["nextToken"] = token
            try:
                response = await self._caller.call("ListParticipantReplicas", **params)
            except (ClientError, BotoCoreError) as error:
                raise _translate("ListParticipantReplicas", error) from error
            for replica in response.get("replicas", []):
                if replica.get("replicationState") == "ACTIVE":
                    active.add(str(replica["destinationStageArn"]))
            token = response.get("nextToken")
            if not token:
                return active

    async def start(self, source_arn: str, destination_arn: str, participant_id: str, window: int) -> None:
        """Starts the replication; one that is already running counts as started."""
        try:
            await self._caller.call(
                "StartParticipantReplication",
                sourceStageArn=source_arn,
                destinationStageArn=destination_arn,
                participantId=participant_id,
                reconnectWindowSeconds=window,
            )
        except ClientError as error:
            code = error_code(error)
            if code == "ConflictException":
                return
            if code in ("ServiceQuotaExceededException", "ResourceNotFoundException", "ValidationException"):
                message = error.response.get("Error", {}).get("Message") or code
                raise ReplicationRefused(f"StartParticipantReplication refused: {code}: {message}") from error
            raise _translate("StartParticipantReplication", error) from error
        except BotoCoreError as error:
            raise _translate("StartParticipantReplication", error) from error

    async def stop(self, source_arn: str, destination_arn: str, participant_id: str) -> None:
        """Stops the replication; one that is already gone counts as stopped."""
        try:
            await self._caller.call(
                "StopParticipantReplication",
                sourceStageArn=source_arn,
                destinationStageArn=destination_arn,
                participantId=participant_id,
            )
        except ClientError as error:
            if error_code(error) not in ("ResourceNotFoundException", "ValidationException"):
                raise _translate("StopParticipantReplication", error) from error
        except BotoCoreError as error:
            raise _translate("StopParticipantReplication", error) from error


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


# Answers that retrying will not change; anything else (throttles past our retries, 5xx, no answer) may.
_REFUSALS = frozenset(
    {
        "ServiceQuotaExceededException",
        "ValidationException",
        "AccessDeniedException",
        "PendingVerification",
    }
)


def _overflow_error(operation: str, error: Exception, what: str) -> Exception:
    if isinstance(error, ClientError):
        code = error_code(error)
        if code in _REFUSALS:
            message = error.response.get("Error", {}).get("Message") or code
            return OverflowRefused(f"{operation} refused: {code}: {message}")
        if code == "ResourceNotFoundException":
            return NotFound(f"{operation}: the {what} does not exist", code=f"{what}_not_found")
        if code == "ConflictException":
            return Unavailable(f"IVS {operation}: conflict", code="ivs_conflict", retry_after=2)
    return _translate(operation, error)


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
        token: str | None = None
        while True:
            params: dict[str, object] = {"maxResults": 100}
            if token:
                params["nextToken"] = token
            try:
                response = await self._caller.call("ListEncoderConfigurations", **params)
            except (ClientError, BotoCoreError) as error:
                raise _overflow_error("ListEncoderConfigurations", error, "encoder_configuration") from error
            for summary in response.get("encoderConfigurations", []):
                if _has_tags(summary.get("tags"), tags):
                    return str(summary["arn"])
            token = response.get("nextToken")
            if not token:
                return None

    async def create_encoder_configuration(
        self, name: str, video: Mapping[str, int], tags: Mapping[str, str]
    ) -> str:
        try:
            response = await self._caller.call(
                "CreateEncoderConfiguration", name=name, video=dict(video), tags=dict(tags)
            )
        except (ClientError, BotoCoreError) as error:
            raise _overflow_error("CreateEncoderConfiguration", error, "encoder_configuration") from error
        return str(response["encoderConfiguration"]["arn"])

    async def start(
        self, stage_arn: str, channel_arn: str, encoder_configuration_arn: str, tags: Mapping[str, str]
    ) -> IvsComposition:
        try:
            response = await self._caller.call(
                "StartComposition",
                stageArn=stage_arn,
                destinations=[
                    {
                        "channel": {
                            "channelArn": channel_arn,
                            "encoderConfigurationArn": encoder_configuration_arn,
                        }
                    }
                ],
                tags=dict(tags),
            )
        except (ClientError, BotoCoreError) as error:
            raise _overflow_error("StartComposition", error, "stage") from error
        return _composition(response["composition"])

    async def get(self, arn: str) -> IvsComposition:
        try:
            response = await self._caller.call("GetComposition", arn=arn)
        except (ClientError, BotoCoreError) as error:
            raise _overflow_error("GetComposition", error, "composition") from error
        return _composition(response["composition"])

    async def list_on_stage(self, stage_arn: str) -> list[IvsComposition]:
        """The Stage's compositions (ended ones too, until IVS deletes them), with their tags."""
        found: list[IvsComposition] = []
        token: str | None = None
        while True:
            params: dict[str, object] = {"filterByStageArn": stage_arn, "maxResults": 100}
            if token:
                params["nextToken"] = token
            try:
                response = await self._caller.call("ListCompositions", **params)
            except (ClientError, BotoCoreError) as error:
                raise _overflow_error("ListCompositions", error, "stage") from error
            found += [_composition(summary) for summary in response.get("compositions", [])]
            token = response.get("nextToken")
            if not token:
                return found

    async def stop(self, arn: str) -> None:
        """Stops the composition; one already stopping, ended or gone counts as stopped."""
        try:
            await self._caller.call("StopComposition", arn=arn)
        except ClientError as error:
            if error_code(error) not in ("ResourceNotFoundException", "ConflictException"):
                raise _overflow_error("StopComposition", error, "composition") from error
        except BotoCoreError as error:
            raise _translate("StopComposition", error) from error


def _has_tags(tags: object, wanted: Mapping[str, str]) -> bool:
    return isinstance(tags, Mapping) and all(tags.get(k) == v for k, v in wanted.items())


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
