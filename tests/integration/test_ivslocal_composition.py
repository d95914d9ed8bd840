"""Server-side composition on the emulator through real boto3 over HTTP, checked against botocore's model:
encoder configurations, compositions and their states, quotas, pagination, filters, tags, the failure knob."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import pytest
from botocore.exceptions import ClientError
from botocore.model import Shape, StructureShape

from services.common.ivs_quotas import OPERATION_RATES
from services.ivslocal.config import Settings
from tests.integration import ivslocal_fixtures
from tests.integration.ivslocal_fixtures import IvsLocalServer, running_ivslocal
from tests.integration.test_ivslocal_api import MISSING_STAGE, post_raw
from tests.integration.test_ivslocal_replication import broadcasting, modeled_error, operation_model
from tests.integration.waiting import eventually

ivslocal = ivslocal_fixtures.ivslocal

COMPOSITION_OPERATIONS = (
    "CreateEncoderConfiguration",
    "GetEncoderConfiguration",
    "ListEncoderConfigurations",
    "DeleteEncoderConfiguration",
    "StartComposition",
    "GetComposition",
    "ListCompositions",
    "StopComposition",
)
ACCOUNT = "arn:aws:ivs:us-east-1:123456789012"
STORAGE = f"{ACCOUNT}:storage-configuration/FefABabCDcdE"
MISSING_ENCODER = f"{ACCOUNT}:encoder-configuration/abcdABCDefgh"
MISSING_COMPOSITION = f"{ACCOUNT}:composition/abcdABCDefgh"
ENCODER_ARN = re.compile(r"arn:aws:ivs:us-east-1:123456789012:encoder-configuration/[a-zA-Z0-9]{12}")
COMPOSITION_ARN = re.compile(r"arn:aws:ivs:us-east-1:123456789012:composition/[a-zA-Z0-9]{12}")
DEFAULT_VIDEO = {"width": 1280, "height": 720, "framerate": 30.0, "bitrate": 2_500_000}
DEFAULT_GRID = {
    "featuredParticipantAttribute": "",
    "gridGap": 2,
    "omitStoppedVideo": False,
    "videoAspectRatio": "VIDEO",
}
DEFAULT_PIP = {
    "featuredParticipantAttribute": "",
    "gridGap": 0,
    "omitStoppedVideo": False,
    "pipBehavior": "STATIC",
    "pipOffset": 0,
    "pipParticipantAttribute": "",
    "pipPosition": "BOTTOM_RIGHT",
    "videoFillMode": "COVER",
}
# STARTING and STOPPING last long enough to be seen, short enough not to slow the tests.
QUICK = Settings(port=0, composition_transition_seconds=0.5)


def channel_arn(number: int = 0) -> str:
    return f"{ACCOUNT}:channel/channel{number:05d}"


def to_channel(number: int = 0, encoder: str | None = None, name: str | None = None) -> dict[str, Any]:
    channel: dict[str, Any] = {"channelArn": channel_arn(number)}
    if encoder is not None:
        channel["encoderConfigurationArn"] = encoder
    destination: dict[str, Any] = {"channel": channel}
    if name is not None:
        destination["name"] = name
    return destination


def to_s3(encoder: str) -> dict[str, Any]:
    return {"s3": {"storageConfigurationArn": STORAGE, "encoderConfigurationArns": [encoder]}}


# --- the model as the contract ------------------------------------------------------------------


def assert_matches(value: Any, shape: Shape, where: str = "$") -> None:
    """Fails unless the wire JSON `value` fits `shape`: only modeled members, required ones present, the
    JSON type of each, enums, patterns, lengths, numeric ranges, list and map sizes, ISO 8601 times."""
    kind = shape.type_name
    rules = shape.metadata
    if kind == "structure":
        assert isinstance(shape, StructureShape)
        assert isinstance(value, dict), f"{where} is {type(value).__name__}, not an object"
        members = {n: s for n, s in shape.members.items() if s.serialization.get("location") is None}
        unknown = set(value) - set(members)
        assert not unknown, f"{where} has members the model does not define: {sorted(unknown)}"
        missing = [n for n in shape.required_members if n in members and n not in value]
        assert not missing, f"{where} lacks required members {missing}"
        for name, member in value.items():
            assert_matches(member, members[name], f"{where}.{name}")
    elif kind in ("list", "map"):
        assert isinstance(value, list if kind == "list" else dict), f"{where} is not a {kind}"
        assert rules.get("min", 0) <= len(value) <= rules.get("max", len(value)), f"{where} size {len(value)}"
        if kind == "list":
            for index, item in enumerate(value):
                assert_matches(item, shape.member, f"{where}[{index}]")  # type: ignore[attr-defined]
        else:
            for key, item in value.items():
                assert_matches(key, shape.key, f"{where} key {key!r}")  # type: ignore[attr-defined]
                assert_matches(item, shape.value, f"{where}[{key!r}]")  # type: ignore[attr-defined]
    elif kind == "string":
        assert isinstance(value, str), f"{where} is not a string"
        if shape.enum:  # type: ignore[attr-defined]
            assert value in shape.enum, f"{where} {value!r} is not one of {shape.enum}"  # type: ignore[attr-defined]
        if "pattern" in rules:
            assert re.fullmatch(rules["pattern"], value), (
                f"{where} {value!r} does not match {rules['pattern']}"
            )
        assert rules.get("min", 0) <= len(value) <= rules.get("max", len(value)), f"{where} length"
    elif kind in ("integer", "long", "float", "double"):
        allowed = int if kind in ("integer", "long") else (int, float)
        assert isinstance(value, allowed) and not isinstance(value, bool), f"{where} is not a {kind}"
        assert rules.get("min", value) <= value <= rules.get("max", value), f"{where} {value} out of range"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{where} is not a boolean"
    elif kind == "timestamp":
        assert isinstance(value, str) and datetime.fromisoformat(value).tzinfo, f"{where} is not ISO 8601"
    else:
        raise AssertionError(f"{where}: shape type {kind} not checked by this test")


class ModelClient:
    """A boto3 ivs-realtime client whose every answer is checked, as it crossed the wire, against the
    model's output shape: boto3's parser would silently drop members the model lacks."""

    def __init__(self, server: IvsLocalServer, retries: bool = True) -> None:
        self.ivs = server.client(retries)
        self._bodies: dict[str, Any] = {}
        self.ivs.sync.meta.events.register("after-call.ivs-realtime.*", self._keep)

    def _keep(self, http_response: Any, model: Any, **_: Any) -> None:
        self._bodies[model.name] = json.loads(http_response.content or b"{}")

    async def __call__(self, method: str, **kwargs: Any) -> dict[str, Any]:
        output: dict[str, Any] = await getattr(self.ivs, method)(**kwargs)
        name = self.ivs.sync.meta.method_to_api_mapping[method]
        wire = self._bodies.pop(name)
        shape = operation_model(self.ivs, name).output_shape
        assert shape is not None
        assert_matches(wire, shape, name)
        assert set(output) - {"ResponseMetadata"} == set(wire)
        return output

    async def error(self, method: str, **kwargs: Any) -> str:
        """The code of the error the call raises, after checking the model lists it for the operation."""
        name = self.ivs.sync.meta.method_to_api_mapping[method]
        code, _ = await modeled_error(self.ivs, name, getattr(self.ivs, method)(**kwargs))
        return code

    async def encoder(self, **kwargs: Any) -> str:
        return str((await self("create_encoder_configuration", **kwargs))["encoderConfiguration"]["arn"])

    async def stage(self) -> str:
        return str((await self("create_stage"))["stage"]["arn"])

    async def start(
        self, stage_arn: str, destinations: list[dict[str, Any]], **kwargs: Any
    ) -> dict[str, Any]:
        result = await self("start_composition", stageArn=stage_arn, destinations=destinations, **kwargs)
        composition: dict[str, Any] = result["composition"]
        return composition

    async def get(self, arn: str) -> dict[str, Any]:
        composition: dict[str, Any] = (await self("get_composition", arn=arn))["composition"]
        return composition

    async def reaches(self, arn: str, state: str, within: float = 10.0) -> dict[str, Any]:
        async def in_state() -> dict[str, Any] | None:
            composition = await self.get(arn)
            return composition if composition["state"] == state else None

        reached: dict[str, Any] = await eventually(in_state, f"{arn} {state}", within=within)
        return reached

    async def listed(self, **kwargs: Any) -> list[list[dict[str, Any]]]:
        """Every page of ListCompositions, following nextToken."""
        pages: list[list[dict[str, Any]]] = []
        while True:
            page = await self("list_compositions", **kwargs)
            pages.append(page["compositions"])
            if "nextToken" not in page:
                return pages
            kwargs["nextToken"] = page["nextToken"]


async def fail_knob(server: IvsLocalServer, **body: Any) -> tuple[int, str | None, Any]:
    status, code, answer = await post_raw(server, "/_emulator/compositions/fail", json.dumps(body).encode())
    return status, code, answer


def arns(summaries: list[dict[str, Any]]) -> list[str]:
    return [s["arn"] for s in summaries]


# --- the operations -------------------------------------------------------------------------------


async def test_the_operations_are_the_models_at_five_calls_a_second(ivslocal: IvsLocalServer) -> None:
    ivs = ivslocal.client()
    for name in COMPOSITION_OPERATIONS:
        model = operation_model(ivs, name)
        assert (model.http["method"], model.http["requestUri"]) == ("POST", f"/{name}")
        assert OPERATION_RATES[name] == 5.0


async def test_encoder_configurations_are_created_read_listed_and_deleted(ivslocal: IvsLocalServer) -> None:
    api = ModelClient(ivslocal)
    video = {"width": 1920, "height": 1080, "framerate": 25.0, "bitrate": 3_500_000}
    created = (
        await api(
            "create_encoder_configuration",
            name="overflow-1080p",
            video=video,
            tags={"fanout:tier": "overflow"},
        )
    )["encoderConfiguration"]
    assert ENCODER_ARN.fullmatch(created["arn"])
    assert created == {
        "arn": created["arn"],
        "name": "overflow-1080p",
        "video": video,
        "tags": {"fanout:tier": "overflow"},
    }
    assert (await api("get_encoder_configuration", arn=created["arn"]))["encoderConfiguration"] == created

    # Nothing given: the model's documented defaults, 1280x720 at 30 fps and 2.5 Mbps.
    bare = (await api("create_encoder_configuration"))["encoderConfiguration"]
    assert bare["video"] == DEFAULT_VIDEO
    assert "name" not in bare
    partial = (await api("create_encoder_configuration", video={"width": 640, "height": 360}))[
        "encoderConfiguration"
    ]
    assert partial["video"] == {**DEFAULT_VIDEO, "width": 640, "height": 360}

    first = await api("list_encoder_configurations", maxResults=2)
    assert [c["arn"] for c in first["encoderConfigurations"]] == [created["arn"], bare["arn"]]
    assert first["encoderConfigurations"][0] == {
        "arn": created["arn"],
        "name": "overflow-1080p",
        "tags": {"fanout:tier": "overflow"},
    }
    second = await api("list_encoder_configurations", maxResults=2, nextToken=first["nextToken"])
    assert [c["arn"] for c in second["encoderConfigurations"]] == [partial["arn"]]
    assert "nextToken" not in second

    await api("delete_encoder_configuration", arn=bare["arn"])
    assert await api.error("get_encoder_configuration", arn=bare["arn"]) == "ResourceNotFoundException"
    assert await api.error("delete_encoder_configuration", arn=bare["arn"]) == "ResourceNotFoundException"
    assert await api.error("get_encoder_configuration", arn=MISSING_ENCODER) == "ResourceNotFoundException"
    listed = (await api("list_encoder_configurations"))["encoderConfigurations"]
    assert [c["arn"] for c in listed] == [created["arn"], partial["arn"]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"video": {"width": 1281, "height": 720}},
        {"video": {"width": 1280, "height": 721}},
        # Each side is within 2..1920, but 1920x1920 is over the 2,073,600-pixel ceiling.
        {"video": {"width": 1920, "height": 1920}},
        {"name": "has space"},
    ],
)
async def test_encoder_configuration_inputs_are_checked_by_the_server(
    ivslocal: IvsLocalServer, kwargs: dict[str, Any]
) -> None:
    api = ModelClient(ivslocal)
    assert await api.error("create_encoder_configuration", **kwargs) == "ValidationException"
    assert (await api("list_encoder_configurations"))["encoderConfigurations"] == []


@pytest.mark.parametrize(
    "body",
    [
        {"video": {"framerate": 61}},
        {"video": {"framerate": 0.5}},
        {"video": {"bitrate": 8_500_001}},
        {"video": {"width": "wide"}},
        {"video": "1080p"},
        {"maxResults": 101},
    ],
)
async def test_encoder_configuration_ranges_are_checked_for_clients_other_than_boto3(
    ivslocal: IvsLocalServer, body: dict[str, Any]
) -> None:
    # boto3 refuses to send these; a client that does not check gets the same answer IVS would give.
    operation = "ListEncoderConfigurations" if "maxResults" in body else "CreateEncoderConfiguration"
    status, code, answer = await post_raw(ivslocal, f"/{operation}", json.dumps(body).encode())
    assert (status, code) == (400, "ValidationException")
    assert answer["message"]


async def test_the_twenty_first_encoder_configuration_is_over_quota(ivslocal: IvsLocalServer) -> None:
    api = ModelClient(ivslocal)
    created = [await api.encoder() for _ in range(20)]
    assert await api.error("create_encoder_configuration") == "ServiceQuotaExceededException"
    # The default page is 100, so one page holds them all.
    listed = await api("list_encoder_configurations")
    assert [c["arn"] for c in listed["encoderConfigurations"]] == created
    assert "nextToken" not in listed
    await api("delete_encoder_configuration", arn=created[0])
    await api.encoder()


async def test_encoder_configurations_list_a_hundred_a_page_by_default() -> None:
    async with running_ivslocal(Settings(port=0, encoder_configuration_quota=150)) as server:
        for _ in range(101):
            server.state.create_encoder_configuration()
        api = ModelClient(server)
        first = await api("list_encoder_configurations")
        assert len(first["encoderConfigurations"]) == 100
        second = await api("list_encoder_configurations", nextToken=first["nextToken"])
        assert len(second["encoderConfigurations"]) == 1


# --- compositions ---------------------------------------------------------------------------------


async def test_a_composition_starts_goes_active_and_stops_through_its_states() -> None:
    async with running_ivslocal(QUICK) as server:
        api = ModelClient(server)
        encoder = await api.encoder(name="hd")
        stage = await api.stage()
        started = await api.start(
            stage,
            [to_channel(1, encoder, name="overflow"), to_s3(encoder)],
            tags={"fanout:room": "main"},
        )
        assert COMPOSITION_ARN.fullmatch(started["arn"])
        assert started["stageArn"] == stage
        assert started["state"] == "STARTING"
        assert started["tags"] == {"fanout:room": "main"}
        assert started["layout"] == {"grid": DEFAULT_GRID}
        assert isinstance(started["startTime"], datetime)
        assert "endTime" not in started
        channel, s3 = started["destinations"]
        assert channel["configuration"] == {
            "name": "overflow",
            "channel": {"channelArn": channel_arn(1), "encoderConfigurationArn": encoder},
        }
        assert s3["configuration"] == {
            "name": "",
            "s3": {
                "storageConfigurationArn": STORAGE,
                "encoderConfigurationArns": [encoder],
                "recordingConfiguration": {"format": "HLS"},
            },
        }
        composition_id, stage_id = started["arn"].rsplit("/", 1)[1], stage.rsplit("/", 1)[1]
        assert s3["detail"] == {
            "s3": {"recordingPrefix": f"{stage_id}/{composition_id}/{s3['id']}/composite"}
        }
        assert "detail" not in channel
        for destination in (channel, s3):
            assert re.fullmatch(r"[a-zA-Z0-9]{12}", destination["id"])
            assert destination["state"] == "STARTING"
            assert "startTime" not in destination and "endTime" not in destination
        assert channel["id"] != s3["id"]

        # Callers see STARTING before ACTIVE.
        assert (await api.get(started["arn"]))["state"] == "STARTING"
        active = await api.reaches(started["arn"], "ACTIVE")
        assert [d["state"] for d in active["destinations"]] == ["ACTIVE", "ACTIVE"]
        assert all(d["startTime"] >= started["startTime"] for d in active["destinations"])
        assert active["startTime"] == started["startTime"]
        assert [d["configuration"] for d in active["destinations"]] == [
            d["configuration"] for d in started["destinations"]
        ]

        [[summary]] = await api.listed()
        assert summary == {
            "arn": started["arn"],
            "stageArn": stage,
            "state": "ACTIVE",
            "tags": {"fanout:room": "main"},
            "startTime": started["startTime"],
            "destinations": [
                {"id": d["id"], "state": "ACTIVE", "startTime": d["startTime"]}
                for d in active["destinations"]
            ],
        }

        assert set(await api("stop_composition", arn=started["arn"])) == {"ResponseMetadata"}
        stopping = await api.get(started["arn"])
        assert stopping["state"] == "STOPPING"
        assert [d["state"] for d in stopping["destinations"]] == ["STOPPING", "STOPPING"]
        stopped = await api.reaches(started["arn"], "STOPPED")
        assert [d["state"] for d in stopped["destinations"]] == ["STOPPED", "STOPPED"]
        assert stopped["endTime"] >= stopped["startTime"]
        assert all(d["endTime"] == stopped["endTime"] for d in stopped["destinations"])
        # Stopped compositions stay listed (as in AWS, until deleted a few minutes later).
        assert [s["state"] for [s] in await api.listed()] == ["STOPPED"]
        assert await api.error("stop_composition", arn=started["arn"]) == "ConflictException"
        assert await api.error("get_composition", arn=MISSING_COMPOSITION) == "ResourceNotFoundException"
        assert await api.error("stop_composition", arn=MISSING_COMPOSITION) == "ResourceNotFoundException"


async def test_layouts_fill_in_the_models_defaults(ivslocal: IvsLocalServer) -> None:
    api = ModelClient(ivslocal)
    stage = await api.stage()
    pip = await api.start(
        stage,
        [to_channel(1)],
        layout={"pip": {"featuredParticipantAttribute": "host", "pipPosition": "TOP_LEFT", "pipWidth": 320}},
    )
    assert pip["layout"] == {
        "pip": {
            **DEFAULT_PIP,
            "featuredParticipantAttribute": "host",
            "pipPosition": "TOP_LEFT",
            "pipWidth": 320,
        }
    }
    grid_given = {
        "videoAspectRatio": "SQUARE",
        "gridGap": 0,
        "videoFillMode": "CONTAIN",
        "participantOrderAttribute": "seat",
    }
    grid = await api.start(stage, [to_channel(2)], layout={"grid": grid_given})
    assert grid["layout"] == {"grid": {**DEFAULT_GRID, **grid_given}}
    empty = await api.start(stage, [to_channel(3)], layout={})
    assert empty["layout"] == {"grid": DEFAULT_GRID}
    assert (await api.get(pip["arn"]))["layout"] == pip["layout"]


@pytest.mark.parametrize(
    "kwargs",
    [
        # "either one destination (channel or s3) or two (one channel and one s3)"
        {"destinations": [to_channel(1), to_channel(2)]},
        {"destinations": [{"channel": {"channelArn": channel_arn(1)}, "s3": to_s3(MISSING_ENCODER)["s3"]}]},
        {"destinations": [{"name": "nothing"}]},
        {"destinations": [{"channel": {"channelArn": MISSING_STAGE}}]},
        {
            "destinations": [
                {"channel": {"channelArn": channel_arn(1), "encoderConfigurationArn": MISSING_STAGE}}
            ]
        },
        {"destinations": [{**to_channel(1), "name": "has space"}]},
        {
            "destinations": [
                {"s3": {**to_s3(MISSING_ENCODER)["s3"], "recordingConfiguration": {"format": "MP4"}}}
            ]
        },
        {
            "destinations": [
                {"s3": {**to_s3(MISSING_ENCODER)["s3"], "storageConfigurationArn": channel_arn(1)}}
            ]
        },
        {"layout": {"grid": {}, "pip": {}}},
        {"layout": {"grid": {"videoAspectRatio": "WIDE"}}},
        {"layout": {"grid": {"featuredParticipantAttribute": "not an attribute"}}},
        {"layout": {"pip": {"pipPosition": "MIDDLE"}}},
        {"layout": {"pip": {"pipBehavior": "BOUNCY"}}},
        {"idempotencyToken": "has space"},
    ],
)
async def test_start_composition_inputs_are_checked_by_the_server(
    ivslocal: IvsLocalServer, kwargs: dict[str, Any]
) -> None:
    api = ModelClient(ivslocal)
    request = {"stageArn": await api.stage(), "destinations": [to_channel(1)], **kwargs}
    assert await api.error("start_composition", **request) == "ValidationException"
    assert await api.listed() == [[]]


@pytest.mark.parametrize(
    "destinations",
    [None, [], "channel", [{"channel": {"channelArn": channel_arn(1)}}] * 3],
)
async def test_start_composition_destinations_are_checked_for_clients_other_than_boto3(
    ivslocal: IvsLocalServer, destinations: Any
) -> None:
    stage = (await ivslocal.client().create_stage())["stage"]["arn"]
    body: dict[str, Any] = {"stageArn": stage}
    if destinations is not None:
        body["destinations"] = destinations
    status, code, _ = await post_raw(ivslocal, "/StartComposition", json.dumps(body).encode())
    assert (status, code) == (400, "ValidationException")


async def test_start_composition_needs_an_existing_stage_and_encoder_configurations(
    ivslocal: IvsLocalServer,
) -> None:
    api = ModelClient(ivslocal)
    stage = await api.stage()
    encoder = await api.encoder()
    assert await api.error("start_composition", stageArn=MISSING_STAGE, destinations=[to_channel(1)]) == (
        "ResourceNotFoundException"
    )
    for destinations in ([to_channel(1, MISSING_ENCODER)], [to_channel(1, encoder), to_s3(MISSING_ENCODER)]):
        assert await api.error("start_composition", stageArn=stage, destinations=destinations) == (
            "ResourceNotFoundException"
        )
    await api("delete_stage", arn=stage)
    assert await api.error("start_composition", stageArn=stage, destinations=[to_channel(1)]) == (
        "ResourceNotFoundException"
    )
    assert await api.listed() == [[]]


async def test_five_compositions_per_stage_and_twenty_per_account() -> None:
    async with running_ivslocal(Settings(port=0, composition_transition_seconds=0.05)) as server:
        api = ModelClient(server)
        stages = [await api.stage() for _ in range(5)]
        started: list[str] = []
        for index in range(5):
            started.append((await api.start(stages[0], [to_channel(index)]))["arn"])
        assert await api.error("start_composition", stageArn=stages[0], destinations=[to_channel(99)]) == (
            "ServiceQuotaExceededException"
        )
        for stage_number in (1, 2, 3):
            for index in range(5):
                channel = 10 * stage_number + index
                started.append((await api.start(stages[stage_number], [to_channel(channel)]))["arn"])
        assert len(started) == 20
        # The fifth Stage has room, the account has none.
        assert await api.error("start_composition", stageArn=stages[4], destinations=[to_channel(99)]) == (
            "ServiceQuotaExceededException"
        )
        # A stopping composition still holds its slot; a stopped one frees it.
        await api("stop_composition", arn=started[0])
        await api.reaches(started[0], "STOPPED")
        replacement = await api.start(stages[4], [to_channel(99)])
        assert await api.error("start_composition", stageArn=stages[4], destinations=[to_channel(98)]) == (
            "ServiceQuotaExceededException"
        )
        # A failed one frees it too.
        assert (await fail_knob(server, arn=started[5]))[0] == 200
        await api.start(stages[4], [to_channel(98)])
        await api.reaches(replacement["arn"], "ACTIVE")


async def test_list_compositions_is_newest_first_paginated_and_filtered(ivslocal: IvsLocalServer) -> None:
    api = ModelClient(ivslocal)
    stage_a, stage_b, idle_stage = await api.stage(), await api.stage(), await api.stage()
    first_encoder, second_encoder = await api.encoder(), await api.encoder()
    c1 = (await api.start(stage_a, [to_channel(1, first_encoder)]))["arn"]
    c2 = (await api.start(stage_a, [to_s3(second_encoder)]))["arn"]
    c3 = (await api.start(stage_b, [to_channel(3)]))["arn"]
    c4 = (await api.start(stage_b, [to_channel(4, second_encoder), to_s3(first_encoder)]))["arn"]

    pages = await api.listed(maxResults=3)
    assert [len(p) for p in pages] == [3, 1]
    assert [s["arn"] for p in pages for s in p] == [c4, c3, c2, c1]
    assert [arns(p) for p in await api.listed(filterByStageArn=stage_a)] == [[c2, c1]]
    assert [arns(p) for p in await api.listed(filterByStageArn=stage_b, maxResults=1)] == [[c4], [c3]]
    assert [arns(p) for p in await api.listed(filterByEncoderConfigurationArn=first_encoder)] == [[c4, c1]]
    assert [arns(p) for p in await api.listed(filterByEncoderConfigurationArn=second_encoder)] == [[c4, c2]]
    both = await api.listed(filterByStageArn=stage_a, filterByEncoderConfigurationArn=second_encoder)
    assert [arns(p) for p in both] == [[c2]]
    assert await api.listed(filterByStageArn=idle_stage) == [[]]
    assert await api.listed(filterByStageArn=MISSING_STAGE) == [[]]

    for kwargs in (
        {"nextToken": "garbage"},
        {"filterByStageArn": channel_arn(1)},
        {"filterByEncoderConfigurationArn": MISSING_STAGE},
    ):
        assert await api.error("list_compositions", **kwargs) == "ValidationException"
    assert (await post_raw(ivslocal, "/ListCompositions", b'{"maxResults": 0}'))[:2] == (
        400,
        "ValidationException",
    )


async def test_compositions_list_a_hundred_a_page_by_default() -> None:
    settings = Settings(port=0, composition_quota=150, compositions_per_stage=150)
    async with running_ivslocal(settings) as server:
        stage = (await server.client().create_stage())["stage"]["arn"]
        for index in range(101):
            server.state.start_composition(stage, [to_channel(index)])
        api = ModelClient(server)
        first = await api("list_compositions")
        assert len(first["compositions"]) == 100
        second = await api("list_compositions", nextToken=first["nextToken"])
        assert len(second["compositions"]) == 1


async def test_an_encoder_configuration_in_use_cannot_be_deleted() -> None:
    async with running_ivslocal(QUICK) as server:
        api = ModelClient(server)
        stage = await api.stage()
        for_channel, for_s3, unused = await api.encoder(), await api.encoder(), await api.encoder()
        composition = await api.start(stage, [to_channel(1, for_channel), to_s3(for_s3)])
        for arn in (for_channel, for_s3):
            assert await api.error("delete_encoder_configuration", arn=arn) == "ConflictException"
        await api("delete_encoder_configuration", arn=unused)
        await api("stop_composition", arn=composition["arn"])
        assert await api.error("delete_encoder_configuration", arn=for_channel) == "ConflictException"
        await api.reaches(composition["arn"], "STOPPED")
        await api("delete_encoder_configuration", arn=for_channel)
        await api("delete_encoder_configuration", arn=for_s3)
        # The stopped composition still reads back with the ARNs it was started with.
        assert (await api.get(composition["arn"]))["destinations"][0]["configuration"]["channel"] == {
            "channelArn": channel_arn(1),
            "encoderConfigurationArn": for_channel,
        }


async def test_deleting_a_stage_stops_its_compositions() -> None:
    async with running_ivslocal(QUICK) as server:
        api = ModelClient(server)
        doomed, kept = await api.stage(), await api.stage()
        on_doomed = [(await api.start(doomed, [to_channel(n)]))["arn"] for n in (1, 2)]
        on_kept = (await api.start(kept, [to_channel(3)]))["arn"]
        for arn in [*on_doomed, on_kept]:
            await api.reaches(arn, "ACTIVE")
        await api("delete_stage", arn=doomed)
        for arn in on_doomed:
            assert (await api.get(arn))["state"] == "STOPPING"
        for arn in on_doomed:
            stopped = await api.reaches(arn, "STOPPED")
            assert [d["state"] for d in stopped["destinations"]] == ["STOPPED"]
            assert stopped["stageArn"] == doomed
        assert (await api.get(on_kept))["state"] == "ACTIVE"
        assert [s["state"] for p in await api.listed(filterByStageArn=doomed) for s in p] == [
            "STOPPED",
            "STOPPED",
        ]


async def test_the_failure_knob_fails_a_composition_and_its_destinations() -> None:
    async with running_ivslocal(QUICK) as server:
        api = ModelClient(server)
        stage, encoder = await api.stage(), await api.encoder()
        whole = await api.start(stage, [to_channel(1, encoder), to_s3(encoder)])
        await api.reaches(whole["arn"], "ACTIVE")

        status, code, answer = await fail_knob(server, arn=whole["arn"])
        assert (status, code) == (200, None)
        assert answer["composition"]["state"] == "FAILED"
        failed = await api.get(whole["arn"])
        assert failed["state"] == "FAILED"
        assert [d["state"] for d in failed["destinations"]] == ["FAILED", "FAILED"]
        assert all(d["endTime"] == failed["endTime"] for d in failed["destinations"])
        [[summary]] = await api.listed()
        assert summary["state"] == "FAILED"
        assert [d["state"] for d in summary["destinations"]] == ["FAILED", "FAILED"]
        assert await api.error("stop_composition", arn=whole["arn"]) == "ConflictException"
        assert (await fail_knob(server, arn=whole["arn"]))[:2] == (409, "ConflictException")

        # One destination only: the other stops.
        partial = await api.start(stage, [to_channel(2, encoder), to_s3(encoder)])
        channel_id = partial["destinations"][0]["id"]
        assert (await fail_knob(server, arn=partial["arn"], destinationId=channel_id))[0] == 200
        partly = await api.get(partial["arn"])
        assert partly["state"] == "FAILED"
        assert [d["state"] for d in partly["destinations"]] == ["FAILED", "STOPPED"]

        assert (await fail_knob(server, arn=MISSING_COMPOSITION))[:2] == (404, "ResourceNotFoundException")
        assert (await fail_knob(server, arn=stage))[:2] == (400, "ValidationException")
        third = await api.start(stage, [to_channel(3)])
        assert (await fail_knob(server, arn=third["arn"], destinationId="nope"))[:2] == (
            404,
            "ResourceNotFoundException",
        )
        assert (await api.get(third["arn"]))["state"] in ("STARTING", "ACTIVE")


async def test_a_composition_stops_itself_a_while_after_its_stage_stops_publishing() -> None:
    settings = Settings(port=0, composition_transition_seconds=0.1, composition_idle_timeout_seconds=0.8)
    async with running_ivslocal(settings) as server, broadcasting(server) as show:
        api = ModelClient(server)
        # Nobody publishes on an empty Stage: it stops after the timeout, counted from the start.
        empty = await api.start(await api.stage(), [to_channel(1)])
        stopped = await api.reaches(empty["arn"], "STOPPED")
        assert stopped["endTime"] - stopped["startTime"] >= timedelta(seconds=0.8)

        # The broadcaster publishes on its Stage, and its replica on another: both keep going.
        [replica_stage] = await show.stages(1)
        await show.replicate(replica_stage)
        on_source = await api.start(show.source, [to_channel(2)])
        on_replica = await api.start(replica_stage, [to_channel(3)])
        await asyncio.sleep(1.5)
        assert (await api.get(on_source["arn"]))["state"] == "ACTIVE"
        assert (await api.get(on_replica["arn"]))["state"] == "ACTIVE"

        # Publishing stops (the replica with it): both stop once the timeout has passed.
        await show.set_publishing(False)
        for arn in (on_source["arn"], on_replica["arn"]):
            assert (await api.get(arn))["state"] == "ACTIVE"
        for arn in (on_source["arn"], on_replica["arn"]):
            assert [d["state"] for d in (await api.reaches(arn, "STOPPED"))["destinations"]] == ["STOPPED"]


async def test_a_channel_already_broadcasting_fails_the_later_destination() -> None:
    async with running_ivslocal(QUICK) as server:
        api = ModelClient(server)
        stage, encoder = await api.stage(), await api.encoder()
        first = await api.start(stage, [to_channel(1)])
        await api.reaches(first["arn"], "ACTIVE")
        alone = await api.start(stage, [to_channel(1)])
        failed = await api.reaches(alone["arn"], "FAILED")
        assert [d["state"] for d in failed["destinations"]] == ["FAILED"]
        with_s3 = await api.start(stage, [to_channel(1), to_s3(encoder)])
        mixed = await api.reaches(with_s3["arn"], "ACTIVE")
        assert [d["state"] for d in mixed["destinations"]] == ["FAILED", "ACTIVE"]
        await api("stop_composition", arn=first["arn"])
        await api.reaches(first["arn"], "STOPPED")
        again = await api.start(stage, [to_channel(1)])
        assert [d["state"] for d in (await api.reaches(again["arn"], "ACTIVE"))["destinations"]] == ["ACTIVE"]


async def test_an_idempotency_token_returns_the_same_composition(ivslocal: IvsLocalServer) -> None:
    api = ModelClient(ivslocal)
    stage = await api.stage()
    first = await api.start(stage, [to_channel(1)], idempotencyToken="retry-1")
    again = await api.start(stage, [to_channel(1)], idempotencyToken="retry-1")
    assert again["arn"] == first["arn"]
    assert await api.error(
        "start_composition", stageArn=stage, destinations=[to_channel(2)], idempotencyToken="retry-1"
    ) == ("ConflictException")
    # boto3 fills in a fresh token for every call that gives none: two calls, two compositions.
    await api.start(stage, [to_channel(3)])
    await api.start(stage, [to_channel(4)])
    assert len([s for p in await api.listed() for s in p]) == 3


async def test_compositions_and_encoder_configurations_take_tags(ivslocal: IvsLocalServer) -> None:
    api = ModelClient(ivslocal)
    encoder = await api.encoder(tags={"a": "1"})
    composition = (await api.start(await api.stage(), [to_channel(1, encoder)], tags={"b": "2"}))["arn"]
    for arn, before in ((encoder, {"a": "1"}), (composition, {"b": "2"})):
        assert (await api("list_tags_for_resource", resourceArn=arn))["tags"] == before
        await api("tag_resource", resourceArn=arn, tags={"fanout:tier": "overflow", "x": "y"})
        await api("untag_resource", resourceArn=arn, tagKeys=["x"])
        assert (await api("list_tags_for_resource", resourceArn=arn))["tags"] == {
            **before,
            "fanout:tier": "overflow",
        }
    assert (await api.get(composition))["tags"] == {"b": "2", "fanout:tier": "overflow"}
    assert [s["tags"] for p in await api.listed() for s in p] == [{"b": "2", "fanout:tier": "overflow"}]
    [summary] = (await api("list_encoder_configurations"))["encoderConfigurations"]
    assert summary["tags"] == {"a": "1", "fanout:tier": "overflow"}
    for arn in (MISSING_COMPOSITION, MISSING_ENCODER):
        assert await api.error("list_tags_for_resource", resourceArn=arn) == "ResourceNotFoundException"


async def test_ended_compositions_are_deleted_after_the_retention() -> None:
    settings = Settings(port=0, composition_transition_seconds=0.05, composition_retention_seconds=0.5)
    async with running_ivslocal(settings) as server:
        api = ModelClient(server)
        stage = await api.stage()
        composition = await api.start(stage, [to_channel(1)], idempotencyToken="once")
        await api("stop_composition", arn=composition["arn"])
        await api.reaches(composition["arn"], "STOPPED")

        async def gone() -> bool:
            try:
                await api.get(composition["arn"])
            except ClientError as error:
                return bool(error.response["Error"]["Code"] == "ResourceNotFoundException")
            return False

        await eventually(gone, "the stopped composition deleted")
        assert await api.listed() == [[]]
        # Its idempotency token went with it.
        assert (await api.start(stage, [to_channel(1)], idempotencyToken="once"))["arn"] != composition["arn"]


async def test_composition_calls_are_throttled_at_five_a_second() -> None:
    async with running_ivslocal(Settings(port=0, rate_limits=True)) as server:
        api = ModelClient(server, retries=False)
        outcomes = []
        for _ in range(12):
            try:
                await api("list_compositions")
                outcomes.append("ok")
            except ClientError as error:
                outcomes.append(error.response["Error"]["Code"])
        assert outcomes[:5] == ["ok"] * 5
        assert "ThrottlingException" in outcomes
        assert server.stats.throttles["ListCompositions"] == outcomes.count("ThrottlingException")
        # Buckets are per operation.
        await api("list_encoder_configurations")
        async with aiohttp.ClientSession() as http, http.get(server.url + "/_emulator/stats") as response:
            stats = await response.json()
        assert stats["calls"]["ListCompositions"] == 12
