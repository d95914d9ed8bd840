"""Placement rule: least-loaded, ties to the lowest index, soft capacity first, never past the hard limit."""

from __future__ import annotations

import pytest

from services.allocator.placement import Candidate, choose_stage


def stages(*observed: int) -> list[Candidate]:
    return [Candidate(f"arn:aws:ivs:us-east-1:1:stage/s{i}", i, n) for i, n in enumerate(observed)]


def test_least_loaded_wins() -> None:
    a, b, c = stages(0, 0, 0)
    chosen = choose_stage([a, b, c], {a.stage_arn: 5, b.stage_arn: 2, c.stage_arn: 4}, 50, 100)
    assert chosen == b


def test_tie_goes_to_lowest_index_whatever_the_order() -> None:
    a, b, c = stages(0, 0, 0)
    leased = {a.stage_arn: 3, b.stage_arn: 1, c.stage_arn: 1}
    assert choose_stage([c, b, a], leased, 50, 100) == b
    assert choose_stage([b, c], {}, 50, 100) == b


def test_stage_missing_from_leases_counts_as_empty() -> None:
    a, b = stages(0, 0)
    assert choose_stage([a, b], {a.stage_arn: 1}, 50, 100) == b


def test_nobody_placed_at_soft_capacity_while_a_stage_is_below_it() -> None:
    a, b = stages(0, 0)
    assert choose_stage([a, b], {a.stage_arn: 10, b.stage_arn: 9}, 10, 20) == b


def test_overflow_goes_to_least_loaded_up_to_the_hard_limit() -> None:
    a, b = stages(0, 0)
    assert choose_stage([a, b], {a.stage_arn: 12, b.stage_arn: 11}, 10, 12) == b
    assert choose_stage([a, b], {a.stage_arn: 12, b.stage_arn: 12}, 10, 12) is None


def test_none_without_candidates() -> None:
    assert choose_stage([], {}, 10, 20) is None


def test_observed_viewers_raise_occupancy() -> None:
    a, b = stages(7, 0)
    assert choose_stage([a, b], {a.stage_arn: 1, b.stage_arn: 3}, 50, 100) == b


def test_observed_at_hard_limit_excludes_the_stage() -> None:
    a, b = stages(20, 0)
    assert choose_stage([a, b], {b.stage_arn: 19}, 10, 20) == b
    assert choose_stage([a], {}, 10, 20) is None


def test_leases_above_observed_still_count() -> None:
    a, b = stages(1, 2)
    assert choose_stage([a, b], {a.stage_arn: 5}, 50, 100) == b


@pytest.mark.parametrize(("soft", "hard"), [(0, 10), (11, 10)])
def test_nonsense_limits_are_refused(soft: int, hard: int) -> None:
    with pytest.raises(ValueError):
        choose_stage(stages(0), {}, soft, hard)
