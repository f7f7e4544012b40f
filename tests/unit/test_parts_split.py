"""How a merge is split into parts (``della_cli.parts``): cuts by cost, worked by hand."""

from __future__ import annotations

import pytest

from della_cli.cli_parts import with_ray_address
from della_cli.errors import UsageError
from della_cli.parts import balanced_bounds, parse_part


@pytest.mark.parametrize(
    ("costs", "count", "bounds"),
    [
        # Running costs 0, 1, 2, 3, 4: the cut for half of 4 falls after the second shard.
        ([1, 1, 1, 1], 2, [0, 2, 4]),
        # 0, 10, 11, 12, 13: half (6.5) is nearer 10 than 0; the heavy shard stands alone.
        ([10, 1, 1, 1], 2, [0, 1, 4]),
        # 0, 1, 2, 3, 13: half (6.5) is nearer 3 than 13.
        ([1, 1, 1, 10], 2, [0, 3, 4]),
        # Thirds of 6 over 0, 1, ..., 6: cuts at 2 and 4.
        ([1] * 6, 3, [0, 2, 4, 6]),
        # More parts than shards: each shard once, some parts empty (a tie, 2.5 from 0 and
        # from 5, cuts after the shard).
        ([5, 5], 4, [0, 1, 1, 2, 2]),
        ([3], 1, [0, 1]),
    ],
)
def test_cuts_fall_where_the_running_cost_is_nearest_each_share(costs, count, bounds):
    assert balanced_bounds(costs, count) == bounds


@pytest.mark.parametrize("count", [1, 2, 3, 7, 20])
def test_every_shard_belongs_to_exactly_one_part(count):
    costs = [(k * 37) % 11 + 1 for k in range(13)]
    bounds = balanced_bounds(costs, count)
    assert len(bounds) == count + 1 and bounds[0] == 0 and bounds[-1] == len(costs)
    assert bounds == sorted(bounds)


@pytest.mark.parametrize(
    ("text", "expected"), [("1/1", (1, 1)), ("3/8", (3, 8)), (" 8 / 8 ", (8, 8))]
)
def test_parse_part(text, expected):
    assert parse_part(text) == expected


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "3", "a/b", "-1/3", "1/3/4"])
def test_parse_part_refuses(text):
    with pytest.raises(UsageError, match="--part"):
        parse_part(text)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["r", "o", "--ray"], ["r", "o", "--ray", "auto"]),
        (["r", "o", "--ray", "--parts", "2"], ["r", "o", "--ray", "auto", "--parts", "2"]),
        (["r", "o", "--ray", "head:6379"], ["r", "o", "--ray", "head:6379"]),
        (["r", "o"], ["r", "o"]),
    ],
)
def test_ray_without_an_address_means_this_machines_cluster(args, expected):
    assert with_ray_address(args) == expected
