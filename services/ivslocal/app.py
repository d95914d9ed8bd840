"""The emulator's HTTP transport: ivs-realtime REST-JSON routes over the IvsState core."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from services.common.ivs_quotas import OPERATION_RATES
from services.common.logs import protect_websocket_tokens
from services.ivslocal import wire
from services.ivslocal.composer import CompositionMedia
from services.ivslocal.config import Settings
from services.ivslocal.errors import IvsApiError, ThrottlingError, UnknownOperationError, ValidationError
from services.ivslocal.eventbridge import SqsEventSender, forward_stage_updates, make_sqs_client
from services.ivslocal.events import SOCKETS_KEY, StageSockets, events_handler
from services.ivslocal.model import IvsState, stage_endpoints
from services.ivslocal.ratelimit import CallStats, RateLimiter
from services.ivslocal.wire import Body

log = logging.getLogger(__name__)

STATE_KEY = web.AppKey("ivslocal_state", IvsState)
STATS_KEY = web.AppKey("ivslocal_stats", CallStats)
LIMITER_KEY = web.AppKey("ivslocal_limiter", RateLimiter)
MEDIA_KEY = web.AppKey("ivslocal_composition_media", CompositionMedia)
_OPERATION = web.RequestKey("ivslocal_operation", str)
SETTLE_INTERVAL_SECONDS = 0.25

Operation = Callable[[IvsState, Body, str], dict[str, Any]]


# --- operations: decode -> call the core -> encode --------------------------------------------------


def _create_stage(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    stage, tokens = state.create_stage(
        name=body.text("name"),
        tags=body.text_map("tags"),
        participant_token_configurations=body.token_requests("participantTokenConfigurations"),
        recording_configuration=body.mapping("autoParticipantRecordingConfiguration"),
        host=host,
    )
    return {
        "stage": wire.stage_json(stage, stage_endpoints(host)),
        "participantTokens": [wire.participant_token_json(t) for t in tokens],
    }


def _get_stage(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    stage = state.get_stage(body.required_text("arn"))
    return {"stage": wire.stage_json(stage, stage_endpoints(host))}


def _list_stages(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    page = state.list_stages(next_token=body.text("nextToken"), max_results=body.integer("maxResults"))
    return _page("stages", [wire.stage_summary_json(s) for s in page.items], page.next_token)


def _update_stage(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    stage = state.update_stage(
        body.required_text("arn"),
        name=body.text("name"),
        recording_configuration=body.mapping("autoParticipantRecordingConfiguration"),
    )
    return {"stage": wire.stage_json(stage, stage_endpoints(host))}


def _delete_stage(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    state.delete_stage(body.required_text("arn"))
    return {}


def _create_participant_token(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    issued = state.create_participant_token(
        body.required_text("stageArn"), wire.token_request(body), host=host
    )
    return {"participantToken": wire.participant_token_json(issued)}


def _import_public_key(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    public_key = state.import_public_key(
        body.required_text("publicKeyMaterial"), name=body.text("name"), tags=body.text_map("tags")
    )
    return {"publicKey": wire.public_key_json(public_key)}


def _get_public_key(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    return {"publicKey": wire.public_key_json(state.get_public_key(body.required_text("arn")))}


def _list_public_keys(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    page = state.list_public_keys(next_token=body.text("nextToken"), max_results=body.integer("maxResults"))
    return _page("publicKeys", [wire.public_key_summary_json(k) for k in page.items], page.next_token)


def _delete_public_key(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    state.delete_public_key(body.required_text("arn"))
    return {}


def _list_stage_sessions(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    page = state.list_stage_sessions(
        body.required_text("stageArn"),
        next_token=body.text("nextToken"),
        max_results=body.integer("maxResults"),
    )
    return _page("stageSessions", [wire.stage_session_json(s) for s in page.items], page.next_token)


def _get_stage_session(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    session = state.get_stage_session(body.required_text("stageArn"), body.required_text("sessionId"))
    return {"stageSession": wire.stage_session_json(session)}


def _list_participants(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    page = state.list_participants(
        body.required_text("stageArn"),
        body.required_text("sessionId"),
        filter_by_user_id=body.text("filterByUserId"),
        filter_by_published=body.boolean("filterByPublished"),
        filter_by_state=body.text("filterByState"),
        filter_by_recording_state=body.text("filterByRecordingState"),
        next_token=body.text("nextToken"),
        max_results=body.integer("maxResults"),
    )
    return _page("participants", [wire.participant_summary_json(p) for p in page.items], page.next_token)


def _get_participant(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    participant = state.get_participant(
        body.required_text("stageArn"), body.required_text("sessionId"), body.required_text("participantId")
    )
    return {"participant": wire.participant_json(participant)}


def _disconnect_participant(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    state.disconnect_participant(
        body.required_text("stageArn"), body.required_text("participantId"), reason=body.text("reason")
    )
    return {}


def _list_participant_events(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    page = state.list_participant_events(
        body.required_text("stageArn"),
        body.required_text("sessionId"),
        body.required_text("participantId"),
        next_token=body.text("nextToken"),
        max_results=body.integer("maxResults"),
    )
    return _page("events", [wire.participant_event_json(e) for e in page.items], page.next_token)


def _start_participant_replication(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    state.start_participant_replication(
        body.required_text("sourceStageArn"),
        body.required_text("destinationStageArn"),
        body.required_text("participantId"),
        reconnect_window_seconds=body.integer("reconnectWindowSeconds"),
        attributes=body.text_map("attributes"),
    )
    # The model's output is response headers only.
    return {}


def _stop_participant_replication(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    state.stop_participant_replication(
        body.required_text("sourceStageArn"),
        body.required_text("destinationStageArn"),
        body.required_text("participantId"),
    )
    return {}


def _list_participant_replicas(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    page = state.list_participant_replicas(
        body.required_text("sourceStageArn"),
        body.required_text("participantId"),
        next_token=body.text("nextToken"),
        max_results=body.integer("maxResults"),
    )
    return _page("replicas", [wire.participant_replica_json(r) for r in page.items], page.next_token)


def _create_encoder_configuration(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    configuration = state.create_encoder_configuration(
        name=body.text("name"), video=body.mapping("video"), tags=body.text_map("tags")
    )
    return {"encoderConfiguration": wire.encoder_configuration_json(configuration)}


def _get_encoder_configuration(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    configuration = state.get_encoder_configuration(body.required_text("arn"))
    return {"encoderConfiguration": wire.encoder_configuration_json(configuration)}


def _list_encoder_configurations(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    page = state.list_encoder_configurations(
        next_token=body.text("nextToken"), max_results=body.integer("maxResults")
    )
    summaries = [wire.encoder_configuration_summary_json(c) for c in page.items]
    return _page("encoderConfigurations", summaries, page.next_token)


def _delete_encoder_configuration(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    state.delete_encoder_configuration(body.required_text("arn"))
    return {}


def _start_composition(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    destinations = body.objects("destinations")
    if destinations is None:
        raise ValidationError("destinations is required")
    composition = state.start_composition(
        body.required_text("stageArn"),
        destinations,
        layout=body.mapping("layout"),
        tags=body.text_map("tags"),
        idempotency_token=body.text("idempotencyToken"),
    )
    return {"composition": wire.composition_json(composition)}


def _get_composition(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    return {"composition": wire.composition_json(state.get_composition(body.required_text("arn")))}


def _list_compositions(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    page = state.list_compositions(
        filter_by_stage_arn=body.text("filterByStageArn"),
        filter_by_encoder_configuration_arn=body.text("filterByEncoderConfigurationArn"),
        next_token=body.text("nextToken"),
        max_results=body.integer("maxResults"),
    )
    return _page("compositions", [wire.composition_summary_json(c) for c in page.items], page.next_token)


def _stop_composition(state: IvsState, body: Body, host: str) -> dict[str, Any]:
    state.stop_composition(body.required_text("arn"))
    return {}


def _page(name: str, items: list[dict[str, Any]], next_token: str | None) -> dict[str, Any]:
    result: dict[str, Any] = {name: items}
    if next_token is not None:
        result["nextToken"] = next_token
    return result


OPERATIONS: dict[str, Operation] = {
    "CreateStage": _create_stage,
    "GetStage": _get_stage,
    "ListStages": _list_stages,
    "UpdateStage": _update_stage,
    "DeleteStage": _delete_stage,
    "CreateParticipantToken": _create_participant_token,
    "ImportPublicKey": _import_public_key,
    "GetPublicKey": _get_public_key,
    "ListPublicKeys": _list_public_keys,
    "DeletePublicKey": _delete_public_key,
    "ListStageSessions": _list_stage_sessions,
    "GetStageSession": _get_stage_session,
    "ListParticipants": _list_participants,
    "GetParticipant": _get_participant,
    "DisconnectParticipant": _disconnect_participant,
    "ListParticipantEvents": _list_participant_events,
    "StartParticipantReplication": _start_participant_replication,
    "StopParticipantReplication": _stop_participant_replication,
    "ListParticipantReplicas": _list_participant_replicas,
    "CreateEncoderConfiguration": _create_encoder_configuration,
    "GetEncoderConfiguration": _get_encoder_configuration,
    "ListEncoderConfigurations": _list_encoder_configurations,
    "DeleteEncoderConfiguration": _delete_encoder_configuration,
    "StartComposition": _start_composition,
    "GetComposition": _get_composition,
    "ListCompositions": _list_compositions,
    "StopComposition": _stop_composition,
}


# --- aiohttp handlers -------------------------------------------------------------------------------


def _begin(request: web.Request, operation: str) -> IvsState:
    """Counts the call and applies the operation's rate limit before any work is done."""
    request[_OPERATION] = operation
    request.app[STATS_KEY].calls[operation] += 1
    limiter = request.app.get(LIMITER_KEY)
    if limiter is not None and not limiter.allow(operation):
        request.app[STATS_KEY].throttles[operation] += 1
        raise ThrottlingError(f"Rate exceeded for {operation}")
    return request.app[STATE_KEY]


