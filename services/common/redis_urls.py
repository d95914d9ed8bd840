"""The deployment's Redis, as every service that shares state through it is told where it is."""

from __future__ import annotations

# FANOUT_REDIS_URL's default in local mode: the Redis `make run` expects on loopback.
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_URL_PATTERN = r"(redis|rediss|unix)://\S+"
