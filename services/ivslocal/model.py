"""The emulator's core: Stages, sessions, participants and public keys, kept by IVS's rules and quotas."""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import logging
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.common import jwt_es384
from services.ivslocal import validation as check
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

log = logging.getLogger(__name__)

CONNECTED = "CONNECTED"
DISCONNECTED = "DISCONNECTED"
# kid of the tokens CreateParticipantToken mints; never a valid public-key ARN, so it cannot collide.
EMULATOR_KEY_ID = "ivslocal-participant-tokens"
CLAIMS_VERSION = "1.0"

_ALPHANUMERICS = string.ascii_letters + string.digits
_CURSOR_PREFIX = "ivslocal:"

T = TypeVar("T")


def random_id(length: int) -> str:
    return "".join(secrets.choice(_ALPHANUMERICS) for _ in range(length))


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

    def as_list(self) -> list[str]:
        return [name for name, on in (("PUBLISH", self.publish), ("SUBSCRIBE", self.subscribe)) if on]


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
class Page(Generic[T]):
    items: list[T]
    next_token: str | None


@dataclass(frozen=True)
class ParticipantChange:
    """Told to listeners (the events socket) so they can act on joins, leaves and publish changes."""

    kind: Literal["joined", "left", "published", "unpublished"]
    participant: Participant
    # For "left": the web SDK's StageLeftReason, e.g. user-initiated, participant-disconnected, stage-deleted.
    reason: str | None = None


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
        self._listeners: list[Listener] = []
        self._seq = itertools.count(1)

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
        return _paginate(list(self._stages.values()), lambda s: s.seq, next_token, max_results)

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
        session = stage.active_session
        if session is not None:
            for participant in list(session.participants.values()):
                if participant.state == CONNECTED:
                    self._leave(stage, session, participant, now, "stage-deleted")
            if session.active:
                self._end_session(session, now)
        del self._stages[arn]
        self._deleted_stage_arns.add(arn)
        log.info("deleted stage %s", arn)

    def _stage(self, arn: str) -> Stage:
        stage = self._stages.get(arn)
        if stage is None:
            raise ResourceNotFoundError(f"Stage not found: {arn}")
        return stage

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

    def _taggable(self, resource_arn: str) -> Stage | PublicKey:
        self._settle()
        check.resource_arn(resource_arn)
        resource: Stage | PublicKey | None = self._stages.get(resource_arn) or self._public_keys.get(
            resource_arn
        )
        if resource is None:
            raise ResourceNotFoundError(f"Resource not found: {resource_arn}")
        return resource

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
        return _paginate(list(self._public_keys.values()), lambda k: k.seq, next_token, max_results)

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
        return _paginate(sessions, lambda s: s.seq, next_token, max_results, descending=True)

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
        return _paginate(participants, lambda p: p.seq, next_token, max_results)

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
            session = StageSession(
                session_id="st-" + random_id(13), stage_arn=stage.arn, start_time=now, seq=next(self._seq)
            )
            stage.sessions.append(session)
            log.info("stage %s started session %s", stage.arn, session.session_id)
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
                participant.publishing = False
                self._notify(ParticipantChange("unpublished", participant))
            participant.user_id = verified.user_id
            participant.attributes = verified.attributes
            participant.capabilities = verified.capabilities
            participant.state = CONNECTED
        session.adjust_counts(participant, +1)
        self._notify(ParticipantChange("joined", participant))
        return participant

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
        self._settle(now)
        participant = self._connected(stage_arn, participant_id)
        if published and not participant.capabilities.publish:
            raise TokenNotAllowedError("the participant's token does not allow publishing")
        if participant.publishing != published:
            participant.publishing = published
            participant.published = participant.published or published
            self._notify(ParticipantChange("published" if published else "unpublished", participant))
        return participant

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
        if participant.publishing:
            participant.publishing = False
            self._notify(ParticipantChange("unpublished", participant))
        session.adjust_counts(participant, -1)
        participant.state = DISCONNECTED
        self._notify(ParticipantChange("left", participant, reason))
        if session.connected_count == 0:
            session.idle_since = now
            self._idle_sessions[session.session_id] = (stage, session)
            self._settle(now)

    def _end_session(self, session: StageSession, end_time: datetime) -> None:
        session.end_time = end_time
        session.idle_since = None
        self._idle_sessions.pop(session.session_id, None)
        log.info("stage %s ended session %s", session.stage_arn, session.session_id)

    def _settle(self, now: datetime | None = None) -> datetime:
        """Ends sessions idle for longer than the end delay; returns the time it settled at."""
        now = now or self._clock()
        delay = timedelta(seconds=self.settings.session_end_delay_seconds)
        for _, session in list(self._idle_sessions.values()):
            if session.idle_since is not None and session.idle_since + delay <= now:
                self._end_session(session, session.idle_since + delay)
        return now


def _paginate(
    items: list[T],
    key: Callable[[T], int],
    next_token: str | None,
    max_results: int | None,
    *,
    descending: bool = False,
) -> Page[T]:
    """A page of `items` (already in list order) after the item whose key the token names."""
    limit = check.max_results(max_results)
    if next_token:
        after = _decode_page_token(next_token)
        items = [item for item in items if (key(item) < after if descending else key(item) > after)]
    page = items[:limit]
    token = _encode_page_token(key(page[-1])) if len(items) > limit else None
    return Page(page, token)


def _encode_page_token(position: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{position}".encode()).decode("ascii")


def _decode_page_token(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        raise ValidationError("nextToken is invalid") from None
    if not text.startswith(_CURSOR_PREFIX) or not text[len(_CURSOR_PREFIX) :].isdigit():
        raise ValidationError("nextToken is invalid")
    return int(text[len(_CURSOR_PREFIX) :])
