"""Merges by slices: and modules: against mergekit 0.1.5 (tests/oracle.py) on tiny Llamas of
two, three and five layers: every tensor (within float32 rounding), config.json's
num_hidden_layers and embedding tying, and the output reloaded and run by transformers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from oracle import assert_same_model, config_of, load_tensors

from della_cli.api import MergeOptions, run_merge
from della_cli.preflight import plan_merge
from della_cli.recipe import load_recipe

OPTIONS = MergeOptions(device="cpu", progress=False)


@dataclass(frozen=True)
class Zoo:
    base: Path  # two layers
    experts: tuple[Path, Path]
    deep: tuple[Path, Path, Path]  # a five-layer base and two experts of it
    tied: Path  # three layers, tied embeddings


def source(model: Path, start: int, end: int, **parameters) -> dict:
    entry: dict = {"model": str(model), "layer_range": [start, end]}
    return {**entry, "parameters": parameters} if parameters else entry


CASES = {
    # base 0-2, expert 1-4 scaled by a gradient over its slice, then the two-layer base's
    # layer 1: 3 + 4 + 1 = 8 layers from models of two depths
    "frankenmerge": lambda z: {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [source(z.deep[0], 0, 3)]},
            {"sources": [source(z.deep[1], 1, 5, scale=[0.5, 2.0])]},
            {"sources": [source(z.base, 1, 2)]},
        ],
    },
    # weights and densities per source, a filter per slice, lambda graded per slice
    "ties-gradients": lambda z: {
        "merge_method": "ties",
        "base_model": str(z.deep[0]),
        "slices": [
            {
                "sources": [
                    source(z.deep[0], 0, 3),
                    source(z.deep[1], 0, 3, weight=[0.0, 1.0], density=0.5),
                    source(z.deep[2], 2, 5, weight=0.7),
                ],
                "parameters": {"density": [{"filter": "mlp", "value": 0.3}]},
            },
            {
                "sources": [
                    source(z.deep[0], 3, 5),
                    source(z.deep[1], 1, 3, weight=[{"filter": "layers.2.", "value": 2.0}]),
                    source(z.deep[2], 3, 5),
                ],
            },
        ],
        "parameters": {"weight": 0.4, "density": 0.8, "lambda": [1.0, 1.5]},
    },
    "linear-gradients": lambda z: {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    source(z.deep[1], 0, 4, weight=[1.0, 0.0, 2.0]),
                    source(z.deep[2], 1, 5, weight=[0.0, 1.0]),
                ]
            },
            {"sources": [source(z.deep[2], 4, 5), source(z.deep[0], 0, 1, weight=3.0)]},
        ],
        "parameters": {"weight": 1.0},
    },
    # modules: default: with slices; the module's parameters under the slices', over the top's
    "modules-default": lambda z: {
        "merge_method": "task_arithmetic",
        "base_model": str(z.base),
        "modules": {
            "default": {
                "slices": [
                    {
                        "sources": [
                            source(z.base, 0, 2),
                            source(z.experts[0], 0, 2, weight=[1.0, 0.2]),
                            source(z.experts[1], 0, 2),
                        ],
                        "parameters": {"lambda": 0.9},
                    },
                    {"sources": [source(z.base, 1, 2), source(z.experts[1], 0, 1)]},
                ],
                "parameters": {"weight": 0.6, "lambda": [1.0, 0.5]},
            }
        },
        "parameters": {"weight": 0.1, "lambda": 3.0},
    },
    # the second slice merges into its own base, one of the experts
    "slerp-slice-base": lambda z: {
        "merge_method": "slerp",
        "base_model": str(z.deep[0]),
        "slices": [
            {"sources": [source(z.deep[0], 0, 2), source(z.deep[1], 0, 2)]},
            {
                "sources": [source(z.deep[1], 2, 5), source(z.deep[2], 2, 5)],
                "base_model": str(z.deep[2]),
                "parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.3}]},
            },
        ],
        "parameters": {"t": 0.6},
    },
    # a trim method (the CPU kernels) merging the second slice into one of the experts
    "ties-slice-base": lambda z: {
        "merge_method": "ties",
        "base_model": str(z.deep[0]),
        "slices": [
            {
                "sources": [
                    source(z.deep[0], 0, 2),
                    source(z.deep[1], 0, 2, weight=1.0, density=0.5),
                    source(z.deep[2], 1, 3, weight=0.5),
                ]
            },
            {
                "sources": [
                    source(z.deep[1], 2, 5, weight=0.6, density=0.7),
                    source(z.deep[2], 2, 5, weight=1.0),
                    source(z.deep[0], 0, 3, weight=0.3, density=0.4),
                ],
                "base_model": str(z.deep[2]),
            },
        ],
        "parameters": {"density": 0.5},
    },
    # the embeddings of a tied model, the layers and lm_head of an untied one; the base_model
    # (which passthrough does not read) names the config: without one, mergekit takes that of
    # an arbitrary model (set order), so its tie_word_embeddings would vary from run to run
    "tied-then-untied": lambda z: {
        "merge_method": "passthrough",
        "base_model": str(z.experts[0]),
        "slices": [
            {"sources": [source(z.tied, 0, 2)]},
            {"sources": [source(z.experts[0], 0, 2)]},
        ],
    },
}
LAYERS = {
    "frankenmerge": 8,
    "ties-gradients": 5,
    "linear-gradients": 5,
    "modules-default": 3,
    "slerp-slice-base": 5,
    "ties-slice-base": 5,
    "tied-then-untied": 4,
}


@pytest.fixture(scope="module")
def zoo(model_zoo) -> Zoo:
    deep = tuple(model_zoo("llama", expert=e, layers=5) for e in (None, 1, 2))
    experts = (model_zoo("llama", expert=1), model_zoo("llama", expert=2))
    return Zoo(model_zoo("llama"), experts, deep, model_zoo("llama", tie=True, layers=3))


@pytest.fixture(scope="module")
def recipes(zoo, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("slices-recipes")
    paths = {}
    for name, build in CASES.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(build(zoo), sort_keys=False))
    return paths


@pytest.fixture(scope="module")
def mergekit_outputs(mergekit, recipes, tmp_path_factory) -> dict[str, Path]:
    return mergekit.merge_many(recipes, tmp_path_factory.mktemp("slices-mergekit"))


@pytest.fixture(scope="module")
def outputs(recipes, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("slices-della")
    return {
        case: run_merge(path, folder / case, OPTIONS) and folder / case
        for case, path in recipes.items()
    }


@pytest.mark.oracle
@pytest.mark.parametrize("case", list(CASES))
def test_sliced_merge_matches_mergekit(case, outputs, mergekit_outputs):
    assert_same_model(outputs[case], mergekit_outputs[case])
    assert config_of(outputs[case])["num_hidden_layers"] == LAYERS[case]


def test_frankenmerge_takes_each_layer_from_its_source(outputs, zoo):
    """Checked without mergekit: output layer k is its source's layer, scaled where asked."""
    out = load_tensors(outputs["frankenmerge"])
    deep_base, deep_expert = load_tensors(zoo.deep[0]), load_tensors(zoo.deep[1])
    name = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(out["model.embed_tokens.weight"], deep_base["model.embed_tokens.weight"])
    assert torch.equal(out[name.format(2)], deep_base[name.format(2)])
    for offset, scale in enumerate((0.5, 1.0, 1.5, 2.0)):  # the gradient [0.5, 2] over 4
        expected = deep_expert[name.format(1 + offset)] * scale
        torch.testing.assert_close(out[name.format(3 + offset)], expected)
    assert torch.equal(out[name.format(7)], load_tensors(zoo.base)[name.format(1)])
    assert torch.equal(out["lm_head.weight"], load_tensors(zoo.base)["lm_head.weight"])
    assert f"model.layers.{LAYERS['frankenmerge']}.mlp.up_proj.weight" not in out