def _ok(result: dict[str, Any]) -> web.Response:
    return web.json_response(result, headers={"x-amzn-RequestId": str(uuid.uuid4())})


async def operation_handler(request: web.Request) -> web.Response:
    name = request.match_info["operation"]
    operation = OPERATIONS.get(name)
    if operation is None:
        raise UnknownOperationError(f"Operation {name} is not supported by the emulator")
    state = _begin(request, name)
    body = Body.parse(await request.read())
    return _ok(operation(state, body, request.host))


async def tag_resource_handler(request: web.Request) -> web.Response:
    state = _begin(request, "TagResource")
    tags = Body.parse(await request.read()).text_map("tags")
    if tags is None:
        raise ValidationError("tags is required")
    state.tag_resource(request.match_info["resource_arn"], tags)
    return _ok({})


async def untag_resource_handler(request: web.Request) -> web.Response:
    state = _begin(request, "UntagResource")
    if "tagKeys" not in request.query:
        raise ValidationError("tagKeys is required")
    state.untag_resource(request.match_info["resource_arn"], request.query.getall("tagKeys"))
    return _ok({})


async def list_tags_handler(request: web.Request) -> web.Response:
    state = _begin(request, "ListTagsForResource")
    return _ok({"tags": state.list_tags_for_resource(request.match_info["resource_arn"])})


