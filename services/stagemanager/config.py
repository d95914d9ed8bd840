"""Stage manager settings from FANOUT_* environment variables, validated at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.env import Env
from services.common.ivs_settings import IvsSettings, read_ivs_settings
from services.stagemanager.rooms import RoomSettings

CLUSTER_ID_PATTERN = r"[a-z0-9][a-z0-9-]{0,31}"


@dataclass(frozen=True)
class StageManagerSettings:
    listen: str
    metrics_port: int
    ivs: IvsSettings
    rooms: RoomSettings
    log_json: bool
    shutdown_grace_seconds: float


def read_settings(environ: Mapping[str, str]) -> StageManagerSettings:
    env = Env(environ)
    ivs = read_ivs_settings(environ)
    return StageManagerSettings(
        listen=env.str("FANOUT_STAGEMANAGER_LISTEN", "127.0.0.1:50061", pattern=r"[^\s]+:\d{1,5}"),
        metrics_port=env.int("FANOUT_STAGEMANAGER_METRICS_PORT", 9461, minimum=0, maximum=65535),
        ivs=ivs,
        rooms=RoomSettings(
            cluster_id=env.str("FANOUT_CLUSTER_ID", "local", pattern=CLUSTER_ID_PATTERN),
            min_stages=env.int("FANOUT_MIN_STAGES", 1, minimum=1, maximum=100),
            max_stages_per_room=env.int("FANOUT_MAX_STAGES_PER_ROOM", 200, minimum=1, maximum=1000),
        ),
        log_json=env.bool("FANOUT_LOG_JSON", ivs.mode == "aws"),
        shutdown_grace_seconds=env.float("FANOUT_SHUTDOWN_GRACE_SECONDS", 5.0, minimum=0, maximum=60),
    )