@pytest.mark.parametrize("case", ["frankenmerge", "tied-then-untied", "modules-default"])
def test_transformers_reloads_and_runs_the_output(case, outputs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(outputs[case])
    assert model.config.num_hidden_layers == LAYERS[case]
    logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_the_written_recipe_reads_back_as_the_one_merged(outputs, recipes):
    for case in ("frankenmerge", "modules-default"):
        written = load_recipe(outputs[case] / "della_recipe.yaml").schema
        merged = load_recipe(recipes[case]).schema
        # the same slices, with local folders named by their own name only
        assert [Path(ref.model).name for ref in merged.models] == [
            ref.model for ref in written.models
        ]
        assert [
            [(s.start, s.end, s.parameters) for s in piece.sources] for piece in merged.slices
        ] == [[(s.start, s.end, s.parameters) for s in piece.sources] for piece in written.slices]
        assert written.module_parameters == merged.module_parameters
        card = (outputs[case] / "README.md").read_text()
        assert f"## Layers\n\n{LAYERS[case]} layers" in card


def test_the_plan_shows_the_layer_map(recipes, zoo):
    report = plan_merge(recipes["frankenmerge"], None, OPTIONS)
    assert report.layers["count"] == 8
    deep_base, deep_expert, base = (str(p) for p in (zoo.deep[0], zoo.deep[1], zoo.base))
    assert report.layers["map"] == (
        f"layers 0-2 ← {deep_base} 0-2; 3-6 ← {deep_expert} 1-4; 7 ← {base} 1"
    )
    assert any(
        line.startswith("num_hidden_layers 8: layers 0-2") for line in report.summary_lines()
    )


def test_a_range_past_a_model_is_refused_before_anything_is_written(zoo, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"merge_method": "passthrough", "slices": [{"sources": [source(zoo.base, 1, 4)]}]}
        )
    )
    report = plan_merge(recipe, None, OPTIONS)
    assert report.problems == [
        f"slices[0].sources[0].layer_range: [1, 4) goes past the 2 layers of '{zoo.base}'"
    ]