async def stats_handler(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS_KEY].as_dict())


async def fail_composition_handler(request: web.Request) -> web.Response:
    """Test knob, not an IVS operation: `{"arn", "destinationId"?}` sends the composition to FAILED with
    that destination (or every one) FAILED, as when a broadcast fails past all retries."""
    body = Body.parse(await request.read())
    composition = request.app[STATE_KEY].fail_composition(
        body.required_text("arn"), destination_id=body.text("destinationId")
    )
    return _ok({"composition": wire.composition_json(composition)})


# What a player on another origin (a page on another loopback port) needs to fetch the stream.
_PLAYBACK_TYPES = {".m3u8": "application/vnd.apple.mpegurl", ".ts": "video/mp2t"}
_PLAYBACK_HEADERS = {"Access-Control-Allow-Origin": "*", "Cache-Control": "no-cache"}


async def playback_handler(request: web.Request) -> web.Response:
    """GET /_playback/{channelId}/{file}: a composition's HLS (index.m3u8 and its segments), which AWS
    would serve at the channel's playbackUrl; 404 until its first segment is written."""
    media = request.app.get(MEDIA_KEY)
    name = request.match_info["name"]
    body = None
    if media is not None:
        body = await asyncio.to_thread(media.read_playback_file, request.match_info["channel_id"], name)
    if body is None:
        why = "composition media is off" if media is None else "no stream here (yet)"
        return web.Response(status=404, text=f"{why}\n", headers=_PLAYBACK_HEADERS)
    content_type = _PLAYBACK_TYPES[name[name.rindex(".") :]]
    return web.Response(body=body, content_type=content_type, headers=_PLAYBACK_HEADERS)


async def token_key_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response({"kid": state.token_key_id, "publicKeyPem": state.token_public_key_pem})


