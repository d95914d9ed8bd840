"""Inventory records to protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from protos.fanout.v1 import common_pb2, stagemanager_pb2
from services.stagemanager.inventory import Change, ChangeKind
from services.stagemanager.model import ORIGIN, REPLICA, Replication, RoomRecord, StageRecord

_ROLES = {ORIGIN: common_pb2.STAGE_ROLE_ORIGIN, REPLICA: common_pb2.STAGE_ROLE_REPLICA}
_REPLICATION = {
    Replication.NONE: common_pb2.REPLICATION_STATE_UNSPECIFIED,
    Replication.WAITING: common_pb2.REPLICATION_STATE_WAITING,
    Replication.ACTIVE: common_pb2.REPLICATION_STATE_ACTIVE,
    Replication.STOPPED: common_pb2.REPLICATION_STATE_STOPPED,
}


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def stage_to_proto(stage: StageRecord) -> common_pb2.Stage:
    return common_pb2.Stage(
        arn=stage.arn,
        room=stage.room,
        index=stage.index,
        role=_ROLES.get(stage.role, common_pb2.STAGE_ROLE_UNSPECIFIED),
        state=common_pb2.StageState.Value(f"STAGE_STATE_{stage.state.value}"),
        events_url=stage.events_url,
        whip_url=stage.whip_url,
        created_at=timestamp(stage.created_at),
        origin_index=max(stage.origin, 0),
        replication=_REPLICATION[stage.replication],
        replication_error=stage.replication_error,
    )


def room_to_proto(room: RoomRecord) -> common_pb2.Room:
    return common_pb2.Room(
        room=room.room,
        stages=[stage_to_proto(room.stages[index]) for index in sorted(room.stages)],
        publishing=room.publishing,
        created_at=timestamp(room.created_at),
        last_error=room.last_error,
        ending=room.ending,
        overflow=overflow_to_proto(room) if room.overflow_state else None,
    )


def overflow_to_proto(room: RoomRecord) -> common_pb2.Overflow:
    return common_pb2.Overflow(
        channel_arn=room.overflow_channel_arn,
        playback_url=room.overflow_playback_url,
        composition_arn=room.overflow_composition_arn,
        state=common_pb2.OverflowState.Value(f"OVERFLOW_STATE_{room.overflow_state}"),
        error=room.overflow_error,
    )


def change_to_proto(change: Change) -> stagemanager_pb2.RoomEvent:
    event = stagemanager_pb2.RoomEvent(revision=change.revision)
    if change.kind is ChangeKind.ROOM_ENDED:
        event.room_ended.room = change.room
    elif change.kind is ChangeKind.ROOM_CHANGED:
        assert change.room_record is not None
        event.room_changed.CopyFrom(room_to_proto(change.room_record))
    else:
        assert change.stage is not None
        getattr(event, change.kind.value).CopyFrom(stage_to_proto(change.stage))
    return event