def test_a_killed_sliced_merge_resumes_to_the_same_bytes(recipes, tmp_path, monkeypatch):
    """The frankenmerge in shards of about one layer: killed after 30 tensors, resumed; the
    kept shards are not merged again and every shard is the uninterrupted run's."""
    from killed_merges import kill_after

    options = MergeOptions(device="cpu", progress=False, out_shard_bytes=40_000)
    reference, out = tmp_path / "whole", tmp_path / "resumed"
    run_merge(recipes["frankenmerge"], reference, options)
    kill_after(30, recipes["frankenmerge"], out, options, monkeypatch)
    done = []
    resumed = MergeOptions(device="cpu", progress=False, out_shard_bytes=40_000, resume=True)
    report = run_merge(recipes["frankenmerge"], out, resumed, on_progress=done.append)
    assert report.resumed_shards >= 1 and len(done) < report.tensors
    shards = sorted(p.name for p in reference.glob("*.safetensors"))
    assert len(shards) > 2
    assert shards == sorted(p.name for p in out.glob("*.safetensors"))
    for name in shards:
        assert (out / name).read_bytes() == (reference / name).read_bytes()


def test_whole_model_slices_write_what_models_writes(zoo, tmp_path):
    """One slice covering every layer of the base and both experts is mergekit's reading of
    ``models:``: the same shards, byte for byte, in the same order."""
    parameters = ({"weight": [1.0, 0.3], "density": 0.6}, {"weight": 0.5, "density": 0.4})
    as_models = {
        "merge_method": "ties",
        "base_model": str(zoo.base),
        "models": [
            {"model": str(e), "parameters": p} for e, p in zip(zoo.experts, parameters, strict=True)
        ],
    }
    as_slices = {
        "merge_method": "ties",
        "base_model": str(zoo.base),
        "slices": [
            {
                "sources": [source(zoo.base, 0, 2)]
                + [source(e, 0, 2, **p) for e, p in zip(zoo.experts, parameters, strict=True)]
            }
        ],
    }
    folders = []
    for name, recipe in (("models", as_models), ("slices", as_slices)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        run_merge(path, tmp_path / name, OPTIONS)
        folders.append(tmp_path / name)
    shards = sorted(p.name for p in folders[0].glob("*.safetensors"))
    for shard in shards:
        assert (folders[0] / shard).read_bytes() == (folders[1] / shard).read_bytes()
    assert config_of(folders[0]) == config_of(folders[1])


def test_per_layer_config_lists_follow_their_layers(model_zoo, tmp_path):
    """Gemma 2 alternates sliding and full attention (``layer_types``); a frankenmerge keeps
    each output layer's type, so transformers 5 loads and runs it (mergekit 0.1.5 leaves the
    list at the old length, which transformers refuses)."""
    from transformers import AutoModelForCausalLM

    base = model_zoo("gemma2", layers=4)
    recipe = tmp_path / "gemma2.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [source(base, 0, 3)]},
                    {"sources": [source(model_zoo("gemma2", expert=1, layers=4), 2, 4)]},
                ],
            }
        )
    )
    run_merge(recipe, tmp_path / "out", OPTIONS)
    types = config_of(base)["layer_types"]
    assert types == ["sliding_attention", "full_attention"] * 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.layer_types == [types[0], types[1], types[2], types[2], types[3]]
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


def test_della_plan_prints_the_map_and_a_bad_slice_exits_2_in_one_line(recipes, tmp_path):
    from typer.testing import CliRunner

    from della_cli.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["plan", str(recipes["frankenmerge"])])
    assert result.exit_code == 0, result.stderr
    assert "num_hidden_layers 8: layers 0-2 ← " in result.stdout
    bad = tmp_path / "bad.yaml"
    recipe = yaml.safe_load(recipes["frankenmerge"].read_text())
    recipe["slices"][1]["sources"][0]["layer_range"] = [5, 1]
    bad.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["plan", str(bad)])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: slices[1].sources[0].layer_range"), lines
