"""The cluster's Stages as the monitor tracks them: round-robin turns and scans that span several passes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from services.common.ids import ROOM_ID_PATTERN, STAGE_ARN_PATTERN, stage_id
from services.common.stage_tags import TAG_CLUSTER, TAG_ROOM
from services.monitor.ivs import ParticipantsPage, StageSummary


@dataclass(frozen=True)
class Counts:
    publishers: int
    subscribers: int


@dataclass
class Scan:
    """Progress through one session's CONNECTED participants, page by page, possibly over several turns."""

    session_id: str
    next_token: str | None = None
    publishers: int = 0
    subscribers: int = 0
    pages: int = 0
    complete: bool = False

    def add(self, page: ParticipantsPage) -> None:
        self.publishers += page.publishers
        self.subscribers += page.subscribers
        self.pages += 1
        self.next_token = page.next_token
        self.complete = page.next_token is None


@dataclass
class WatchedStage:
    arn: str
    room: str
    session_id: str
    first_seen: float
    # Monotonic time of the last complete count, and that count; None until the first one.
    refreshed_at: float | None = None
    counts: Counts | None = None
    scan: Scan | None = field(default=None, repr=False)

    @property
    def stage(self) -> str:
        return stage_id(self.arn)

    def start_or_resume_scan(self) -> Scan:
        if self.scan is None or self.scan.session_id != self.session_id or self.scan.complete:
            self.scan = Scan(self.session_id)
        return self.scan

    def completed(self, counts: Counts, now: float) -> None:
        self.counts = counts
        self.refreshed_at = now
        self.scan = None

    def set_session(self, session_id: str) -> None:
        if session_id != self.session_id:
            # Another session's participants: a half-read list of the old one counts for nothing.
            self.session_id = session_id
            self.scan = None


@dataclass(frozen=True)
class SyncResult:
    account_stages: int
    added: list[str]
    removed: list[WatchedStage]


class Watchlist:
    """The Stages tagged with this cluster id, in a stable order whose start rotates every pass."""

    def __init__(self, cluster_id: str) -> None:
        self._cluster_id = cluster_id
        self._stages: dict[str, WatchedStage] = {}
        self._rotation = 0

    def __len__(self) -> int:
        return len(self._stages)

    def get(self, arn: str) -> WatchedStage | None:
        return self._stages.get(arn)

    def stages(self) -> list[WatchedStage]:
        return list(self._stages.values())

    def sync(self, summaries: Iterable[StageSummary], now: float) -> SyncResult:
        """Adopts this cluster's Stages (and nothing else), follows session changes, drops deleted ones."""
        seen: set[str] = set()
        added: list[str] = []
        total = 0
        for summary in summaries:
            total += 1
            room = summary.tags.get(TAG_ROOM, "")
            if summary.tags.get(TAG_CLUSTER) != self._cluster_id:
                continue
            # The tags are ours, but the services would refuse an observation with bad ids.
            if not ROOM_ID_PATTERN.fullmatch(room) or not STAGE_ARN_PATTERN.fullmatch(summary.arn):
                continue
            seen.add(summary.arn)
            session = summary.active_session_id or ""
            stage = self._stages.get(summary.arn)
            if stage is None:
                self._stages[summary.arn] = WatchedStage(summary.arn, room, session, first_seen=now)
                added.append(summary.arn)
            else:
                stage.set_session(session)
        removed = [stage for arn, stage in self._stages.items() if arn not in seen]
        for stage in removed:
            del self._stages[stage.arn]
        return SyncResult(account_stages=total, added=added, removed=removed)

    def turn_order(self) -> list[WatchedStage]:
        """One turn per Stage per pass; the first Stage changes every pass, so none is always last."""
        stages = list(self._stages.values())
        if not stages:
            return []
        start = self._rotation % len(stages)
        self._rotation += 1
        return stages[start:] + stages[:start]

    def refresh_ages(self, now: float) -> list[tuple[str, str, float]]:
        """(room, stage id, seconds since the last complete count, or since first seen if none yet)."""
        return [
            (
                stage.room,
                stage.stage,
                now - (stage.refreshed_at if stage.refreshed_at is not None else stage.first_seen),
            )
            for stage in self._stages.values()
        ]
