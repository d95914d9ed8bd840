"""Every deadline between the processes, in one place, each shorter than the one that waits on it.

A dependency that is slow or gone must give an answer (503 with Retry-After) before whoever waits
on it gives up: a 504, or a request hanging until the browser's own timeout, tells nobody anything.
So a viewer's request through the gateway (GATEWAY_RPC_SECONDS) outlasts the allocator's store calls
it makes (at most two, each STORE_CALL_SECONDS), and readiness notices an outage within about a second.
"""

from __future__ import annotations

# Gateway -> allocator / stage manager, per call (a viewer's token, heartbeat, leave, room info).
GATEWAY_RPC_SECONDS = 5.0
# Gateway -> stage manager for EnsureRoom and EndRoom, which wait for IVS to create or tag Stages.
GATEWAY_ROOM_RPC_SECONDS = 30.0
# /readyz -> the services' standard gRPC health checks.
READINESS_PROBE_SECONDS = 1.0

# Every service -> IVS, per attempt: connecting, then waiting for the answer. A hung IVS costs a call
# this long, not botocore's default minute. A viewer's token in API mode (no signing key) is one such
# call, so it stays under GATEWAY_RPC_SECONDS; Stage creation retries within GATEWAY_ROOM_RPC_SECONDS.
IVS_CONNECT_SECONDS = 1.0
IVS_READ_SECONDS = 3.0

# Allocator -> Redis: one lease-store call, connection included. A call slower than this counts as
# an outage: further calls fail at once (503) until a probe sees Redis answer again.
STORE_CALL_SECONDS = 1.0
# How often the allocator asks Redis whether it answers: readiness follows within about a second.
STORE_PROBE_SECONDS = 0.5
# A request may make this many store calls in a row (assign, then a lease renewal at worst).
STORE_CALLS_PER_REQUEST = 2
