"""Server-side composition in the emulator: encoder configurations and compositions, by IVS's rules.

No media is mixed. A composition is a state machine driven by the API, by time and by its Stage's
publishers: STARTING, ACTIVE once `composition_transition_seconds` have passed, STOPPING on
StopComposition (or on its own, see below), STOPPED `composition_transition_seconds` later; FAILED
when a destination cannot broadcast. Each destination carries its own state. STOPPED and FAILED
compositions stay readable for `composition_retention_seconds`, then are deleted, as AWS deletes them
"after a few minutes in the STOPPED state" (RealTimeUserGuide, ssc-getting-started).

A composition stops on its own (STOPPING, then STOPPED) when:
- its Stage has had no publisher for `composition_idle_timeout_seconds` (60 s in AWS: "auto-shutdown
  after 60 seconds of inactivity from publisher participants on the stage"), counted from the start
  when nobody publishes then;
- its Stage is deleted (see stage_deleted);
- it reaches the 24 h maximum duration (ivs-facts §3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from services.ivslocal import validation as check
from services.ivslocal.config import Settings
from services.ivslocal.errors import ConflictError, ResourceNotFoundError, ServiceQuotaExceededError
from services.ivslocal.resources import Page, paginate, random_id

log = logging.getLogger(__name__)

# CompositionState and DestinationState of the model (RECONNECTING is a destination's only).
STARTING = "STARTING"
ACTIVE = "ACTIVE"
STOPPING = "STOPPING"
STOPPED = "STOPPED"
FAILED = "FAILED"
RECONNECTING = "RECONNECTING"
# A composition in one of these holds a slot of the account's and its Stage's quotas.
RUNNING = frozenset({STARTING, ACTIVE, STOPPING})
ENDED = frozenset({STOPPED, FAILED})
# Composition maximum duration; not adjustable (ivs-facts §3).
MAX_COMPOSITION_DURATION = timedelta(hours=24)
LIST_DEFAULT_MAX_RESULTS = 100


@dataclass
class EncoderConfiguration:
    arn: str
    name: str | None
    video: dict[str, Any]
    tags: dict[str, str]
    seq: int


@dataclass
class Destination:
    destination_id: str
    # The DestinationConfiguration as IVS echoes it: name, and channel or s3.
    configuration: dict[str, Any]
    state: str = STARTING
    start_time: datetime | None = None
    end_time: datetime | None = None
    # DestinationDetail: an s3 destination's recording prefix.
    detail: dict[str, Any] | None = None

    @property
    def channel_arn(self) -> str | None:
        channel = self.configuration.get("channel")
        return str(channel["channelArn"]) if channel else None

    @property
    def encoder_configuration_arns(self) -> list[str]:
        return encoder_configuration_arns(self.configuration)

    @property
    def broadcasting(self) -> bool:
        return self.state in (ACTIVE, RECONNECTING)

    @property
    def ended(self) -> bool:
        return self.state in ENDED


def encoder_configuration_arns(configuration: Mapping[str, Any]) -> list[str]:
    """The encoder configurations a DestinationConfiguration names."""
    channel, s3 = configuration.get("channel"), configuration.get("s3")
    if channel is not None:
        arn = channel.get("encoderConfigurationArn")
        return [arn] if arn else []
    return list(s3["encoderConfigurationArns"]) if s3 is not None else []


@dataclass
class Composition:
    arn: str
    stage_arn: str
    layout: dict[str, Any]
    destinations: list[Destination]
    tags: dict[str, str]
    start_time: datetime
    seq: int
    # When the current STARTING or STOPPING ends.
    transition_at: datetime
    state: str = STARTING
    end_time: datetime | None = None
    # Since when its Stage has had no publisher, while STARTING or ACTIVE.
    idle_since: datetime | None = None
    idempotency_token: str | None = None
    # What StartComposition asked for, to tell a retry (same token, same request) from a misuse.
    request: dict[str, Any] = field(default_factory=dict)

    @property
    def composition_id(self) -> str:
        return self.arn.rsplit("/", 1)[1]

    @property
    def running(self) -> bool:
        return self.state in RUNNING

    def uses_encoder_configuration(self, arn: str) -> bool:
        return any(arn in d.encoder_configuration_arns for d in self.destinations)


class Compositions:
    """The account's encoder configurations and compositions.

    IvsState owns one: it settles it at the time of every call and tells it when a Stage is deleted;
    this asks back only whether a Stage exists and whether anyone publishes in it. Channels are not
    checked for existence: the emulator has no `ivs` (low-latency) service, so any well-formed channel
    ARN is accepted; neither are the storage configurations of s3 destinations, which it does not keep.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        arn: Callable[[str, str], str],
        next_seq: Callable[[], int],
        stage_exists: Callable[[str], bool],
        stage_has_publisher: Callable[[str], bool],
    ) -> None:
        self.settings = settings
        self._arn = arn
        self._next_seq = next_seq
        self._stage_exists = stage_exists
        self._stage_has_publisher = stage_has_publisher
        self._encoder_configurations: dict[str, EncoderConfiguration] = {}
        self._compositions: dict[str, Composition] = {}
        self._by_idempotency_token: dict[str, str] = {}

    # --- encoder configurations -----------------------------------------------------------------

    def create_encoder_configuration(
        self,
        *,
        name: str | None = None,
        video: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> EncoderConfiguration:
        check.name(name)
        checked_video = check.video(video)
        checked_tags = check.tags(tags)
        quota = self.settings.encoder_configuration_quota
        if len(self._encoder_configurations) >= quota:
            raise ServiceQuotaExceededError(f"Encoder configuration quota of {quota} per region reached")
        arn = self._new_arn("encoder-configuration", self._encoder_configurations)
        configuration = EncoderConfiguration(
            arn=arn, name=name, video=checked_video, tags=checked_tags, seq=self._next_seq()
        )
        self._encoder_configurations[arn] = configuration
        log.info("created encoder configuration %s", arn)
        return configuration

    def get_encoder_configuration(self, arn: str) -> EncoderConfiguration:
        return self._encoder_configuration(check.encoder_configuration_arn(arn))

    def list_encoder_configurations(
        self, *, next_token: str | None = None, max_results: int | None = None
    ) -> Page[EncoderConfiguration]:
        """Oldest first; 100 a page unless asked (the model's documented default)."""
        limit = check.max_results(max_results, default=LIST_DEFAULT_MAX_RESULTS)
        return paginate(list(self._encoder_configurations.values()), lambda c: c.seq, next_token, limit)

    def delete_encoder_configuration(self, arn: str) -> None:
        """Refused with ConflictException while a running composition uses it ("Ensures that no
        Compositions are using this template"); STOPPED and FAILED ones no longer count as using it."""
        self._encoder_configuration(check.encoder_configuration_arn(arn))
        for composition in self._compositions.values():
            if composition.running and composition.uses_encoder_configuration(arn):
                raise ConflictError(f"Encoder configuration {arn} is used by composition {composition.arn}")
        del self._encoder_configurations[arn]
        log.info("deleted encoder configuration %s", arn)

    def _encoder_configuration(self, arn: str) -> EncoderConfiguration:
        configuration = self._encoder_configurations.get(arn)
        if configuration is None:
            raise ResourceNotFoundError(f"Encoder configuration not found: {arn}")
        return configuration

    # --- compositions ---------------------------------------------------------------------------

    def start_composition(
        self,
        stage_arn: str,
        destinations: list[Any],
        now: datetime,
        *,
        layout: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        idempotency_token: str | None = None,
    ) -> Composition:
        """Starts a composition in STARTING. Refused: an unknown Stage or encoder configuration
        (ResourceNotFound), a token reused for another request (Conflict), the Stage's or the account's
        running compositions at their quota (ServiceQuotaExceeded)."""
        check.stage_arn(stage_arn, "stageArn")
        check.idempotency_token(idempotency_token)
        configurations = check.destinations(destinations)
        checked_layout = check.layout(layout)
        checked_tags = check.tags(tags)
        request = {
            "stageArn": stage_arn,
            "destinations": configurations,
            "layout": checked_layout,
            "tags": checked_tags,
        }
        if idempotency_token is not None:
            earlier = self._compositions.get(self._by_idempotency_token.get(idempotency_token, ""))
            if earlier is not None:
                if earlier.request != request:
                    raise ConflictError(f"idempotencyToken {idempotency_token} was used for another request")
                return earlier
        if not self._stage_exists(stage_arn):
            raise ResourceNotFoundError(f"Stage not found: {stage_arn}")
        for configuration in configurations:
            for arn in encoder_configuration_arns(configuration):
                self._encoder_configuration(arn)
        running = [c for c in self._compositions.values() if c.running]
        on_stage = sum(1 for c in running if c.stage_arn == stage_arn)
        if on_stage >= self.settings.compositions_per_stage:
            raise ServiceQuotaExceededError(
                f"{stage_arn} already has {on_stage} compositions "
                f"(quota {self.settings.compositions_per_stage} per Stage)"
            )
        if len(running) >= self.settings.composition_quota:
            raise ServiceQuotaExceededError(
                f"Composition quota of {self.settings.composition_quota} per region reached"
            )

        arn = self._new_arn("composition", self._compositions)
        composition = Composition(
            arn=arn,
            stage_arn=stage_arn,
            layout=checked_layout,
            destinations=[],
            tags=checked_tags,
            start_time=now,
            seq=self._next_seq(),
            transition_at=now + self._transition,
            idle_since=None if self._stage_has_publisher(stage_arn) else now,
            idempotency_token=idempotency_token,
            request=request,
        )
        for configuration in configurations:
            destination = Destination(random_id(12), configuration)
            if "s3" in configuration:
                # The shape of the CLI example's prefix: three 12-character ids, then "composite".
                stage_id = stage_arn.rsplit("/", 1)[1]
                prefix = f"{stage_id}/{composition.composition_id}/{destination.destination_id}/composite"
                destination.detail = {"s3": {"recordingPrefix": prefix}}
            composition.destinations.append(destination)
        self._compositions[arn] = composition
        if idempotency_token is not None:
            self._by_idempotency_token[idempotency_token] = arn
        log.info("started composition %s of %s", arn, stage_arn)
        return composition

    def get_composition(self, arn: str) -> Composition:
        return self._composition(check.composition_arn(arn))

    def list_compositions(
        self,
        *,
        filter_by_stage_arn: str | None = None,
        filter_by_encoder_configuration_arn: str | None = None,
        next_token: str | None = None,
        max_results: int | None = None,
    ) -> Page[Composition]:
        """Newest first, as the AWS CLI example lists them; STOPPED and FAILED ones stay listed until
        deleted. Both filters may be given; a composition must then match both."""
        if filter_by_stage_arn is not None:
            check.stage_arn(filter_by_stage_arn, "filterByStageArn")
        if filter_by_encoder_configuration_arn is not None:
            check.encoder_configuration_arn(
                filter_by_encoder_configuration_arn, "filterByEncoderConfigurationArn"
            )
        limit = check.max_results(max_results, default=LIST_DEFAULT_MAX_RESULTS)
        compositions = list(reversed(self._compositions.values()))
        if filter_by_stage_arn is not None:
            compositions = [c for c in compositions if c.stage_arn == filter_by_stage_arn]
        if filter_by_encoder_configuration_arn is not None:
            compositions = [
                c for c in compositions if c.uses_encoder_configuration(filter_by_encoder_configuration_arn)
            ]
        return paginate(compositions, lambda c: c.seq, next_token, limit, descending=True)

    def stop_composition(self, arn: str, now: datetime) -> Composition:
        """STOPPING now, STOPPED after the transition. A composition that is already stopping or has
        ended is refused with ConflictException: the model lists that error without saying when, and
        this is the stricter of the two plausible answers (the other being a silent success)."""
        composition = self._composition(check.composition_arn(arn))
        if composition.state not in (STARTING, ACTIVE):
            raise ConflictError(f"Composition {arn} is already {composition.state}")
        self._begin_stop(composition, now)
        return composition

    def fail_composition(self, arn: str, now: datetime, destination_id: str | None = None) -> Composition:
        """Emulator only: the composition FAILED now, as when its broadcast fails past all retries.

        The named destination (every destination if none is named) goes FAILED, the others STOPPED.
        """
        composition = self._composition(check.composition_arn(arn))
        if composition.state not in (STARTING, ACTIVE):
            raise ConflictError(f"Composition {arn} is already {composition.state}")
        ids = [d.destination_id for d in composition.destinations]
        if destination_id is not None and destination_id not in ids:
            raise ResourceNotFoundError(f"Composition {arn} has no destination {destination_id}")
        for destination in composition.destinations:
            failed = destination_id is None or destination.destination_id == destination_id
            self._end_destination(destination, FAILED if failed else STOPPED, now)
        self._end(composition, FAILED, now)
        return composition

    def stage_deleted(self, stage_arn: str, now: datetime) -> None:
        """The Stage's running compositions stop (STOPPING, then STOPPED), not FAILED.

        No AWS page states what DeleteStage does to its compositions. It disconnects every participant
        (ivs-facts §6.9), and the documented outcome of a Stage left without publishers is the
        auto-shutdown, which "transitions to a STOPPED state" (RealTimeUserGuide, ssc-getting-started);
        FAILED is documented only for destinations that cannot broadcast. The emulator stops them at
        once instead of waiting out the idle timeout, since a deleted Stage can never come back.
        """
        for composition in self._compositions.values():
            if composition.stage_arn == stage_arn and composition.state in (STARTING, ACTIVE):
                self._begin_stop(composition, now)

    def find_taggable(self, arn: str) -> EncoderConfiguration | Composition | None:
        return self._encoder_configurations.get(arn) or self._compositions.get(arn)

    def _composition(self, arn: str) -> Composition:
        composition = self._compositions.get(arn)
        if composition is None:
            raise ResourceNotFoundError(f"Composition not found: {arn}")
        return composition

    # --- time -----------------------------------------------------------------------------------

    @property
    def _transition(self) -> timedelta:
        return timedelta(seconds=self.settings.composition_transition_seconds)

    def settle(self, now: datetime) -> None:
        """Applies every change due by `now`, then deletes compositions ended past their retention."""
        retention = timedelta(seconds=self.settings.composition_retention_seconds)
        for composition in list(self._compositions.values()):
            self._advance(composition, now)
            if composition.end_time is not None and composition.end_time + retention <= now:
                del self._compositions[composition.arn]
                if composition.idempotency_token is not None:
                    self._by_idempotency_token.pop(composition.idempotency_token, None)
                log.info(
                    "deleted composition %s, %s since %s",
                    composition.arn,
                    composition.state,
                    composition.end_time,
                )

    def _advance(self, composition: Composition, now: datetime) -> None:
        if composition.state in (STARTING, ACTIVE):
            if self._stage_has_publisher(composition.stage_arn):
                composition.idle_since = None
            elif composition.idle_since is None:
                composition.idle_since = now
        idle_timeout = timedelta(seconds=self.settings.composition_idle_timeout_seconds)
        # Each step happens at its own due time, in order, so a late settle reaches the same states.
        while True:
            stop_at = composition.start_time + MAX_COMPOSITION_DURATION
            if composition.idle_since is not None:
                stop_at = min(stop_at, composition.idle_since + idle_timeout)
            if composition.state == STARTING and stop_at <= min(now, composition.transition_at):
                self._begin_stop(composition, stop_at)
            elif composition.state == STARTING and composition.transition_at <= now:
                self._activate(composition, composition.transition_at)
            elif composition.state == ACTIVE and stop_at <= now:
                self._begin_stop(composition, stop_at)
            elif composition.state == STOPPING and composition.transition_at <= now:
                for destination in composition.destinations:
                    if not destination.ended:
                        self._end_destination(destination, STOPPED, composition.transition_at)
                self._end(composition, STOPPED, composition.transition_at)
            else:
                return

    def _activate(self, composition: Composition, at: datetime) -> None:
        composition.state = ACTIVE
        for destination in composition.destinations:
            if destination.state != STARTING:
                continue
            channel = destination.channel_arn
            if channel is not None and self._channel_busy(channel, composition):
                # "Destination Failure: ... broadcasting to a channel failed because ... another broadcast
                # was happening" (RealTimeUserGuide, eventbridge).
                self._end_destination(destination, FAILED, at)
                log.info("composition %s: channel %s is already broadcasting", composition.arn, channel)
            else:
                destination.state = ACTIVE
                destination.start_time = at
        if all(d.ended for d in composition.destinations):
            self._end(composition, FAILED, at)

    def _channel_busy(self, channel_arn: str, composition: Composition) -> bool:
        return any(
            other is not composition and destination.broadcasting and destination.channel_arn == channel_arn
            for other in self._compositions.values()
            for destination in other.destinations
        )

    def _begin_stop(self, composition: Composition, at: datetime) -> None:
        composition.state = STOPPING
        composition.idle_since = None
        composition.transition_at = at + self._transition
        for destination in composition.destinations:
            if not destination.ended:
                destination.state = STOPPING
        log.info("stopping composition %s", composition.arn)

    @staticmethod
    def _end_destination(destination: Destination, state: str, at: datetime) -> None:
        destination.state = state
        destination.end_time = at

    @staticmethod
    def _end(composition: Composition, state: str, at: datetime) -> None:
        composition.state = state
        composition.end_time = at
        composition.idle_since = None
        log.info("composition %s %s", composition.arn, state)

    def _new_arn(self, kind: str, taken: Mapping[str, object]) -> str:
        arn = self._arn(kind, random_id(12))
        while arn in taken:
            arn = self._arn(kind, random_id(12))
        return arn
