"""The emulator's core: Stages, sessions, participants, replications and public keys, by IVS's rules.

Compositions and encoder configurations live in services.ivslocal.compositions; IvsState owns them.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.common import jwt_es384
from services.ivslocal import validation as check
from services.ivslocal.compositions import Composition, Compositions, EncoderConfiguration
from services.ivslocal.config import Settings
from services.ivslocal.errors import (
    ConflictError,
    ParticipantDisconnectedError,
    ResourceNotFoundError,
    ServiceQuotaExceededError,
    StageAtCapacityError,
    StageDeletedError,
    TokenExpiredError,
    TokenMalformedError,
    TokenNotAllowedError,
    ValidationError,
)
from services.ivslocal.resources import Page, paginate, random_id

log = logging.getLogger(__name__)

CONNECTED = "CONNECTED"
DISCONNECTED = "DISCONNECTED"
# ReplicationType and ReplicationState of the model.
NOT_REPLICATED = "NONE"
SOURCE = "SOURCE"
REPLICA = "REPLICA"
ACTIVE = "ACTIVE"
STOPPED = "STOPPED"
# Concurrent replications per participant, across the region's Stages; not adjustable (ivs-facts §3).
REPLICATIONS_PER_PARTICIPANT = 5
# kid of the tokens CreateParticipantToken mints; never a valid public-key ARN, so it cannot collide.
EMULATOR_KEY_ID = "ivslocal-participant-tokens"
CLAIMS_VERSION = "1.0"


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class StageEndpoints:
    events: str
    whip: str
    rtmp: str
    rtmps: str


def stage_endpoints(host: str) -> StageEndpoints:
    """Endpoints for a Stage as seen by a client that reached the emulator at `host` ("host:port")."""
    if host.startswith("["):
        hostname = host[: host.index("]") + 1]
    else:
        hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return StageEndpoints(
        events=f"ws://{host}/events",
        whip=f"http://{host}/whip",
        rtmp=f"rtmp://{hostname}:1935/app/",
        rtmps=f"rtmps://{hostname}:443/app/",
    )


@dataclass(frozen=True)
class Capabilities:
    publish: bool
    subscribe: bool


@dataclass
class PublicKey:
    arn: str
    name: str | None
    material: str
    fingerprint: str
    tags: dict[str, str]
    key: ec.EllipticCurvePublicKey = field(repr=False)
    der: bytes = field(repr=False)
    seq: int


@dataclass(frozen=True)
class ParticipantEvent:
    """One ListParticipantEvents item."""

    name: str
    participant_id: str
    event_time: datetime
    seq: int
    remote_participant_id: str | None = None
    destination_stage_arn: str | None = None
    destination_session_id: str | None = None
    replica: bool = False


@dataclass
class Participant:
    participant_id: str
    stage_arn: str
    session_id: str
    user_id: str | None
    attributes: dict[str, str]
    capabilities: Capabilities
    state: str
    first_join_time: datetime
    seq: int
    # "published" is IVS's "ever published in this session" (filterByPublished); "publishing" is now.
    published: bool = False
    publishing: bool = False
    # SOURCE once replicated in this session; REPLICA for the copy in a destination Stage.
    replication_type: str = NOT_REPLICATED
    replication_state: str | None = None
    source_stage_arn: str | None = None
    source_session_id: str | None = None
    events: list[ParticipantEvent] = field(default_factory=list)

    @property
    def is_replica(self) -> bool:
        return self.replication_type == REPLICA


@dataclass
class Replication:
    """One StartParticipantReplication: `replica` is the participant it added to the destination session."""

    source_stage_arn: str
    participant_id: str
    source_session_id: str
    destination_stage_arn: str
    destination_session_id: str
    reconnect_window_seconds: int
    replica: Participant
    seq: int
    state: str = ACTIVE
    # When the source stopped publishing; the replication stops once the reconnect window has passed.
    source_lost_since: datetime | None = None

    @property
    def active(self) -> bool:
        return self.state == ACTIVE


@dataclass
class StageSession:
    session_id: str
    stage_arn: str
    start_time: datetime
    seq: int
    end_time: datetime | None = None
    participants: dict[str, Participant] = field(default_factory=dict)
    # When the last participant left; the session ends session_end_delay_seconds later.
    idle_since: datetime | None = None
    connected_publishers: int = 0
    connected_subscribers: int = 0

    @property
    def active(self) -> bool:
        return self.end_time is None

    @property
    def connected_count(self) -> int:
        return self.connected_publishers + self.connected_subscribers

    def adjust_counts(self, participant: Participant, delta: int) -> None:
        # A participant allowed to publish takes a publisher slot even while only subscribing.
        if participant.capabilities.publish:
            self.connected_publishers += delta
        else:
            self.connected_subscribers += delta


@dataclass
class Stage:
    arn: str
    name: str | None
    tags: dict[str, str]
    recording_configuration: dict[str, Any] | None
    seq: int
    sessions: list[StageSession] = field(default_factory=list)
    # Participant ids removed by DisconnectParticipant: their tokens may never join again.
    disconnected_participant_ids: set[str] = field(default_factory=set)

    @property
    def stage_id(self) -> str:
        return self.arn.rsplit("/", 1)[1]

    @property
    def active_session(self) -> StageSession | None:
        if self.sessions and self.sessions[-1].active:
            return self.sessions[-1]
        return None

    @property
    def active_session_id(self) -> str | None:
        session = self.active_session
        return session.session_id if session else None


@dataclass(frozen=True)
class TokenRequest:
    """One CreateParticipantToken request or CreateStage participantTokenConfigurations item."""

    duration: int | None = None
    user_id: str | None = None
    attributes: Mapping[str, str] | None = None
    capabilities: list[str] | None = None


@dataclass(frozen=True)
class IssuedToken:
    token: str
    participant_id: str
    user_id: str | None
    attributes: dict[str, str]
    duration: int
    capabilities: list[str]
    expiration_time: datetime


@dataclass(frozen=True)
class VerifiedToken:
    """A participant token that passed IVS's join checks, with the claims the emulator uses."""

    stage: Stage
    participant_id: str
    user_id: str | None
    attributes: dict[str, str]
    capabilities: Capabilities
    expires_at: datetime
    claims: dict[str, Any]


