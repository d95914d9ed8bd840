"""Participant replication on the emulator through real boto3 over HTTP, checked against botocore's model."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from botocore.exceptions import ClientError
from botocore.model import OperationModel, Shape, StructureShape

from services.ivslocal.config import Settings
from tests.integration import ivslocal_fixtures
from tests.integration.ivslocal_fixtures import AsyncIvsClient, IvsLocalServer, running_ivslocal
from tests.integration.test_ivslocal_api import MISSING_STAGE, post_raw
from tests.integration.test_ivslocal_events import Peer, active_session, joined, sockets
from tests.integration.test_ivslocal_participants import api_token
from tests.integration.waiting import eventually

ivslocal = ivslocal_fixtures.ivslocal

REPLICATION_OPERATIONS = (
    "StartParticipantReplication",
    "StopParticipantReplication",
    "ListParticipantReplicas",
    "ListParticipantEvents",
)


# --- the model as the contract ------------------------------------------------------------------


def operation_model(ivs: AsyncIvsClient, name: str) -> OperationModel:
    return ivs.sync.meta.service_model.operation_model(name)


# (id of the boto3 client, operation) -> the JSON body of its latest answer, as it crossed the wire.
_WIRE_BODIES: dict[tuple[int, str], Any] = {}


def keep_wire_bodies(ivs: AsyncIvsClient) -> AsyncIvsClient:
    """Records every answer's raw body: boto3's parser drops members the model lacks, the wire does not."""

    def after_call(http_response: Any, model: OperationModel, **_: Any) -> None:
        _WIRE_BODIES[(id(ivs.sync), model.name)] = json.loads(http_response.content or b"{}")

    ivs.sync.meta.events.register("after-call.ivs-realtime.*", after_call)
    return ivs


def assert_matches(value: Any, shape: Shape, where: str = "$") -> None:
    """Fails unless the wire JSON `value` fits `shape`: member names, required members, types, enums,
    patterns and lengths, ISO 8601 timestamps; members the model places in headers are not in the body."""
    kind = shape.type_name
    if kind == "structure":
        assert isinstance(shape, StructureShape)
        assert isinstance(value, dict), f"{where} is {type(value).__name__}, not an object"
        body_members = {n: s for n, s in shape.members.items() if s.serialization.get("location") is None}
        unknown = set(value) - set(body_members) - {"ResponseMetadata"}
        assert not unknown, f"{where} has members the model does not define: {sorted(unknown)}"
        missing = [n for n in shape.required_members if n in body_members and n not in value]
        assert not missing, f"{where} lacks required members {missing}"
        for name, member in value.items():
            if name != "ResponseMetadata":
                assert_matches(member, body_members[name], f"{where}.{name}")
    elif kind == "list":
        assert isinstance(value, list), f"{where} is not a list"
        for index, item in enumerate(value):
            assert_matches(item, shape.member, f"{where}[{index}]")  # type: ignore[attr-defined]
    elif kind == "map":
        assert isinstance(value, dict), f"{where} is not a map"
        for key, item in value.items():
            assert isinstance(key, str)
            assert_matches(item, shape.value, f"{where}[{key!r}]")  # type: ignore[attr-defined]
    elif kind == "string":
        assert isinstance(value, str), f"{where} is not a string"
        if shape.enum:
            assert value in shape.enum, f"{where} {value!r} is not one of {shape.enum}"
        rules = shape.metadata
        if "pattern" in rules:
            assert re.fullmatch(rules["pattern"], value), (
                f"{where} {value!r} does not match {rules['pattern']}"
            )
        assert rules.get("min", 0) <= len(value) <= rules.get("max", len(value)), f"{where} length"
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where} is not an integer"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{where} is not a boolean"
    elif kind == "timestamp":
        assert isinstance(value, str) and datetime.fromisoformat(value).tzinfo, f"{where} is not ISO 8601"
    else:
        raise AssertionError(f"{where}: shape type {kind} not checked by this test")


def assert_output_matches(ivs: AsyncIvsClient, operation: str, output: dict[str, Any]) -> None:
    """The answer boto3 just parsed into `output` was, on the wire, exactly of the model's output shape."""
    shape = operation_model(ivs, operation).output_shape
    assert shape is not None
    wire = _WIRE_BODIES.pop((id(ivs.sync), operation))
    assert_matches(wire, shape, operation)
    assert set(output) - {"ResponseMetadata"} == set(wire)


