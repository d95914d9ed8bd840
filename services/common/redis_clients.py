"""Redis clients for every service that shares state through the deployment's Redis (leases, the
stage manager's lease and inventory mirror, the webhook outbox): one set of connection rules."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def open_redis(url: str, timeout: float, max_connections: int | None = None) -> redis.Redis:
    """A client whose every wait (a connect, an answer, and with `max_connections` a free connection)
    is bounded by `timeout`. A pooled connection that died with a restarted Redis fails its first
    command at once: that command is tried once more on a new connection, so the first call after a
    short outage does not fail."""
    options: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 30,
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
    }
    if max_connections is None:
        return redis.Redis.from_url(url, **options)
    # Requests wait for a free connection rather than fail in a burst.
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, **options
    )
    return redis.Redis.from_pool(pool)
