"""Choosing the Stage a new viewer joins: least-loaded, lowest index on ties, never past the hard limit."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """An eligible Stage; `observed` is how many viewers the monitor saw connected to it."""

    stage_arn: str
    index: int
    observed: int = 0


def occupancy(candidate: Candidate, leased: Mapping[str, int]) -> int:
    """Viewers that count against a Stage: the larger of leases and observed connections.

    Taking the maximum means a drift in either direction (leases not yet reaped, viewers connected
    without a lease) can never let a Stage be overfilled (DESIGN §3).
    """
    return max(leased.get(candidate.stage_arn, 0), candidate.observed)


def choose_stage(
    candidates: Iterable[Candidate],
    leased: Mapping[str, int],
    soft_capacity: int,
    hard_limit: int,
) -> Candidate | None:
    """The least-loaded candidate whose occupancy is below `hard_limit`; ties go to the lowest index.

    Occupancy is `occupancy()`: max(leases, observed). This single rule is equivalent to the
    capacity policy of DESIGN §3:

    - while any candidate is below `soft_capacity`, the least-loaded one is too, so nobody is placed
      on a Stage at or above soft capacity;
    - once every candidate is at or above soft capacity, viewers overflow onto the least-loaded Stage,
      still only below `hard_limit`;
    - None when there are no candidates or all are at the hard limit.

    `soft_capacity` therefore never changes the choice; it is taken (and checked) so that callers,
    and the Redis script that mirrors this function, state the whole policy in one place.
    Equal indexes fall back to the ARN so that the choice is deterministic in every store.
    """
    if soft_capacity < 1:
        raise ValueError(f"soft capacity must be at least 1, got {soft_capacity}")
    if hard_limit < soft_capacity:
        raise ValueError(f"hard limit {hard_limit} is below soft capacity {soft_capacity}")
    best: Candidate | None = None
    best_key: tuple[int, int, str] | None = None
    for candidate in candidates:
        load = occupancy(candidate, leased)
        if load >= hard_limit:
            continue
        key = (load, candidate.index, candidate.stage_arn)
        if best_key is None or key < best_key:
            best, best_key = candidate, key
    return best
