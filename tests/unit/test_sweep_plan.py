"""della sweep's parts in closed form: what a grid and a random search expand to, the seeds of
random methods, each candidate's recipe, the results table, the state file, the score read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from della_cli.errors import UsageError
from della_cli.recipe import parse_recipe
from della_cli.sweep.candidates import build_candidates
from della_cli.sweep.evaluate import ScoreError, read_score
from della_cli.sweep.grid import check_axes, grid_settings, parse_axis, random_settings
from della_cli.sweep.results import (
    SweepState,
    best_of,
    csv_text,
    kept_candidate,
    summarize,
    table_lines,
)

REFS = ["math", "experts/code"]  # the models a recipe lists (the base is not one)
DELLA = """merge_method: della
base_model: base
models:
  - model: math
  - model: experts/code
    parameters: {weight: 0.5}
parameters: {density: 0.5, epsilon: 0.1}
seed: 7
"""


def test_a_grid_is_every_combination_the_last_axis_fastest():
    axes = [
        parse_axis("--grid", "density=0.3,0.5", REFS),
        parse_axis("--grid", "lambda=1,1.1", REFS),
    ]
    assert grid_settings(axes) == [
        {"density": 0.3, "lambda": 1},
        {"density": 0.3, "lambda": 1.1},
        {"density": 0.5, "lambda": 1},
        {"density": 0.5, "lambda": 1.1},
    ]


def test_addresses_name_the_top_level_a_model_by_index_or_by_name():
    assert parse_axis("--grid", "density=0.5", REFS).target.model is None
    assert parse_axis("--grid", "models[1].weight=1", REFS).target.model == 1
    named = parse_axis("--grid", "weight@code=1,2", REFS)  # the folder's last part
    assert (named.target.parameter, named.target.model, named.values) == ("weight", 1, (1, 2))
    with pytest.raises(UsageError, match=r"--grid models\[2\].weight: the recipe lists 2 models"):
        parse_axis("--grid", "models[2].weight=1", REFS)
    with pytest.raises(UsageError, match="no model of the recipe named 'poetry'"):
        parse_axis("--grid", "weight@poetry=1", REFS)
    with pytest.raises(UsageError, match="is not a number or a boolean"):
        parse_axis("--grid", "density=0.3,,0.5", REFS)
    with pytest.raises(UsageError, match="LOW < HIGH"):
        parse_axis("--random", "density=0.8:0.2", REFS)


def test_a_parameter_the_method_does_not_take_is_refused_by_name():
    axes = [parse_axis("--grid", "gamma=0.1", REFS)]
    with pytest.raises(UsageError, match=r"^--grid gamma: della does not take gamma in parameters"):
        check_axes(axes, "della", ("weight", "density", "epsilon", "lambda"), ("weight",))
    axes = [parse_axis("--grid", "lambda@math=1", REFS)]
    with pytest.raises(UsageError, match="does not take lambda per model"):
        check_axes(axes, "della", ("weight", "lambda"), ("weight",))


def test_a_random_search_draws_the_same_trials_from_the_same_seed_within_the_ranges():
    axes = [
        parse_axis("--random", "density=0.2:0.8", REFS),
        parse_axis("--grid", "lambda=1.0,1.5", REFS),
    ]
    first, again = random_settings(axes, 200, seed=3), random_settings(axes, 200, seed=3)
    assert first == again and first != random_settings(axes, 200, seed=4)
    densities = [s["density"] for s in first]
    assert all(0.2 <= d <= 0.8 for d in densities)
    # uniform on [0.2, 0.8]: mean 0.5, sd 0.6/sqrt(12) = 0.173, so the mean of 200 is within
    # 0.5 +- 0.05 (four standard errors)
    assert abs(sum(densities) / 200 - 0.5) < 0.05
    assert {s["lambda"] for s in first} == {1.0, 1.5}


def test_random_methods_get_each_seed_and_deterministic_ones_one():
    recipe = parse_recipe(DELLA, Path("/r/della.yaml"))
    axes = [
        parse_axis("--grid", "density=0.3,0.6", REFS),
        parse_axis("--grid", "weight@math=2", REFS),
    ]
    candidates = build_candidates(recipe, axes, grid_settings(axes), seeds=3)
    assert [(c.name, c.seed) for c in candidates] == [
        ("c000-s7", 7),
        ("c000-s8", 8),
        ("c000-s9", 9),
        ("c001-s7", 7),
        ("c001-s8", 8),
        ("c001-s9", 9),
    ]
    chosen = candidates[4].recipe
    assert chosen.seed == 8 and chosen.path == Path("/r/della.yaml")
    assert chosen.schema.parameters.density == 0.6 and chosen.schema.parameters.epsilon == 0.1
    assert chosen.schema.models[0].parameters.weight == 2
    assert chosen.schema.models[1].parameters.weight == 0.5  # what the grid leaves alone stays
    linear = parse_recipe(
        DELLA.replace("della", "task_arithmetic")
        .replace(", epsilon: 0.1", "")
        .replace("density: 0.5", "lambda: 1")
    )
    axes = [parse_axis("--grid", "lambda=1,2", REFS)]
    assert len(build_candidates(linear, axes, grid_settings(axes), seeds=3)) == 2


def test_a_value_out_of_range_is_refused_with_the_recipes_message_and_the_setting():
    recipe = parse_recipe(DELLA)
    axes = [parse_axis("--grid", "density=0.5,1.3", REFS)]
    with pytest.raises(UsageError) as refused:
        build_candidates(recipe, axes, grid_settings(axes), seeds=1)
    message = str(refused.value)
    assert message.startswith("--grid density=1.3: parameters.density:") and "\n" not in message


def test_the_table_has_each_settings_mean_and_sample_spread_and_marks_the_best():
    recipe = parse_recipe(DELLA)
    axes = [parse_axis("--grid", "density=0.3,0.6", REFS)]
    candidates = build_candidates(recipe, axes, grid_settings(axes), seeds=2)
    scores = {"c000-s7": 0.5, "c000-s8": 0.7, "c001-s7": 0.65}  # c001-s8 not scored yet
    results = summarize(candidates, scores)
    assert [(r.mean, r.seeds) for r in results] == [(pytest.approx(0.6), [7, 8]), (0.65, [7])]
    assert results[0].spread == pytest.approx(0.1414213, rel=1e-6)  # sqrt(0.02 / 1)
    assert results[1].spread == 0.0
    best = best_of(results, minimize=False)
    assert best is results[1] and best_of(results, minimize=True) is results[0]
    assert kept_candidate(results[0], minimize=False) == "c000-s8"
    assert csv_text(results).splitlines() == [
        "density,mean,spread,seeds,scores",
        "0.3,0.6,0.1414,2,0.5 0.7",
        "0.6,0.65,0,1,0.65",
    ]
    lines = table_lines(results, best)
    assert lines[2].startswith("* ") and not lines[1].startswith("*")


def test_the_state_file_round_trips_and_a_foreign_file_is_no_state(tmp_path):
    state = SweepState("abc", {"c000-s0": 0.25}, {"c001-s0": "exited with status 1"})
    state.save(tmp_path)
    assert SweepState.load(tmp_path) == state
    assert not list(tmp_path.glob(".*partial"))
    (tmp_path / "sweep_state.json").write_text(json.dumps({"something": "else"}))
    assert SweepState.load(tmp_path) is None


def test_the_score_is_the_last_line_or_a_json_field():
    assert read_score("loading...\n0.75\n\n", None) == 0.75
    document = {"results": {"arc_easy": {"acc,none": 0.61}}}
    assert read_score(json.dumps(document, indent=2), "results.arc_easy.acc,none") == 0.61
    assert read_score("log line\n" + json.dumps(document), "results.arc_easy.acc,none") == 0.61
    for stdout, field, message in [
        ("", None, "printed nothing"),
        ("done\n", None, "'done' is not a number"),
        ("nan\n", None, "its score is nan"),
        (json.dumps(document), "results.arc_easy.acc", "no field results.arc_easy.acc"),
        ("not json", "a", "not JSON"),
    ]:
        with pytest.raises(ScoreError, match=message):
            read_score(stdout, field)


def test_without_matplotlib_the_plot_is_an_svg_with_a_point_per_setting(tmp_path, monkeypatch):
    import sys

    from della_cli.sweep.plot import write_plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    recipe = parse_recipe(DELLA)
    axes = [
        parse_axis("--grid", "density=0.3,0.6", REFS),
        parse_axis("--grid", "rescale=true", REFS),
    ]
    candidates = build_candidates(recipe, axes, grid_settings(axes), seeds=1)
    results = summarize(candidates, {"c000-s7": 0.5, "c001-s7": 0.75})
    path = write_plot(tmp_path, results, results[1], "score")
    picture = path.read_text()
    assert path.name == "sweep.svg" and picture.startswith("<svg")
    assert picture.count("<circle") == 4  # two settings, in each of the two panels
    assert picture.count('fill="#d62728"') == 2  # the best, once per panel
    assert ">density<" in picture and ">True<" in picture  # a boolean axis is labelled