def _error_response(error: IvsApiError) -> web.Response:
    # boto3 reads the code from the header and Error.Message only from "message"; the model names
    # the member "exceptionMessage", so both are sent (ivs-facts §2.0).
    return web.json_response(
        {"message": error.message, "exceptionMessage": error.message},
        status=error.status,
        headers={"x-amzn-ErrorType": error.code, "x-amzn-RequestId": str(uuid.uuid4())},
    )


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The one place where domain errors become HTTP answers; nothing escapes as a traceback."""
    try:
        return await handler(request)
    except IvsApiError as error:
        operation = request.get(_OPERATION)
        if operation is not None:
            request.app[STATS_KEY].errors[(operation, error.code)] += 1
        return _error_response(error)
    except web.HTTPException as error:
        if error.status in (404, 405):
            return _error_response(UnknownOperationError(f"No operation at {request.method} {request.path}"))
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _error_response(IvsApiError("Internal server error"))


async def _close_sockets(app: web.Application) -> None:
    app[SOCKETS_KEY].close()


async def _run_composition_media(app: web.Application) -> AsyncIterator[None]:
    media = app[MEDIA_KEY]
    await media.start()
    try:
        yield
    finally:
        await media.close()


async def _settle_periodically(app: web.Application) -> AsyncIterator[None]:
    """Time alone ends replications (reconnect windows) and sessions; this tells the sockets in time."""

    async def tick() -> None:
        while True:
            await asyncio.sleep(SETTLE_INTERVAL_SECONDS)
            try:
                app[STATE_KEY].settle()
            except Exception:
                log.exception("settling the emulator's state failed")

    task = asyncio.create_task(tick())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _stage_update_events(
    settings: Settings, queue_url: str
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Sends the `IVS Stage Update` events to the queue while the app runs."""

    async def send(app: web.Application) -> AsyncIterator[None]:
        sender = SqsEventSender(
            make_sqs_client(settings.events_sqs_region, settings.events_sqs_endpoint), queue_url
        )
        sender.start()
        stop_forwarding = forward_stage_updates(app[STATE_KEY], sender)
        log.info("sending IVS Stage Update events to %s", queue_url)
        try:
            yield
        finally:
            stop_forwarding()
            await sender.close()

    return send


def create_app(
    settings: Settings, state: IvsState | None = None, *, stats: CallStats | None = None
) -> web.Application:
    """The emulator's aiohttp app; pass `state` to share one IvsState with a test or the events socket."""
    # The SDK offers its token as a WebSocket subprotocol, which aiohttp would log on refusing it.
    protect_websocket_tokens()
    app = web.Application(middlewares=[error_middleware])
    app[STATE_KEY] = state if state is not None else IvsState(settings)
    app[STATS_KEY] = stats if stats is not None else CallStats()
    if settings.rate_limits:
        app[LIMITER_KEY] = RateLimiter(
            {operation: rate * settings.rate_scale for operation, rate in OPERATION_RATES.items()}
        )
    app[SOCKETS_KEY] = StageSockets(app[STATE_KEY])
    app.on_shutdown.append(_close_sockets)
    if settings.events_sqs_queue_url:
        # First in, so last out: the changes made while the app shuts down are still sent.
        app.cleanup_ctx.append(_stage_update_events(settings, settings.events_sqs_queue_url))
    app.cleanup_ctx.append(_settle_periodically)
    if settings.composition_media:
        media_dir = Path(settings.media_dir) if settings.media_dir else None
        app[MEDIA_KEY] = CompositionMedia(app[STATE_KEY], app[SOCKETS_KEY], media_dir)
        app.cleanup_ctx.append(_run_composition_media)
    app.router.add_get("/_emulator/stats", stats_handler)
    app.router.add_get("/_emulator/token-key", token_key_handler)
    app.router.add_post("/_emulator/compositions/fail", fail_composition_handler)
    # Channel ids and segment names are plain words, so a request never names a path outside the media.
    app.router.add_get(
        r"/_playback/{channel_id:[A-Za-z0-9_-]+}/{name:[A-Za-z0-9_-]+\.(?:m3u8|ts)}", playback_handler
    )
    # The Stage endpoints' `events` URL: participants' sockets (services.ivslocal.events).
    app.router.add_get("/events", events_handler)
    # .+ because the ARN arrives percent-encoded and may contain "/" once decoded.
    app.router.add_post("/tags/{resource_arn:.+}", tag_resource_handler)
    app.router.add_delete("/tags/{resource_arn:.+}", untag_resource_handler)
    app.router.add_get("/tags/{resource_arn:.+}", list_tags_handler)
    app.router.add_post("/{operation}", operation_handler)
    return app