async def modeled_error(ivs: AsyncIvsClient, operation: str, call: Any) -> tuple[str, str]:
    """(code, message) of the error the call raises, after checking the model lists that error for the
    operation, with its HTTP status, and that the code came in the x-amzn-ErrorType header."""
    with pytest.raises(ClientError) as caught:
        await call
    response = caught.value.response
    code = response["Error"]["Code"]
    modeled = {shape.name: shape for shape in operation_model(ivs, operation).error_shapes}
    assert code in modeled, f"{operation} does not model {code}"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == modeled[code].metadata["error"]["httpStatusCode"]
    assert response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-errortype"] == code
    assert response["Error"]["Message"]
    return code, response["Error"]["Message"]


# --- a publishing broadcaster and Stages to replicate it into ---------------------------------


@dataclass
class Broadcast:
    ivs: AsyncIvsClient
    source: str
    participant_id: str
    token: str
    publisher: Peer
    open_socket: Callable[[str], Any]

    async def stages(self, count: int) -> list[str]:
        return [(await self.ivs.create_stage())["stage"]["arn"] for _ in range(count)]

    async def replicate(self, destination: str, **kwargs: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.ivs.start_participant_replication(
            sourceStageArn=self.source,
            destinationStageArn=destination,
            participantId=self.participant_id,
            **kwargs,
        )
        return result

    async def replicas(self, **kwargs: Any) -> list[dict[str, Any]]:
        """Every replica of the broadcaster, following nextToken."""
        found: list[dict[str, Any]] = []
        request = {"sourceStageArn": self.source, "participantId": self.participant_id, **kwargs}
        while True:
            page = await self.ivs.list_participant_replicas(**request)
            assert_output_matches(self.ivs, "ListParticipantReplicas", page)
            found.extend(page["replicas"])
            if "nextToken" not in page:
                return found
            request["nextToken"] = page["nextToken"]

    async def state_into(self, destination: str) -> str | None:
        states = [
            r["replicationState"] for r in await self.replicas() if r["destinationStageArn"] == destination
        ]
        return states[0] if states else None

    async def set_publishing(self, publishing: bool) -> None:
        before = len(self.publisher.frames)
        await self.publisher.send(type="publish" if publishing else "unpublish")
        await later_frame(self.publisher, before, "publish-state", publishing=publishing)

    async def viewer(self, stage_arn: str) -> tuple[Peer, str]:
        token = await api_token(self.ivs, stage_arn, capabilities=["SUBSCRIBE"])
        return await joined(self.open_socket, token["token"]), token["participantId"]


@asynccontextmanager
async def broadcasting(server: IvsLocalServer, **token: Any) -> AsyncIterator[Broadcast]:
    ivs = keep_wire_bodies(server.client())
    source = (await ivs.create_stage(name="origin"))["stage"]["arn"]
    issued = await api_token(ivs, source, capabilities=["PUBLISH"], userId="broadcaster", **token)
    async with sockets(server) as open_socket:
        publisher = await joined(open_socket, issued["token"])
        await publisher.send(type="publish")
        await publisher.frame("publish-state", participantId=issued["participantId"], publishing=True)
        yield Broadcast(ivs, source, issued["participantId"], issued["token"], publisher, open_socket)


async def later_frame(peer: Peer, before: int, kind: str, **fields: Any) -> dict[str, Any]:
    """The first frame of `kind` with `fields` that arrived after the peer's first `before` frames."""
    return await peer.wait_for(
        lambda f: (
            any(f is later for later in peer.frames[before:])
            and f["type"] == kind
            and all(f.get(k) == v for k, v in fields.items())
        ),
        f"a new {kind} {fields}",
    )


async def participant_in(ivs: AsyncIvsClient, stage_arn: str, participant_id: str) -> dict[str, Any]:
    session_id = await active_session(ivs, stage_arn)
    listed = await ivs.list_participants(stageArn=stage_arn, sessionId=session_id)
    assert_output_matches(ivs, "ListParticipants", listed)
    summary = next(p for p in listed["participants"] if p["participantId"] == participant_id)
    full = await ivs.get_participant(stageArn=stage_arn, sessionId=session_id, participantId=participant_id)
    assert_output_matches(ivs, "GetParticipant", full)
    # The summary is the participant without GetParticipant's extra members.
    assert {k: v for k, v in full["participant"].items() if k in summary} == summary
    return dict(full["participant"])


async def all_events(ivs: AsyncIvsClient, stage_arn: str, session_id: str, participant_id: str) -> list[Any]:
    events: list[Any] = []
    request: dict[str, Any] = {
        "stageArn": stage_arn,
        "sessionId": session_id,
        "participantId": participant_id,
        "maxResults": 2,
    }
    while True:
        page = await ivs.list_participant_events(**request)
        assert_output_matches(ivs, "ListParticipantEvents", page)
        events.extend(page["events"])
        if "nextToken" not in page:
            return events
        request["nextToken"] = page["nextToken"]


# --- tests ----------------------------------------------------------------------------------------


async def test_the_four_operations_are_the_models_and_answer_its_shapes(ivslocal: IvsLocalServer) -> None:
    async with broadcasting(ivslocal) as show:
        ivs = show.ivs
        for name in REPLICATION_OPERATIONS:
            model = operation_model(ivs, name)
            assert (model.http["method"], model.http["requestUri"]) == ("POST", f"/{name}")
        [destination] = await show.stages(1)
        started = await show.replicate(destination, reconnectWindowSeconds=30, attributes={"role": "replica"})
        assert_output_matches(ivs, "StartParticipantReplication", started)
        [replica] = await show.replicas()
        assert replica == {
            "sourceStageArn": show.source,
            "participantId": show.participant_id,
            "sourceSessionId": await active_session(ivs, show.source),
            "destinationStageArn": destination,
            "destinationSessionId": await active_session(ivs, destination),
            "replicationState": "ACTIVE",
        }
        stopped = await ivs.stop_participant_replication(
            sourceStageArn=show.source, destinationStageArn=destination, participantId=show.participant_id
        )
        assert_output_matches(ivs, "StopParticipantReplication", stopped)
        assert [r["replicationState"] for r in await show.replicas()] == ["STOPPED"]
        # The model gives ListParticipantReplicas a paginator; it works against the emulator.
        paginator = ivs.sync.get_paginator("list_participant_replicas")
        pages = paginator.paginate(sourceStageArn=show.source, participantId=show.participant_id)
        # Off the loop: the paginator blocks, and the emulator answers on this loop.
        paged = await asyncio.to_thread(lambda: [r for page in pages for r in page["replicas"]])
        assert [r["destinationStageArn"] for r in paged] == [destination]


async def test_a_replica_is_a_connected_publisher_of_the_destination(ivslocal: IvsLocalServer) -> None:
    async with broadcasting(ivslocal, attributes={"name": "Ann", "role": "host"}) as show:
        ivs = show.ivs
        [destination] = await show.stages(1)
        early, _ = await show.viewer(destination)
        await show.replicate(destination, attributes={"role": "replica"})

        replica = await participant_in(ivs, destination, show.participant_id)
        source_session = await active_session(ivs, show.source)
        assert replica["replicationType"] == "REPLICA"
        assert replica["replicationState"] == "ACTIVE"
        assert replica["sourceStageArn"] == show.source
        assert replica["sourceSessionId"] == source_session
        assert (replica["state"], replica["published"]) == ("CONNECTED", True)
        assert replica["userId"] == "broadcaster"
        # The replication's attributes are merged over the token's.
        assert replica["attributes"] == {"name": "Ann", "role": "replica"}
        session = await active_session(ivs, destination)
        published = await ivs.list_participants(
            stageArn=destination, sessionId=session, filterByPublished=True
        )
        assert [p["participantId"] for p in published["participants"]] == [show.participant_id]

        source = await participant_in(ivs, show.source, show.participant_id)
        assert (source["replicationType"], source["replicationState"]) == ("SOURCE", "ACTIVE")
        assert "sourceStageArn" not in source

        # The destination's sockets see the replica join and publish, as they would any publisher.
        await early.frame("publish-state", participantId=show.participant_id, publishing=True)
        joined_frame = await early.frame("participant-joined")
        assert joined_frame["participant"]["id"] == show.participant_id
        late, _ = await show.viewer(destination)
        assert {p["id"]: p["isPublishing"] for p in late.of_type("joined")[0]["participants"]} == {
            show.participant_id: True,
            **{
                p["id"]: False
                for p in late.of_type("joined")[0]["participants"]
                if p["id"] != show.participant_id
            },
        }

        await ivs.stop_participant_replication(
            sourceStageArn=show.source, destinationStageArn=destination, participantId=show.participant_id
        )
        await late.frame("participant-left", participantId=show.participant_id)
        replica = await participant_in(ivs, destination, show.participant_id)
        assert (replica["state"], replica["replicationState"]) == ("DISCONNECTED", "STOPPED")
        source = await participant_in(ivs, show.source, show.participant_id)
        assert (source["replicationType"], source["replicationState"]) == ("SOURCE", "STOPPED")
        # A stopped replication can be started again.
        await show.replicate(destination)
        assert await show.state_into(destination) == "ACTIVE"


async def test_five_concurrent_replications_and_the_sixth_is_refused(ivslocal: IvsLocalServer) -> None:
    async with broadcasting(ivslocal) as show:
        ivs = show.ivs
        destinations = await show.stages(6)
        for destination in destinations[:5]:
            await show.replicate(destination)
        code, message = await modeled_error(
            ivs, "StartParticipantReplication", show.replicate(destinations[5])
        )
        assert code == "ServiceQuotaExceededException"
        assert "5" in message
        assert await show.state_into(destinations[5]) is None

        # Pagination: 2 per page, in start order; maxResults above the model's 50 is refused.
        assert [r["destinationStageArn"] for r in await show.replicas(maxResults=2)] == destinations[:5]
        page = await ivs.list_participant_replicas(
            sourceStageArn=show.source, participantId=show.participant_id, maxResults=3
        )
        assert len(page["replicas"]) == 3 and page["nextToken"]
        body = json.dumps(
            {"sourceStageArn": show.source, "participantId": show.participant_id, "maxResults": 51}
        )
        assert (await post_raw(ivslocal, "/ListParticipantReplicas", body.encode()))[:2] == (
            400,
            "ValidationException",
        )

        # Stopping one frees a slot.
        await ivs.stop_participant_replication(
            sourceStageArn=show.source, destinationStageArn=destinations[0], participantId=show.participant_id
        )
        await show.replicate(destinations[5])
        states = {r["destinationStageArn"]: r["replicationState"] for r in await show.replicas()}
        assert sorted(states.values()) == ["ACTIVE"] * 5 + ["STOPPED"]


async def test_refusals_are_the_modeled_errors(ivslocal: IvsLocalServer) -> None:
    async with broadcasting(ivslocal) as show:
        ivs = show.ivs
        [destination, other] = await show.stages(2)
        subscriber, subscriber_id = await show.viewer(show.source)
        start, stop = "StartParticipantReplication", "StopParticipantReplication"

        def start_call(**overrides: Any) -> Any:
            request = {
                "sourceStageArn": show.source,
                "destinationStageArn": destination,
                "participantId": show.participant_id,
                **overrides,
            }
            return ivs.start_participant_replication(**request)

        def stop_call(**overrides: Any) -> Any:
            request = {
                "sourceStageArn": show.source,
                "destinationStageArn": destination,
                "participantId": show.participant_id,
                **overrides,
            }
            return ivs.stop_participant_replication(**request)

        cases: list[tuple[str, Any, str]] = [
            (start, start_call(sourceStageArn=MISSING_STAGE), "ResourceNotFoundException"),
            (start, start_call(destinationStageArn=MISSING_STAGE), "ResourceNotFoundException"),
            (start, start_call(participantId="nobody"), "ResourceNotFoundException"),
            (start, start_call(participantId=subscriber_id), "ConflictException"),
            (start, start_call(destinationStageArn=show.source), "ValidationException"),
            (
                start,
                start_call(sourceStageArn="arn:aws:ivs:us-east-1:123456789012:channel/x"),
                "ValidationException",
            ),
            (start, start_call(participantId="not an id!"), "ValidationException"),
            (stop, stop_call(), "ResourceNotFoundException"),
            (stop, stop_call(destinationStageArn=MISSING_STAGE), "ResourceNotFoundException"),
            (stop, stop_call(participantId="bad/id"), "ValidationException"),
            (
                "ListParticipantReplicas",
                ivs.list_participant_replicas(sourceStageArn="x", participantId="p"),
                "ValidationException",
            ),
            (
                "ListParticipantEvents",
                ivs.list_participant_events(
                    stageArn=show.source, sessionId="st-abc_defghijkl", participantId="p"
                ),
                "ValidationException",
            ),
        ]
        for operation, call, expected in cases:
            assert (await modeled_error(ivs, operation, call))[0] == expected, operation

        await start_call()
        assert (await modeled_error(ivs, start, start_call()))[0] == "ConflictException"
        # A replica cannot itself be replicated onwards (unverified in IVS; refused here).
        replica_onwards = start_call(sourceStageArn=destination, destinationStageArn=other)
        assert (await modeled_error(ivs, start, replica_onwards))[0] == "ConflictException"
        # The publisher stops publishing: with the default window of 0 the replication ends at once.
        await show.set_publishing(False)
        assert await show.state_into(destination) == "STOPPED"
        assert (await modeled_error(ivs, start, start_call()))[0] == "ConflictException"
        assert not subscriber.of_type("error")

    # Ranges boto3 checks itself are checked by the server too (plain HTTP, as another client could send).
    too_long = b'{"sourceStageArn": "%s", "destinationStageArn": "%s", "participantId": "p", ' % (
        MISSING_STAGE.encode(),
        MISSING_STAGE.replace("abcd", "wxyz").encode(),
    )
    for body in (too_long + b'"reconnectWindowSeconds": 301}', too_long + b'"reconnectWindowSeconds": -1}'):
        assert (await post_raw(ivslocal, "/StartParticipantReplication", body))[:2] == (
            400,
            "ValidationException",
        )
    assert (await post_raw(ivslocal, "/StopParticipantReplication", b"{}"))[:2] == (
        400,
        "ValidationException",
    )


async def test_the_replication_outlives_a_drop_shorter_than_its_window_only(ivslocal: IvsLocalServer) -> None:
    async with broadcasting(ivslocal) as show:
        ivs = show.ivs
        patient, brief = await show.stages(2)
        await show.replicate(patient, reconnectWindowSeconds=300)
        await show.replicate(brief, reconnectWindowSeconds=1)
        patient_viewer, _ = await show.viewer(patient)
        brief_viewer, _ = await show.viewer(brief)

        await show.set_publishing(False)
        # Within the window the replica stays, but publishes nothing while its source does not.
        await patient_viewer.frame("publish-state", participantId=show.participant_id, publishing=False)
        # Past the window the emulator ends the replication by itself: no API call needed to notice.
        await brief_viewer.wait_for(
            lambda f: f["type"] == "participant-left" and f["participantId"] == show.participant_id,
            "the brief replica leaving",
            within=15.0,
        )
        assert await show.state_into(brief) == "STOPPED"
        assert await show.state_into(patient) == "ACTIVE"

        before = len(patient_viewer.frames)
        await show.set_publishing(True)
        await later_frame(
            patient_viewer, before, "publish-state", participantId=show.participant_id, publishing=True
        )
        assert await show.state_into(patient) == "ACTIVE"
        replica = await participant_in(ivs, patient, show.participant_id)
        assert (replica["state"], replica["replicationState"]) == ("CONNECTED", "ACTIVE")


async def test_the_replication_survives_the_publisher_reconnecting_in_its_window(
    ivslocal: IvsLocalServer,
) -> None:
    async with broadcasting(ivslocal) as show:
        ivs = show.ivs
        [destination] = await show.stages(1)
        await show.replicate(destination, reconnectWindowSeconds=300)
        viewer, _ = await show.viewer(destination)
        first_session = await active_session(ivs, show.source)
        await show.publisher.ws.close()
        await viewer.frame("publish-state", participantId=show.participant_id, publishing=False)
        # The publisher was alone, so its session ended; it comes back with its token in a new one.
        await eventually(lambda: _no_active_session(ivs, show.source), "the source session to end")
        before = len(viewer.frames)
        publisher = await joined(show.open_socket, show.token)
        await publisher.send(type="publish")
        await later_frame(viewer, before, "publish-state", participantId=show.participant_id, publishing=True)

        [replica] = await show.replicas()
        second_session = await active_session(ivs, show.source)
        assert second_session != first_session
        assert (replica["replicationState"], replica["sourceSessionId"]) == ("ACTIVE", second_session)
        in_destination = await participant_in(ivs, destination, show.participant_id)
        assert in_destination["sourceSessionId"] == second_session
        source = await participant_in(ivs, show.source, show.participant_id)
        assert (source["replicationType"], source["replicationState"]) == ("SOURCE", "ACTIVE")


async def _no_active_session(ivs: AsyncIvsClient, stage_arn: str) -> bool:
    return "activeSessionId" not in (await ivs.get_stage(arn=stage_arn))["stage"]


async def test_deleting_either_stage_ends_its_replications(ivslocal: IvsLocalServer) -> None:
    async with broadcasting(ivslocal) as show:
        ivs = show.ivs
        kept, deleted = await show.stages(2)
        await show.replicate(kept)
        await show.replicate(deleted)
        await ivs.delete_stage(arn=deleted)
        states = {r["destinationStageArn"]: r["replicationState"] for r in await show.replicas()}
        assert states == {kept: "ACTIVE", deleted: "STOPPED"}

        viewer, _ = await show.viewer(kept)
        await ivs.delete_stage(arn=show.source)
        await viewer.frame("participant-left", participantId=show.participant_id)
        # Participants that never were replicated say so.
        plain = await participant_in(ivs, kept, viewer_id_of(viewer))
        assert plain["replicationType"] == "NONE" and "replicationState" not in plain
        session = await active_session(ivs, kept)
        listed = await ivs.get_participant(
            stageArn=kept, sessionId=session, participantId=show.participant_id
        )
        assert (listed["participant"]["state"], listed["participant"]["replicationState"]) == (
            "DISCONNECTED",
            "STOPPED",
        )
        # Of a deleted source Stage nothing is listed, as ListParticipantReplicas models no NotFound.
        assert await show.replicas() == []


def viewer_id_of(peer: Peer) -> str:
    return str(peer.of_type("joined")[0]["participant"]["id"])


async def test_participant_events_list_the_replication(ivslocal: IvsLocalServer) -> None:
    async with broadcasting(ivslocal) as show:
        ivs = show.ivs
        [destination] = await show.stages(1)
        await show.replicate(destination)
        destination_session = await active_session(ivs, destination)
        await ivs.stop_participant_replication(
            sourceStageArn=show.source, destinationStageArn=destination, participantId=show.participant_id
        )
        source_session = await active_session(ivs, show.source)

        source_events = await all_events(ivs, show.source, source_session, show.participant_id)
        assert [e["name"] for e in source_events] == [
            "JOINED",
            "PUBLISH_STARTED",
            "REPLICATION_STARTED",
            "REPLICATION_STOPPED",
        ]
        for event in source_events:
            assert event["participantId"] == show.participant_id
            assert event["replica"] is False
        for event in source_events[2:]:
            assert event["destinationStageArn"] == destination
            assert event["destinationSessionId"] == destination_session
        assert "destinationStageArn" not in source_events[0]
        times = [e["eventTime"] for e in source_events]
        assert times == sorted(times)

        replica_events = await all_events(ivs, destination, destination_session, show.participant_id)
        assert [(e["name"], e["replica"]) for e in replica_events] == [
            ("JOINED", True),
            ("PUBLISH_STARTED", True),
            ("PUBLISH_STOPPED", True),
            ("LEFT", True),
        ]
        # Unknown sessions and participants have no events; the model lists no NotFound here.
        assert (
            await ivs.list_participant_events(
                stageArn=show.source, sessionId="st-0000000000000", participantId=show.participant_id
            )
        )["events"] == []
        assert (
            await ivs.list_participant_events(
                stageArn=MISSING_STAGE, sessionId=source_session, participantId="x"
            )
        )["events"] == []


async def test_a_replica_counts_as_a_publisher_of_its_stage() -> None:
    async with (
        running_ivslocal(Settings(port=0, publisher_quota=1)) as server,
        broadcasting(server) as show,
    ):
        ivs = show.ivs
        [full, empty] = await show.stages(2)
        token = await api_token(ivs, full, capabilities=["PUBLISH"])
        await joined(show.open_socket, token["token"])
        code, _ = await modeled_error(ivs, "StartParticipantReplication", show.replicate(full))
        assert code == "ServiceQuotaExceededException"

        await show.replicate(empty)
        other = await api_token(ivs, empty, capabilities=["PUBLISH"])
        refused = await show.open_socket(other["token"])
        assert (await refused.frame("error"))["name"] == "STAGE_AT_CAPACITY"


async def test_a_replicas_subscriber_is_answered_by_the_source_publisher(ivslocal: IvsLocalServer) -> None:
    async with broadcasting(ivslocal) as show:
        [destination] = await show.stages(1)
        await show.replicate(destination)
        viewer, viewer_id = await show.viewer(destination)
        pid = show.participant_id

        await viewer.send(type="subscribe", to=pid, id="s1", audio=True, video=True)
        asked = await show.publisher.frame("subscribe", id="s1")
        assert asked["from"] == viewer_id and "to" not in asked
        await show.publisher.send(type="offer", to=viewer_id, id="s1", sdp="v=0 offer")
        assert (await viewer.frame("offer", id="s1"))["from"] == pid
        await viewer.send(type="answer", to=pid, id="s1", sdp="v=0 answer")
        assert (await show.publisher.frame("answer", id="s1"))["from"] == viewer_id
        await viewer.send(type="candidate", to=pid, id="s1", candidate=None)
        await show.publisher.frame("candidate", id="s1", candidate=None)

        # The subscriber leaves: the publisher, who never saw it join, is told the subscription ended.
        await viewer.ws.close()
        assert (await show.publisher.frame("unsubscribe", id="s1"))["from"] == viewer_id

        # The replication stops: the replica's subscribers' subscriptions end at the publisher as well.
        second, second_id = await show.viewer(destination)
        await second.send(type="subscribe", to=pid, id="s2", audio=True, video=True)
        await show.publisher.frame("subscribe", id="s2")
        await show.ivs.stop_participant_replication(
            sourceStageArn=show.source, destinationStageArn=destination, participantId=pid
        )
        assert (await show.publisher.frame("unsubscribe", id="s2"))["from"] == second_id
        await second.frame("participant-left", participantId=pid)
        # With no replication the publisher is out of reach from the destination.
        await second.send(type="subscribe", to=pid, id="s3", audio=True, video=True)
        assert (await second.frame("error", id="s3"))["to"] == pid
        # And a Stage the broadcaster was never replicated into cannot reach it either.
        [elsewhere] = await show.stages(1)
        stranger, _ = await show.viewer(elsewhere)
        await stranger.send(type="subscribe", to=pid, id="s4", audio=True, video=True)
        await stranger.frame("error", id="s4")