@dataclass(frozen=True)
class ParticipantChange:
    """Told to listeners (the events socket) so they can act on joins, leaves and publish changes."""

    kind: Literal["joined", "left", "published", "unpublished", "replication-started", "replication-stopped"]
    # For the replication kinds: the source participant (the replica is replication.replica).
    participant: Participant
    # When it happened by the model's clock: the event_time IVS would stamp on its event.
    time: datetime
    # For "left": the web SDK's StageLeftReason, e.g. user-initiated, participant-disconnected, stage-deleted.
    reason: str | None = None
    replication: Replication | None = None


Listener = Callable[[ParticipantChange], None]


class IvsState:
    """Everything the emulated ivs-realtime account holds.

    One method per API operation (validating inputs as IVS does and raising the errors in
    services.ivslocal.errors), plus connect_participant / set_published / disconnect for the events
    socket. Not thread-safe: call it from one event loop.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        token_key: ec.EllipticCurvePrivateKey | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.settings = settings or Settings()
        self._clock = clock
        self._token_key = token_key or jwt_es384.generate_private_key()
        self._stages: dict[str, Stage] = {}
        self._deleted_stage_arns: set[str] = set()
        self._public_keys: dict[str, PublicKey] = {}
        self._idle_sessions: dict[str, tuple[Stage, StageSession]] = {}
        # (source Stage ARN, participant id, destination Stage ARN) -> the latest replication between them.
        self._replications: dict[tuple[str, str, str], Replication] = {}
        self._listeners: list[Listener] = []
        self._seq = itertools.count(1)
        self._compositions = Compositions(
            self.settings,
            arn=self._arn,
            next_seq=lambda: next(self._seq),
            stage_exists=lambda arn: arn in self._stages,
            stage_has_publisher=self._stage_has_publisher,
        )

    # --- identity -------------------------------------------------------------------------------

    @property
    def token_key_id(self) -> str:
        """The kid of tokens from CreateParticipantToken."""
        return EMULATOR_KEY_ID

    @property
    def token_public_key_pem(self) -> str:
        """The PEM public key that verifies tokens from CreateParticipantToken."""
        return jwt_es384.public_key_pem(self._token_key)

    def _arn(self, kind: str, resource_id: str) -> str:
        return f"arn:aws:ivs:{self.settings.region}:{self.settings.account_id}:{kind}/{resource_id}"

    def _default_host(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    # --- listeners ------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Calls `listener` on every participant change; returns a function that removes it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def _notify(self, change: ParticipantChange) -> None:
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                # A broken listener must not undo a state change that already happened.
                log.exception("participant listener failed on %s", change.kind)

    # --- stages ---------------------------------------------------------------------------------

    def create_stage(
        self,
        *,
        name: str | None = None,
        tags: Mapping[str, str] | None = None,
        participant_token_configurations: list[TokenRequest] | None = None,
        recording_configuration: Mapping[str, Any] | None = None,
        host: str | None = None,
    ) -> tuple[Stage, list[IssuedToken]]:
        self._settle()
        check.name(name)
        checked_tags = check.tags(tags)
        configurations = participant_token_configurations or []
        if len(configurations) > 12:
            raise ValidationError("participantTokenConfigurations takes at most 12 items")
        for configuration in configurations:
            self._check_token_request(configuration)
        recording = check.recording_configuration(recording_configuration)
        if len(self._stages) >= self.settings.stage_quota:
            raise ServiceQuotaExceededError(f"Stage quota of {self.settings.stage_quota} per region reached")
        arn = self._arn("stage", random_id(12))
        while arn in self._stages or arn in self._deleted_stage_arns:
            arn = self._arn("stage", random_id(12))
        stage = Stage(
            arn=arn, name=name, tags=checked_tags, recording_configuration=recording, seq=next(self._seq)
        )
        self._stages[arn] = stage
        tokens = [self._issue_token(stage, c, host) for c in configurations]
        log.info("created stage %s", arn)
        return stage, tokens

    def get_stage(self, arn: str) -> Stage:
        self._settle()
        return self._stage(check.stage_arn(arn))

    def list_stages(self, *, next_token: str | None = None, max_results: int | None = None) -> Page[Stage]:
        self._settle()
        return paginate(list(self._stages.values()), lambda s: s.seq, next_token, max_results)

    def update_stage(
        self, arn: str, *, name: str | None = None, recording_configuration: Mapping[str, Any] | None = None
    ) -> Stage:
        self._settle()
        check.stage_arn(arn)
        check.name(name)
        recording = check.recording_configuration(recording_configuration)
        stage = self._stage(arn)
        if name is not None:
            stage.name = name
        if recording is not None:
            stage.recording_configuration = recording
        return stage

    def delete_stage(self, arn: str) -> None:
        """Deletes the Stage; everyone connected is disconnected with reason stage-deleted."""
        now = self._settle()
        stage = self._stage(check.stage_arn(arn))
        for key, replication in list(self._replications.items()):
            if replication.destination_stage_arn == arn:
                self._stop_replication(replication, now, "stage-deleted")
            elif replication.source_stage_arn == arn:
                self._stop_replication(replication, now, "replication-stopped")
                del self._replications[key]
        session = stage.active_session
        if session is not None:
            for participant in list(session.participants.values()):
                if participant.state == CONNECTED:
                    self._leave(stage, session, participant, now, "stage-deleted")
            if session.active:
                self._end_session(session, now)
        del self._stages[arn]
        self._deleted_stage_arns.add(arn)
        self._compositions.stage_deleted(arn, now)
        log.info("deleted stage %s", arn)

    def _stage(self, arn: str) -> Stage:
        stage = self._stages.get(arn)
        if stage is None:
            raise ResourceNotFoundError(f"Stage not found: {arn}")
        return stage

    def _stage_has_publisher(self, arn: str) -> bool:
        """Whether someone (a replica included) publishes in the Stage now: what a composition mixes."""
        stage = self._stages.get(arn)
        session = stage.active_session if stage else None
        if session is None:
            return False
        return any(p.state == CONNECTED and p.publishing for p in session.participants.values())

    # --- tags -----------------------------------------------------------------------------------

    def tag_resource(self, resource_arn: str, tags: Mapping[str, str]) -> None:
        resource = self._taggable(resource_arn)
        merged = {**resource.tags, **check.tags(tags)}
        check.tags(merged)
        resource.tags = merged

    def untag_resource(self, resource_arn: str, tag_keys: list[str]) -> None:
        resource = self._taggable(resource_arn)
        for key in check.tag_keys(tag_keys):
            resource.tags.pop(key, None)

    def list_tags_for_resource(self, resource_arn: str) -> dict[str, str]:
        return dict(self._taggable(resource_arn).tags)

    def _taggable(self, resource_arn: str) -> Stage | PublicKey | EncoderConfiguration | Composition:
        self._settle()
        check.resource_arn(resource_arn)
        resource: Stage | PublicKey | EncoderConfiguration | Composition | None = (
            self._stages.get(resource_arn)
            or self._public_keys.get(resource_arn)
            or self._compositions.find_taggable(resource_arn)
        )
        if resource is None:
            raise ResourceNotFoundError(f"Resource not found: {resource_arn}")
        return resource

    # --- server-side composition (services.ivslocal.compositions) -------------------------------

    def create_encoder_configuration(
        self,
        *,
        name: str | None = None,
        video: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> EncoderConfiguration:
        self._settle()
        return self._compositions.create_encoder_configuration(name=name, video=video, tags=tags)

    def get_encoder_configuration(self, arn: str) -> EncoderConfiguration:
        self._settle()
        return self._compositions.get_encoder_configuration(arn)

    def list_encoder_configurations(
        self, *, next_token: str | None = None, max_results: int | None = None
    ) -> Page[EncoderConfiguration]:
        self._settle()
        return self._compositions.list_encoder_configurations(next_token=next_token, max_results=max_results)

    def delete_encoder_configuration(self, arn: str) -> None:
        self._settle()
        self._compositions.delete_encoder_configuration(arn)

    def start_composition(
        self,
        stage_arn: str,
        destinations: list[Any],
        *,
        layout: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        idempotency_token: str | None = None,
    ) -> Composition:
        now = self._settle()
        return self._compositions.start_composition(
            stage_arn, destinations, now, layout=layout, tags=tags, idempotency_token=idempotency_token
        )

    def get_composition(self, arn: str) -> Composition:
        self._settle()
        return self._compositions.get_composition(arn)

    def list_compositions(
        self,
        *,
        filter_by_stage_arn: str | None = None,
        filter_by_encoder_configuration_arn: str | None = None,
        next_token: str | None = None,
        max_results: int | None = None,
    ) -> Page[Composition]:
        self._settle()
        return self._compositions.list_compositions(
            filter_by_stage_arn=filter_by_stage_arn,
            filter_by_encoder_configuration_arn=filter_by_encoder_configuration_arn,
            next_token=next_token,
            max_results=max_results,
        )

    def stop_composition(self, arn: str) -> Composition:
        now = self._settle()
        return self._compositions.stop_composition(arn, now)

    def fail_composition(self, arn: str, destination_id: str | None = None) -> Composition:
        """Emulator only (no IVS operation): the composition FAILED, as if its broadcast had failed."""
        now = self._settle()
        return self._compositions.fail_composition(arn, now, destination_id)

    # --- participant tokens ---------------------------------------------------------------------

    def create_participant_token(
        self, stage_arn: str, request: TokenRequest | None = None, *, host: str | None = None
    ) -> IssuedToken:
        """Mints a token signed with the emulator's own key (kid = token_key_id), like IVS's API tokens."""
        self._settle()
        stage = self._stage(check.stage_arn(stage_arn, "stageArn"))
        request = request or TokenRequest()
        self._check_token_request(request)
        return self._issue_token(stage, request, host)

    @staticmethod
    def _check_token_request(request: TokenRequest) -> None:
        check.duration_minutes(request.duration)
        check.user_id(request.user_id)
        check.attributes(request.attributes)
        check.capabilities(request.capabilities)

    def _issue_token(self, stage: Stage, request: TokenRequest, host: str | None) -> IssuedToken:
        now = self._clock()
        duration = check.duration_minutes(request.duration)
        capabilities = check.capabilities(request.capabilities)
        attributes = check.attributes(request.attributes)
        endpoints = stage_endpoints(host or self._default_host())
        participant_id = random_id(12)
        expires = int(now.timestamp()) + duration * 60
        claims: dict[str, Any] = {
            "exp": expires,
            "iat": int(now.timestamp()),
            "jti": participant_id,
            "resource": stage.arn,
            "topic": stage.stage_id,
            "events_url": endpoints.events,
            "whip_url": endpoints.whip,
            "attributes": attributes,
            "capabilities": {
                "allow_publish": "PUBLISH" in capabilities,
                "allow_subscribe": "SUBSCRIBE" in capabilities,
            },
            "version": CLAIMS_VERSION,
        }
        if request.user_id is not None:
            claims["user_id"] = request.user_id
        return IssuedToken(
            token=jwt_es384.sign(claims, self._token_key, EMULATOR_KEY_ID),
            participant_id=participant_id,
            user_id=request.user_id,
            attributes=attributes,
            duration=duration,
            capabilities=capabilities,
            expiration_time=datetime.fromtimestamp(expires, UTC),
        )

    # --- public keys ----------------------------------------------------------------------------

    def import_public_key(
        self, material: str, *, name: str | None = None, tags: Mapping[str, str] | None = None
    ) -> PublicKey:
        self._settle()
        check.public_key_material(material)
        check.name(name)
        checked_tags = check.tags(tags)
        try:
            key = jwt_es384.public_key_from_pem(material.strip())
        except ValueError as error:
            raise ValidationError(f"publicKeyMaterial is not a usable public key: {error}") from None
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if any(existing.der == der for existing in self._public_keys.values()):
            raise ConflictError("a public key with the same material is already imported")
        if len(self._public_keys) >= self.settings.public_key_quota:
            raise ServiceQuotaExceededError(
                f"Public key quota of {self.settings.public_key_quota} per region reached"
            )
        arn = self._arn("public-key", random_id(12))
        while arn in self._public_keys:
            arn = self._arn("public-key", random_id(12))
        fingerprint = ":".join(f"{byte:02x}" for byte in hashlib.sha256(der).digest())
        public_key = PublicKey(
            arn=arn,
            name=name,
            material=material,
            fingerprint=fingerprint,
            tags=checked_tags,
            key=key,
            der=der,
            seq=next(self._seq),
        )
        self._public_keys[arn] = public_key
        log.info("imported public key %s", arn)
        return public_key

    def get_public_key(self, arn: str) -> PublicKey:
        self._settle()
        return self._public_key(check.public_key_arn(arn))

    def list_public_keys(
        self, *, next_token: str | None = None, max_results: int | None = None
    ) -> Page[PublicKey]:
        self._settle()
        return paginate(list(self._public_keys.values()), lambda k: k.seq, next_token, max_results)

    def delete_public_key(self, arn: str) -> None:
        """Deletes the key; tokens signed with it cannot join from now on."""
        self._settle()
        self._public_key(check.public_key_arn(arn))
        del self._public_keys[arn]
        log.info("deleted public key %s", arn)

    def _public_key(self, arn: str) -> PublicKey:
        public_key = self._public_keys.get(arn)
        if public_key is None:
            raise ResourceNotFoundError(f"Public key not found: {arn}")
        return public_key

    # --- sessions and participants (API) --------------------------------------------------------

    def list_stage_sessions(
        self, stage_arn: str, *, next_token: str | None = None, max_results: int | None = None
    ) -> Page[StageSession]:
        """Newest session first. An unknown Stage has no sessions (the API models no NotFound here)."""
        self._settle()
        stage = self._stages.get(check.stage_arn(stage_arn, "stageArn"))
        sessions = list(reversed(stage.sessions)) if stage else []
        return paginate(sessions, lambda s: s.seq, next_token, max_results, descending=True)

    def get_stage_session(self, stage_arn: str, session_id: str) -> StageSession:
        self._settle()
        return self._session(stage_arn, session_id)

    def list_participants(
        self,
        stage_arn: str,
        session_id: str,
        *,
        filter_by_user_id: str | None = None,
        filter_by_published: bool | None = None,
        filter_by_state: str | None = None,
        filter_by_recording_state: str | None = None,
        next_token: str | None = None,
        max_results: int | None = None,
    ) -> Page[Participant]:
        """Participants of one session in join order; DISCONNECTED ones stay listed, as in IVS."""
        self._settle()
        check.stage_arn(stage_arn, "stageArn")
        check.session_id(session_id)
        filters = [filter_by_user_id, filter_by_published, filter_by_state, filter_by_recording_state]
        if sum(f is not None for f in filters) > 1:
            raise ValidationError("only one filter can be used per ListParticipants request")
        check.user_id(filter_by_user_id, "filterByUserId")
        if filter_by_state is not None:
            check.check_enum("filterByState", filter_by_state, check.PARTICIPANT_STATES)
        if filter_by_recording_state is not None:
            check.check_enum("filterByRecordingState", filter_by_recording_state, check.RECORDING_STATES)
            # Recording is not emulated: every participant's recordingState is DISABLED.
            return Page([], None)
        stage = self._stages.get(stage_arn)
        session = next((s for s in stage.sessions if s.session_id == session_id), None) if stage else None
        participants = list(session.participants.values()) if session else []
        if filter_by_user_id is not None:
            participants = [p for p in participants if p.user_id == filter_by_user_id]
        if filter_by_published is not None:
            participants = [p for p in participants if p.published == filter_by_published]
        if filter_by_state is not None:
            participants = [p for p in participants if p.state == filter_by_state]
        return paginate(participants, lambda p: p.seq, next_token, max_results)

    def get_participant(self, stage_arn: str, session_id: str, participant_id: str) -> Participant:
        self._settle()
        check.participant_id(participant_id)
        session = self._session(stage_arn, session_id)
        participant = session.participants.get(participant_id)
        if participant is None:
            raise ResourceNotFoundError(f"Participant not found: {participant_id}")
        return participant

    def disconnect_participant(self, stage_arn: str, participant_id: str, reason: str | None = None) -> None:
        """DisconnectParticipant: the participant leaves and its id (its token) can never join again."""
        now = self._settle()
        check.stage_arn(stage_arn, "stageArn")
        check.participant_id(participant_id)
        if reason is not None:
            check.check_length("reason", reason, 0, 128)
        stage = self._stage(stage_arn)
        for session in reversed(stage.sessions):
            participant = session.participants.get(participant_id)
            if participant is not None:
                break
        else:
            raise ResourceNotFoundError(f"Participant not found: {participant_id}")
        stage.disconnected_participant_ids.add(participant_id)
        if participant.state == CONNECTED:
            self._leave(stage, session, participant, now, "participant-disconnected")
        log.info("disconnected participant %s from %s (%s)", participant_id, stage_arn, reason or "no reason")

    def _session(self, stage_arn: str, session_id: str) -> StageSession:
        check.stage_arn(stage_arn, "stageArn")
        check.session_id(session_id)
        stage = self._stage(stage_arn)
        for session in stage.sessions:
            if session.session_id == session_id:
                return session
        raise ResourceNotFoundError(f"Stage session not found: {session_id}")

    def list_participant_events(
        self,
        stage_arn: str,
        session_id: str,
        participant_id: str,
        *,
        next_token: str | None = None,
        max_results: int | None = None,
    ) -> Page[ParticipantEvent]:
        """Oldest first. Unknown Stages, sessions and participants have no events (no NotFound is modeled)."""
        self._settle()
        check.stage_arn(stage_arn, "stageArn")
        check.session_id(session_id)
        check.participant_id(participant_id)
        stage = self._stages.get(stage_arn)
        session = next((s for s in stage.sessions if s.session_id == session_id), None) if stage else None
        participant = session.participants.get(participant_id) if session else None
        events = list(participant.events) if participant else []
        return paginate(events, lambda e: e.seq, next_token, max_results)

    # --- replication ----------------------------------------------------------------------------

    def start_participant_replication(
        self,
        source_stage_arn: str,
        destination_stage_arn: str,
        participant_id: str,
        *,
        reconnect_window_seconds: int | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> Replication:
        """Copies a publishing participant of the source Stage's active session into the destination Stage.

        The replica joins the destination's active session (starting one) as a CONNECTED publisher with
        the same participant id. Refused: unknown Stages or participant (ResourceNotFound), a participant
        that is not publishing, is itself a replica, or is already in the destination (Conflict), the
        fifth concurrent replication of the participant or a full destination (ServiceQuotaExceeded).
        """
        now = self._settle()
        check.stage_arn(source_stage_arn, "sourceStageArn")
        check.stage_arn(destination_stage_arn, "destinationStageArn")
        check.participant_id(participant_id)
        window = check.reconnect_window_seconds(reconnect_window_seconds)
        extra_attributes = check.attributes(attributes)
        if source_stage_arn == destination_stage_arn:
            raise ValidationError("sourceStageArn and destinationStageArn must name different Stages")
        source_stage = self._stage(source_stage_arn)
        destination_stage = self._stage(destination_stage_arn)
        source_session = source_stage.active_session
        source = source_session.participants.get(participant_id) if source_session else None
        if source_session is None or source is None or source.state != CONNECTED:
            raise ResourceNotFoundError(f"Participant not connected to {source_stage_arn}: {participant_id}")
        if source.is_replica:
            raise ConflictError(f"Participant {participant_id} is itself a replica in {source_stage_arn}")
        if not source.publishing:
            raise ConflictError(f"Participant {participant_id} is not publishing")
        current = self._replications.get((source_stage_arn, participant_id, destination_stage_arn))
        if current is not None and current.active:
            raise ConflictError(
                f"Participant {participant_id} is already replicated to {destination_stage_arn}"
            )
        destination_session = destination_stage.active_session
        existing = destination_session.participants.get(participant_id) if destination_session else None
        if existing is not None and (existing.state == CONNECTED or not existing.is_replica):
            raise ConflictError(f"Participant {participant_id} is already in {destination_stage_arn}")
        concurrent = sum(
            1 for r in self._replications.values() if r.active and r.participant_id == participant_id
        )
        if concurrent >= REPLICATIONS_PER_PARTICIPANT:
            raise ServiceQuotaExceededError(
                f"Participant {participant_id} already has {concurrent} concurrent replications "
                f"(quota {REPLICATIONS_PER_PARTICIPANT}, not adjustable)"
            )
        if destination_session is not None and (
            destination_session.connected_publishers >= self.settings.publisher_quota
        ):
            raise ServiceQuotaExceededError(
                f"{destination_stage_arn} already has {destination_session.connected_publishers} publishers"
            )

        if destination_session is None:
            destination_session = self._start_session(destination_stage, now)
        destination_session.idle_since = None
        self._idle_sessions.pop(destination_session.session_id, None)
        replica = existing or Participant(
            participant_id=participant_id,
            stage_arn=destination_stage_arn,
            session_id=destination_session.session_id,
            user_id=source.user_id,
            attributes={},
            capabilities=Capabilities(publish=True, subscribe=False),
            state=CONNECTED,
            first_join_time=now,
            seq=next(self._seq),
            replication_type=REPLICA,
        )
        replica.attributes = {**source.attributes, **extra_attributes}
        replica.user_id = source.user_id
        replica.state = CONNECTED
        replica.replication_state = ACTIVE
        replica.source_stage_arn = source_stage_arn
        replica.source_session_id = source_session.session_id
        destination_session.participants[participant_id] = replica
        destination_session.adjust_counts(replica, +1)
        replication = Replication(
            source_stage_arn=source_stage_arn,
            participant_id=participant_id,
            source_session_id=source_session.session_id,
            destination_stage_arn=destination_stage_arn,
            destination_session_id=destination_session.session_id,
            reconnect_window_seconds=window,
            replica=replica,
            seq=next(self._seq),
        )
        self._replications[(source_stage_arn, participant_id, destination_stage_arn)] = replication
        source.replication_type = SOURCE
        source.replication_state = ACTIVE
        self._record(
            source,
            "REPLICATION_STARTED",
            now,
            destination_stage_arn=destination_stage_arn,
            destination_session_id=destination_session.session_id,
        )
        self._record(replica, "JOINED", now)
        self._notify(ParticipantChange("joined", replica, now))
        self._set_publishing(replica, True, now)
        self._notify(ParticipantChange("replication-started", source, now, replication=replication))
        log.info("replicating %s from %s to %s", participant_id, source_stage_arn, destination_stage_arn)
        return replication

    def stop_participant_replication(
        self, source_stage_arn: str, destination_stage_arn: str, participant_id: str
    ) -> Replication:
        """Stops an active replication; the replica leaves the destination Stage."""
        now = self._settle()
        check.stage_arn(source_stage_arn, "sourceStageArn")
        check.stage_arn(destination_stage_arn, "destinationStageArn")
        check.participant_id(participant_id)
        self._stage(source_stage_arn)
        self._stage(destination_stage_arn)
        replication = self._replications.get((source_stage_arn, participant_id, destination_stage_arn))
        if replication is None or not replication.active:
            raise ResourceNotFoundError(
                f"No active replication of {participant_id} "
                f"from {source_stage_arn} to {destination_stage_arn}"
            )
        self._stop_replication(replication, now, "replication-stopped")
        return replication

    def list_participant_replicas(
        self,
        source_stage_arn: str,
        participant_id: str,
        *,
        next_token: str | None = None,
        max_results: int | None = None,
    ) -> Page[Replication]:
        """The participant's replications from the Stage, ACTIVE and STOPPED, oldest first (one per
        destination: the latest). An unknown Stage or participant has none (no NotFound is modeled)."""
        self._settle()
        check.stage_arn(source_stage_arn, "sourceStageArn")
        check.participant_id(participant_id)
        limit = check.max_results(max_results, maximum=50)
        replications = sorted(
            (
                r
                for r in self._replications.values()
                if r.source_stage_arn == source_stage_arn and r.participant_id == participant_id
            ),
            key=lambda r: r.seq,
        )
        return paginate(replications, lambda r: r.seq, next_token, limit)

    def active_replication_into(self, destination_stage_arn: str, participant_id: str) -> Replication | None:
        """The ACTIVE replication whose replica is `participant_id` in the destination Stage, if any."""
        for replication in self._replications.values():
            if (
                replication.active
                and replication.destination_stage_arn == destination_stage_arn
                and replication.participant_id == participant_id
            ):
                return replication
        return None

    def _replications_of(self, source_stage_arn: str, participant_id: str) -> list[Replication]:
        return [
            r
            for r in self._replications.values()
            if r.active and r.source_stage_arn == source_stage_arn and r.participant_id == participant_id
        ]

    def _replication_of_replica(self, replica: Participant) -> Replication | None:
        replication = self.active_replication_into(replica.stage_arn, replica.participant_id)
        return replication if replication is not None and replication.replica is replica else None

    def _resume_replication(self, replication: Replication, source: Participant, now: datetime) -> None:
        """The source publishes again within its window (perhaps in a new session): the replica follows."""
        replication.source_lost_since = None
        replication.source_session_id = source.session_id
        replication.replica.source_session_id = source.session_id
        source.replication_type = SOURCE
        source.replication_state = ACTIVE
        if not replication.replica.publishing:
            self._set_publishing(replication.replica, True, now)

    def _stop_replication(self, replication: Replication, now: datetime, reason: str) -> None:
        if not replication.active:
            return
        replication.state = STOPPED
        replica = replication.replica
        replica.replication_state = STOPPED
        stage = self._stages.get(replication.destination_stage_arn)
        session = (
            next((s for s in stage.sessions if s.session_id == replica.session_id), None) if stage else None
        )
        if stage is not None and session is not None and replica.state == CONNECTED:
            self._leave(stage, session, replica, now, reason)
        source = self._source_participant(replication)
        if source is not None:
            if not self._replications_of(replication.source_stage_arn, replication.participant_id):
                source.replication_state = STOPPED
            self._record(
                source,
                "REPLICATION_STOPPED",
                now,
                destination_stage_arn=replication.destination_stage_arn,
                destination_session_id=replication.destination_session_id,
            )
            self._notify(ParticipantChange("replication-stopped", source, now, replication=replication))
        log.info(
            "stopped replicating %s from %s to %s (%s)",
            replication.participant_id,
            replication.source_stage_arn,
            replication.destination_stage_arn,
            reason,
        )

    def _source_participant(self, replication: Replication) -> Participant | None:
        stage = self._stages.get(replication.source_stage_arn)
        if stage is None:
            return None
        for session in reversed(stage.sessions):
            if session.session_id == replication.source_session_id:
                return session.participants.get(replication.participant_id)
        return None

    # --- the events socket's side ---------------------------------------------------------------

    def verify_participant_token(self, token: str, now: datetime | None = None) -> VerifiedToken:
        """Checks a token as IVS does at join: signature (by kid), exp, stage, participant id, claims."""
        now = self._settle(now)
        try:
            header, _ = jwt_es384.decode_unverified(token)
        except jwt_es384.InvalidTokenError as error:
            raise TokenMalformedError(f"token is malformed: {error}") from None
        kid = header.get("kid")
        if kid == EMULATOR_KEY_ID:
            key = self._token_key.public_key()
        elif isinstance(kid, str) and kid in self._public_keys:
            key = self._public_keys[kid].key
        else:
            raise TokenNotAllowedError("token kid names no imported public key")
        try:
            claims = jwt_es384.verify(token, key)
        except jwt_es384.InvalidTokenError as error:
            raise TokenNotAllowedError(f"token rejected: {error}") from None

        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise TokenMalformedError("token has no numeric exp claim")
        if exp <= now.timestamp():
            raise TokenExpiredError("token has expired")
        participant_id = claims.get("jti")
        if not isinstance(participant_id, str) or not participant_id:
            raise TokenMalformedError("token has no jti claim")
        if len(participant_id) > 64 or not check.PARTICIPANT_ID.fullmatch(participant_id):
            raise TokenMalformedError("token jti is not a valid participant id")
        resource, topic = claims.get("resource"), claims.get("topic")
        if not isinstance(resource, str) or not isinstance(topic, str):
            raise TokenMalformedError("token has no resource or topic claim")
        stage = self._stages.get(resource)
        if stage is None:
            if resource in self._deleted_stage_arns:
                raise StageDeletedError("the token's stage has been deleted")
            raise TokenNotAllowedError("the token's resource names no stage of this account")
        if topic != stage.stage_id:
            raise TokenNotAllowedError("the token's topic does not match its resource")
        user_id = claims.get("user_id")
        if user_id is not None and not isinstance(user_id, str):
            raise TokenMalformedError("token user_id is not a string")
        attributes = claims.get("attributes") or {}
        if not isinstance(attributes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
        ):
            raise TokenMalformedError("token attributes are not an object of strings")
        capabilities = claims.get("capabilities") or {}
        if not isinstance(capabilities, dict):
            raise TokenMalformedError("token capabilities are not an object")
        return VerifiedToken(
            stage=stage,
            participant_id=participant_id,
            user_id=user_id,
            attributes=dict(attributes),
            # A missing flag counts as false, as in the web SDK.
            capabilities=Capabilities(
                publish=capabilities.get("allow_publish") is True,
                subscribe=capabilities.get("allow_subscribe") is True,
            ),
            expires_at=datetime.fromtimestamp(exp, UTC),
            claims=claims,
        )

    def connect_participant(self, token: str, now: datetime | None = None) -> Participant:
        """Joins the token's participant to its Stage, starting a session if none is active.

        Raises a JoinError subclass when IVS would refuse the join. Joining again with the id of a
        participant that is still CONNECTED returns that participant: the caller should drop the older
        connection (the SDK's token-reused).
        """
        now = self._settle(now)
        verified = self.verify_participant_token(token, now)
        stage = verified.stage
        if verified.participant_id in stage.disconnected_participant_ids:
            raise ParticipantDisconnectedError("this participant was disconnected and cannot rejoin")
        session = stage.active_session
        existing = session.participants.get(verified.participant_id) if session else None
        if session is not None and existing is not None and existing.state == CONNECTED:
            # The slot is reused; count it out so the capacity check sees the new capabilities.
            session.adjust_counts(existing, -1)
        try:
            self._check_capacity(session, verified.capabilities)
        except StageAtCapacityError:
            if session is not None and existing is not None and existing.state == CONNECTED:
                session.adjust_counts(existing, +1)
            raise
        if session is None:
            session = self._start_session(stage, now)
        session.idle_since = None
        self._idle_sessions.pop(session.session_id, None)
        if existing is None:
            participant = Participant(
                participant_id=verified.participant_id,
                stage_arn=stage.arn,
                session_id=session.session_id,
                user_id=verified.user_id,
                attributes=verified.attributes,
                capabilities=verified.capabilities,
                state=CONNECTED,
                first_join_time=now,
                seq=next(self._seq),
            )
            session.participants[participant.participant_id] = participant
        else:
            participant = existing
            if participant.publishing:
                # The new connection starts out unpublished, whatever the one it replaces was doing.
                self._set_publishing(participant, False, now)
            participant.user_id = verified.user_id
            participant.attributes = verified.attributes
            participant.capabilities = verified.capabilities
            participant.state = CONNECTED
        session.adjust_counts(participant, +1)
        self._record(participant, "JOINED", now)
        self._notify(ParticipantChange("joined", participant, now))
        return participant

    def _start_session(self, stage: Stage, now: datetime) -> StageSession:
        session = StageSession(
            session_id="st-" + random_id(13), stage_arn=stage.arn, start_time=now, seq=next(self._seq)
        )
        stage.sessions.append(session)
        log.info("stage %s started session %s", stage.arn, session.session_id)
        return session

    def _check_capacity(self, session: StageSession | None, capabilities: Capabilities) -> None:
        publishers = session.connected_publishers if session else 0
        subscribers = session.connected_subscribers if session else 0
        if capabilities.publish and publishers >= self.settings.publisher_quota:
            raise StageAtCapacityError(f"the stage already has {publishers} publishers")
        if not capabilities.publish and subscribers >= self.settings.subscriber_quota:
            raise StageAtCapacityError(f"the stage already has {subscribers} subscribers")

    def set_published(
        self, stage_arn: str, participant_id: str, published: bool, now: datetime | None = None
    ) -> Participant:
        """Records that a CONNECTED participant started (True) or stopped (False) publishing."""
        now = self._settle(now)
        participant = self._connected(stage_arn, participant_id)
        if participant.is_replica:
            raise TokenNotAllowedError("a replica publishes only through its replication")
        if published and not participant.capabilities.publish:
            raise TokenNotAllowedError("the participant's token does not allow publishing")
        if participant.publishing != published:
            self._set_publishing(participant, published, now)
        return participant

    def _set_publishing(self, participant: Participant, publishing: bool, now: datetime) -> None:
        """The one place a participant's publishing changes: events, listeners and its replications."""
        participant.publishing = publishing
        participant.published = participant.published or publishing
        self._record(participant, "PUBLISH_STARTED" if publishing else "PUBLISH_STOPPED", now)
        self._notify(ParticipantChange("published" if publishing else "unpublished", participant, now))
        if participant.is_replica:
            return
        for replication in self._replications_of(participant.stage_arn, participant.participant_id):
            if publishing:
                self._resume_replication(replication, participant, now)
            elif replication.source_lost_since is None:
                replication.source_lost_since = now
                if replication.replica.publishing:
                    self._set_publishing(replication.replica, False, now)
        if not publishing:
            self._settle(now)

    def disconnect(
        self,
        stage_arn: str,
        participant_id: str,
        now: datetime | None = None,
        reason: str = "user-initiated",
    ) -> Participant:
        """The participant left (closed its socket); idempotent while its Stage exists."""
        now = self._settle(now)
        stage = self._stage(stage_arn)
        session = stage.active_session
        participant = session.participants.get(participant_id) if session else None
        if session is None or participant is None:
            raise ResourceNotFoundError(f"Participant not in an active session: {participant_id}")
        if participant.state == CONNECTED:
            self._leave(stage, session, participant, now, reason)
        return participant

    def connected_participants(self, stage_arn: str) -> list[Participant]:
        """The CONNECTED participants of the Stage's active session, in join order."""
        self._settle()
        session = self._stage(stage_arn).active_session
        if session is None:
            return []
        return [p for p in session.participants.values() if p.state == CONNECTED]

    def _connected(self, stage_arn: str, participant_id: str) -> Participant:
        stage = self._stage(stage_arn)
        session = stage.active_session
        participant = session.participants.get(participant_id) if session else None
        if participant is None or participant.state != CONNECTED:
            raise ResourceNotFoundError(f"Participant not connected: {participant_id}")
        return participant

    def _leave(
        self, stage: Stage, session: StageSession, participant: Participant, now: datetime, reason: str
    ) -> None:
        if participant.is_replica:
            replication = self._replication_of_replica(participant)
            if replication is not None:
                # Its replication ends with it (DisconnectParticipant on a replica).
                self._stop_replication(replication, now, reason)
                return
        if participant.publishing:
            self._set_publishing(participant, False, now)
        session.adjust_counts(participant, -1)
        participant.state = DISCONNECTED
        self._record(participant, "LEFT", now)
        self._notify(ParticipantChange("left", participant, now, reason))
        if session.connected_count == 0:
            session.idle_since = now
            self._idle_sessions[session.session_id] = (stage, session)
            self._settle(now)

    def _end_session(self, session: StageSession, end_time: datetime) -> None:
        session.end_time = end_time
        session.idle_since = None
        self._idle_sessions.pop(session.session_id, None)
        log.info("stage %s ended session %s", session.stage_arn, session.session_id)

    def settle(self) -> None:
        """Applies what time alone changes; a timer calls it so sockets learn of it without an API call."""
        self._settle()

    def _settle(self, now: datetime | None = None) -> datetime:
        """Stops replications whose source stayed away past its window, ends sessions idle past the
        end delay and moves compositions along; returns the time it settled at."""
        now = now or self._clock()
        for replication in list(self._replications.values()):
            lost = replication.source_lost_since
            if replication.active and lost is not None:
                deadline = lost + timedelta(seconds=replication.reconnect_window_seconds)
                if deadline <= now:
                    self._stop_replication(replication, deadline, "replication-stopped")
        delay = timedelta(seconds=self.settings.session_end_delay_seconds)
        for _, session in list(self._idle_sessions.values()):
            if session.idle_since is not None and session.idle_since + delay <= now:
                self._end_session(session, session.idle_since + delay)
        self._compositions.settle(now)
        return now

    def _record(self, participant: Participant, name: str, now: datetime, **details: Any) -> None:
        participant.events.append(
            ParticipantEvent(
                name=name,
                participant_id=participant.participant_id,
                event_time=now,
                seq=next(self._seq),
                replica=participant.is_replica,
                **details,
            )
        )
