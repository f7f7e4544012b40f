"""A merge made in parts (``--part i/N`` then ``--assemble``) gives exactly the bytes of the
merge on one machine: for every method, for N = 1, 2, 3 and 7, parts run in a shuffled order,
and with a part killed midway and run again."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from parts_models import build_toy_models, files_of, method_recipe, options

from della_cli.api import run_merge
from della_cli.assemble import assemble
from della_cli.methods import METHODS
from della_cli.part_merge import run_part

PART_COUNTS = (1, 2, 3, 7)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory) -> list[Path]:
    return build_toy_models(tmp_path_factory.mktemp("parts-models"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_in_parts_gives_the_bytes_of_one_machine(method, toy_models, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(method_recipe(method, toy_models)))
    whole = tmp_path / "one" / "out"
    report = run_merge(recipe, whole, options())
    assert report.shards >= 8
    expected = files_of(whole)
    order = random.Random(method)
    for count in PART_COUNTS:
        out = tmp_path / f"in{count}" / "out"
        numbers = list(range(1, count + 1))
        order.shuffle(numbers)
        computed = 0
        for number in numbers:
            computed += run_part(recipe, out, options(), number, count).computed_shards
        assert computed == report.shards  # each shard computed by exactly one part
        assemble(recipe, out, options())
        assert files_of(out) == expected, f"{method} in {count} parts"
        assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # parts folder gone


def test_a_killed_part_run_again_keeps_its_shards_and_gives_the_same_bytes(toy_models, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(method_recipe("della", toy_models)))
    whole = tmp_path / "one" / "out"
    run_merge(recipe, whole, options())
    out = tmp_path / "parts" / "out"
    run_part(recipe, out, options(), 1, 3)
    run_part(recipe, out, options(), 3, 3)
    finished = []

    def die(job) -> None:
        finished.append(job.name)
        if len(finished) == 2:
            raise Killed

    with pytest.raises(Killed):
        run_part(recipe, out, options(), 2, 3, on_progress=die)
    again = run_part(recipe, out, options(resume=True), 2, 3)
    # Shards are written behind the merge (small tensors in batches), so how many the kill
    # left finished varies; at least one, and the rest computed again.
    assert again.kept_shards >= 1
    assert again.kept_shards + again.computed_shards == len(again.shards)
    assemble(recipe, out, options())
    assert files_of(out) == files_of(whole)


def test_a_part_run_again_without_resume_computes_all_its_shards(toy_models, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(method_recipe("dare_ties", toy_models)))
    out = tmp_path / "parts" / "out"
    first = run_part(recipe, out, options(), 1, 2)
    again = run_part(recipe, out, options(), 1, 2)
    kept = run_part(recipe, out, options(resume=True), 1, 2)
    assert (first.computed_shards, again.computed_shards) == (len(first.shards),) * 2
    assert (kept.kept_shards, kept.computed_shards) == (len(first.shards), 0)
