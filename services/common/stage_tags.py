"""The tags every Stage of this system carries in IVS (DESIGN.md §2): how a restart, the monitor and
two deployments sharing one account tell whose Stage is whose, and what it was doing."""

from __future__ import annotations

# = FANOUT_CLUSTER_ID: a deployment adopts, polls and deletes only its own Stages.
TAG_CLUSTER = "fanout:cluster"
TAG_ROOM = "fanout:room"
# The Stage's index in its room, so a recovered pool keeps its order.
TAG_INDEX = "fanout:index"
# "origin" (the page publishes to it) or "replica" (fed by server-side replication).
TAG_ROLE = "fanout:role"
# On a replica: the index of the origin that feeds it, so a restart keeps the topology.
TAG_ORIGIN = "fanout:origin"
# Being drained: a restarted stage manager keeps draining it instead of filling it again.
TAG_DRAINING = "fanout:draining"
# On one Stage of a room being ended: a restarted stage manager finishes the ending instead of
# adopting the room's remaining Stages as a live pool.
TAG_ENDING = "fanout:ending"
