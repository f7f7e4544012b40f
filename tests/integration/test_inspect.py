"""``della inspect``: every statistic in closed form on models built as base + known deltas.

Values are small dyadic fractions, exact in float32, so the task vectors the command reads back
are exactly the deltas written.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from della_cli.api import MergeOptions
from della_cli.cli import app
from della_cli.inspection import run as inspect_run
from della_cli.inspection.arrays import NumpyArrays, TorchArrays
from della_cli.inspection.run import inspect_recipe
from della_cli.inspection.select import ExpertCuts
from della_cli.io.reader import ModelReader
from della_cli.methods.counts import magnitude_rank_window
from della_cli.methods.sparsify import rank_at_least_mask

runner = CliRunner()
LAYER = "model.layers.{}.mlp.up_proj.weight"


def save_model(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
    return folder


def dyadic(shape: tuple[int, ...], seed: int, low: int = 1) -> torch.Tensor:
    """Values k/64 with |k| in [low, 64), signs mixed: exact in float32, never zero if low ≥ 1."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.randint(low, 64, shape, generator=generator)
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return (magnitude * sign).float() / 64


def base_tensors(layers: int = 2, shape: tuple[int, int] = (4, 8)) -> dict[str, torch.Tensor]:
    tensors = {LAYER.format(i): dyadic(shape, seed=100 + i) * 4 for i in range(layers)}
    tensors["model.norm.weight"] = dyadic((shape[1],), seed=99) * 4
    return tensors


def build(tmp_path: Path, base, deltas, method="ties", parameters=None, **top) -> Path:
    """A base, one expert per delta dict (base + delta), and a recipe merging them."""
    base_folder = save_model(tmp_path / "base", base) if base is not None else None
    experts = []
    for index, delta in enumerate(deltas):
        reference = base if base is not None else {n: torch.zeros_like(t) for n, t in delta.items()}
        tensors = {name: reference[name] + delta[name] for name in reference}
        experts.append(save_model(tmp_path / f"expert{index}", tensors))
    recipe = {
        "merge_method": method,
        **({"base_model": str(base_folder)} if base_folder else {}),
        "models": [{"model": str(folder)} for folder in experts],
        "parameters": parameters if parameters is not None else {"density": 0.5},
        **top,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


def inspect_json(recipe: Path, *extra: str) -> tuple[dict, str]:
    result = runner.invoke(app, ["inspect", str(recipe), "--device", "cpu", "--json", *extra])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout), result.stderr


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


def test_opposite_task_vectors_conflict_everywhere(tmp_path):
    base = base_tensors()
    delta = {name: dyadic(t.shape, seed=i) / 8 for i, (name, t) in enumerate(base.items())}
    report, _ = inspect_json(build(tmp_path, base, [delta, {n: -t for n, t in delta.items()}]))
    model = report["model"]
    expected = norm(delta) / norm(base)
    assert model["relative_norm"] == pytest.approx([expected, expected], rel=1e-12)
    assert model["cosine"][0][1] == pytest.approx(-1.0, abs=1e-12)
    assert model["sign_conflict"] == 1.0
    assert model["topd_sign_conflict"] == [1.0, 1.0]
    assert model["topd_jaccard"][0][1] == 1.0  # same magnitudes, same positions
    assert model["entries"] == sum(t.numel() for t in base.values())


def test_scaled_task_vectors_agree_and_are_reported_as_duplicates(tmp_path):
    base = base_tensors()
    delta = {name: dyadic(t.shape, seed=i) / 8 for i, (name, t) in enumerate(base.items())}
    recipe = build(tmp_path, base, [delta, {n: 2 * t for n, t in delta.items()}])
    report, stderr = inspect_json(recipe)
    model = report["model"]
    first, second = model["relative_norm"]
    assert second / first == pytest.approx(2.0, rel=1e-12)
    assert model["cosine"][0][1] == pytest.approx(1.0, abs=1e-12)
    assert model["sign_conflict"] == 0.0 and model["topd_sign_conflict"] == [0.0, 0.0]
    assert model["topd_jaccard"][0][1] == 1.0
    duplicates = [w for w in report["warnings"] if "near duplicates" in w]
    assert len(duplicates) == 1 and "expert0" in duplicates[0] and "expert1" in duplicates[0]
    assert "near duplicates" not in stderr  # --json: warnings only in the object
    text = runner.invoke(app, ["inspect", str(recipe), "--device", "cpu"])
    assert text.exit_code == 0 and "warning: " in text.stderr and "near duplicates" in text.stderr


def test_disjoint_supports_do_not_overlap(tmp_path):
    base = base_tensors()
    first, second = {}, {}
    for i, (name, t) in enumerate(base.items()):
        values = dyadic(t.shape, seed=i).reshape(-1)
        half = values.numel() // 2
        a, b = values.clone(), values.clone()
        a[half:] = 0
        b[:half] = 0
        first[name], second[name] = a.reshape(t.shape), b.reshape(t.shape)
    report, _ = inspect_json(build(tmp_path, base, [first, second]))
    model = report["model"]
    assert model["cosine"][0][1] == 0.0
    assert model["topd_jaccard"][0][1] == 0.0  # density 0.5: each top-d mask is its support
    assert model["sign_conflict"] == 0.0 and model["topd_sign_conflict"] == [0.0, 0.0]
    assert model["kept_mass"]["ties"] == [1.0, 1.0]  # the top half holds all the mass


# ALGORITHMS.md E5: one row, d = 0.7, ε = 0.1, so k = [0.60, 0.75, 0.65, 0.80, 0.70].
E5_ROW = [0.05, -0.40, 0.10, 0.80, -0.20]


def test_kept_mass_of_each_sparsifier_on_a_worked_row(tmp_path):
    row = torch.tensor([E5_ROW])
    zero = {"w": torch.zeros(1, 5)}
    recipe = build(tmp_path, zero, [{"w": row}], "della", {"density": 0.7, "epsilon": 0.1})
    kept = inspect_json(recipe)[0]["model"]["kept_mass"]
    l1 = 1.55
    magprune = 0.60 * 0.05 + 0.75 * 0.40 + 0.65 * 0.10 + 0.80 * 0.80 + 0.70 * 0.20
    assert kept["magprune"] == pytest.approx([magprune / l1], rel=1e-6)  # 1.175 / 1.55
    assert kept["ties"] == pytest.approx([(0.80 + 0.40 + 0.20) / l1], rel=1e-6)  # top ⌊3.5⌋
    assert kept["dare"] == [0.7]
    # breadcrumbs, γ = 0.2 of 5: the largest (0.8) goes, the next ⌊0.6·5⌋ = 3 stay
    crumbs = build(
        tmp_path / "b", zero, [{"w": row}], "breadcrumbs", {"density": 0.6, "gamma": 0.2}
    )
    kept = inspect_json(crumbs)[0]["model"]["kept_mass"]
    assert kept["breadcrumbs"] == pytest.approx([(0.40 + 0.20 + 0.10) / l1], rel=1e-6)
    assert kept["ties"] == pytest.approx([(0.80 + 0.40 + 0.20) / l1], rel=1e-6)
    # density 1 keeps everything, whatever epsilon and gamma say
    whole = build(tmp_path / "w", zero, [{"w": row}], "della", {"density": 1.0, "epsilon": 0.1})
    kept = inspect_json(whole)[0]["model"]["kept_mass"]
    assert all(kept[name] == [1.0] for name in kept), kept


def test_magprune_ranks_within_rows(tmp_path):
    """Two rows ranked separately: the row of large values gets no higher keep probabilities
    than the row of small ones for being larger."""
    rows = torch.tensor([[1.0, 2.0], [64.0, 32.0]])
    recipe = build(tmp_path, {"w": torch.zeros(2, 2)}, [{"w": rows}], "della", {"density": 0.5,
                   "epsilon": 0.25})  # fmt: skip
    kept = inspect_json(recipe)[0]["model"]["kept_mass"]["magprune"]
    # per row k = [0.25, 0.75] by ascending rank
    expected = (0.25 * 1 + 0.75 * 2 + 0.25 * 32 + 0.75 * 64) / 99
    assert kept == pytest.approx([expected], rel=1e-9)


@pytest.mark.parametrize("arrays", [NumpyArrays(), TorchArrays("cpu")], ids=lambda a: a.name)
@pytest.mark.parametrize("density", [0.001, 0.3, 0.5, 0.97])
@pytest.mark.parametrize("block", [7, 64, 1000])
def test_streamed_top_d_cut_is_the_merge_selection(arrays, density, block):
    """Many equal magnitudes (ties broken by position) and blocks that split them."""
    generator = torch.Generator().manual_seed(7)
    delta = torch.randint(-6, 7, (1000,), generator=generator).float() / 4
    numel = delta.numel()
    ranks = [magnitude_rank_window(numel, density, None)[0], 0, numel]
    values = arrays.float32(delta.numpy())
    keys = arrays.keys(values)
    cuts = ExpertCuts(numel, ranks)
    for step in ("add_high", "add_low"):
        for start in range(0, numel, block):
            getattr(cuts, step)(keys[start : start + block], arrays)
    masks = [
        np.concatenate(
            [arrays.host(cut.mask(keys[a : a + block], arrays)) for a in range(0, numel, block)]
        )
        for cut in cuts.cuts()
    ]
    assert np.array_equal(masks[0], rank_at_least_mask(delta.abs(), ranks[0]).numpy())
    assert masks[1].all() and not masks[2].any()


def test_json_schema(tmp_path):
    base = base_tensors(layers=11)  # layer 10 comes before layer 2 in the file
    deltas = [
        {name: dyadic(t.shape, seed=10 * e + i) / 8 for i, (name, t) in enumerate(base.items())}
        for e in range(3)
    ]
    report, _ = inspect_json(build(tmp_path, base, deltas))
    assert set(report) == {
        "recipe", "method", "device", "reference", "experts", "block_elements", "model",
        "groups", "layers", "warnings",
    }  # fmt: skip
    assert report["method"] == "ties" and report["reference"] == "base"
    assert report["device"] == "cpu" and report["warnings"] == []
    assert [e["density"] for e in report["experts"]] == [0.5] * 3
    assert report["experts"][0]["assumed"] == ["epsilon", "gamma"]
    metric_keys = {
        "tensors", "entries", "relative_norm", "foreign_share", "cosine", "sign_conflict",
        "topd_sign_conflict", "topd_jaccard", "kept_mass",
    }  # fmt: skip
    assert set(report["model"]) == metric_keys
    assert set(report["model"]["kept_mass"]) == {"ties", "dare", "magprune", "breadcrumbs"}
    assert all(len(v) == 3 for v in report["model"]["kept_mass"].values())
    assert np.array(report["model"]["cosine"]).shape == (3, 3)
    groups = {g["group"]: g for g in report["groups"]}
    assert set(groups) == {"model.layers.*.mlp.up_proj.weight", "model.norm.weight"}
    layered = groups["model.layers.*.mlp.up_proj.weight"]
    assert [cell["layer"] for cell in layered["layers"]] == list(range(11))
    assert set(layered["layers"][0]) == metric_keys | {"layer"}
    assert groups["model.norm.weight"]["layers"] == []
    assert [cell["layer"] for cell in report["layers"]] == list(range(11))
    assert report["model"]["tensors"] == 12 and layered["tensors"] == 11


def test_terminal_table_lists_groups_and_the_whole_model(tmp_path):
    base = base_tensors()
    delta = {name: dyadic(t.shape, seed=i) / 8 for i, (name, t) in enumerate(base.items())}
    recipe = build(tmp_path, base, [delta, {n: -t for n, t in delta.items()}])
    result = runner.invoke(app, ["inspect", str(recipe), "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("model.layers.*.mlp.up_proj.weight ") for line in lines)
    assert any(line.startswith("all ") and "100.0%" in line for line in lines)
    assert "  cosine: A·B -1.000" in lines
    header = next(line for line in lines if line.startswith("group "))
    readme = (Path(__file__).parents[2] / "README.md").read_text().splitlines()
    columns = re.compile(r"\s{2,}")
    assert any(columns.split(line) == columns.split(header) for line in readme), header
    assert all(line == line.rstrip() for line in lines)


def test_png_is_a_png_and_html_loads_nothing(tmp_path):
    base = base_tensors(layers=3)
    delta = {name: dyadic(t.shape, seed=i) / 8 for i, (name, t) in enumerate(base.items())}
    recipe = build(tmp_path, base, [delta, {n: t / 2 for n, t in delta.items()}])
    png, page = tmp_path / "out.png", tmp_path / "out.html"
    inspect_json(recipe, "--png", str(png), "--html", str(page))
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    text = page.read_text()
    assert text.count("<svg") == 6 and "mlp.up_proj.weight" in text
    lowered = text.lower()
    for external in ("http:", "https:", "//", "src=", "href=", "<script", "@import", "url("):
        assert external not in lowered, external


def test_png_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    base = base_tensors()
    delta = {name: dyadic(t.shape, seed=i) / 8 for i, (name, t) in enumerate(base.items())}
    recipe = build(tmp_path, base, [delta])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    monkeypatch.setattr(ModelReader, "read_rows", None)  # refused before any tensor is read
    result = runner.invoke(
        app, ["inspect", str(recipe), "--device", "cpu", "--png", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: --png needs matplotlib; install it with pip install 'della-cli[inspect]' "
        "(or use --html, which needs nothing)"
    ]


def test_an_expert_of_another_base_is_reported(tmp_path):
    base = base_tensors()
    small = {name: dyadic(t.shape, seed=i) / 64 for i, (name, t) in enumerate(base.items())}
    # an unrelated model: its own weights, as large as the base's
    unrelated = {
        name: dyadic(t.shape, seed=50 + i) * 4 - t for i, (name, t) in enumerate(base.items())
    }
    report, _ = inspect_json(build(tmp_path, base, [small, unrelated]))
    norms = report["model"]["relative_norm"]
    assert norms[0] < 0.1 and norms[1] > 0.5
    assert report["model"]["foreign_share"] == [0.0, 1.0]
    foreign = [w for w in report["warnings"] if "does not look fine-tuned" in w]
    assert len(foreign) == 1 and "expert1" in foreign[0]


def test_linear_compares_the_models_with_their_mean(tmp_path):
    mean = base_tensors()
    delta = {name: dyadic(t.shape, seed=i) / 8 for i, (name, t) in enumerate(mean.items())}
    models = [{n: mean[n] + delta[n] for n in mean}, {n: mean[n] - delta[n] for n in mean}]
    report, _ = inspect_json(build(tmp_path, None, models, "linear", {}))
    assert report["reference"] == "mean"
    assert report["experts"][0]["assumed"] == ["density", "epsilon", "gamma"]
    model = report["model"]
    expected = norm(delta) / norm(mean)
    assert model["relative_norm"] == pytest.approx([expected, expected], rel=1e-12)
    assert model["cosine"][0][1] == pytest.approx(-1.0, abs=1e-12)


def test_inputs_are_checked_as_a_merge_checks_them(tmp_path):
    base = base_tensors()
    recipe = build(tmp_path, base, [{name: torch.zeros_like(t) for name, t in base.items()}])
    wrong = {**base, LAYER.format(0): torch.zeros(3, 8)}
    save_file(wrong, tmp_path / "expert0" / "model.safetensors")
    result = runner.invoke(app, ["inspect", str(recipe), "--device", "cpu"])
    assert result.exit_code == 2 and result.stdout == ""
    assert "error: the merge cannot run" in result.stderr and "shape" in result.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text(recipe.read_text().replace("expert0", "nowhere"))
    result = runner.invoke(app, ["inspect", str(missing), "--device", "cpu"])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "does not exist" in result.stderr
    result = runner.invoke(app, ["inspect", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1


def test_memory_holds_a_few_rows_of_a_tensor_larger_than_a_block(tmp_path, monkeypatch):
    """A (64, 16) tensor in blocks of 32 entries: every read is of at most 2 rows, no tensor
    is read whole, and the statistics do not depend on the blocking."""
    base = {"big.weight": dyadic((64, 16), seed=1) * 4, "bias": dyadic((16,), seed=2)}
    delta = {name: dyadic(t.shape, seed=3 + i) / 8 for i, (name, t) in enumerate(base.items())}
    recipe = build(tmp_path, base, [delta, {n: t * 0.5 for n, t in delta.items()}], "della",
                   {"density": 0.3, "epsilon": 0.1})  # fmt: skip
    reads: list[tuple[str, int]] = []
    read_rows, read = ModelReader.read_rows, ModelReader.read

    def counting_rows(self, name, start, stop, pool=None):
        reads.append((name, stop - start))
        return read_rows(self, name, start, stop, pool)

    def counting_read(self, name):
        reads.append((name, self.tensors[name].shape[0] if self.tensors[name].shape else 1))
        return read(self, name)

    monkeypatch.setattr(ModelReader, "read_rows", counting_rows)
    monkeypatch.setattr(ModelReader, "read", counting_read)
    options = MergeOptions(device="cpu", progress=False)
    small = inspect_recipe(recipe, options, block_elements=32)
    big_reads = [rows for name, rows in reads if name == "big.weight"]
    # 3 models, 32 blocks, 3 passes (two to find the top-d cut, one to sum)
    assert max(big_reads) == 2 and len(big_reads) == 3 * 32 * 3
    whole = inspect_recipe(recipe, options, block_elements=1 << 20)
    assert flat(small.model) == pytest.approx(flat(whole.model), rel=1e-9)


def flat(value) -> list[float]:
    """Every number of a nested report value, in order."""
    if isinstance(value, dict):
        return [x for key in sorted(value) for x in flat(value[key])]
    if isinstance(value, list):
        return [x for item in value for x in flat(item)]
    return [float(value)]


def test_groups_of_a_real_model_are_those_of_della_plan(bf16_recipe):
    recipe = bf16_recipe("della", {"density": 0.5, "epsilon": 0.1})
    report, _ = inspect_json(recipe)
    plan = json.loads(runner.invoke(app, ["plan", str(recipe), "--json"]).stdout)
    merged = {g["tensors"]: g["count"] for g in plan["groups"] if g["action"] == "merged"}
    assert {g["group"]: g["tensors"] for g in report["groups"]} == merged
    assert "model.layers.*.mlp.up_proj.weight" in merged
    assert [cell["layer"] for cell in report["layers"]] == [0, 1]
    # The zoo's experts are base + N(0, 0.02²) on weights initialised with std 0.02: as
    # large as the weights in every matrix, which is what the warning is for.
    assert report["model"]["relative_norm"] == pytest.approx([0.24, 0.24], abs=0.01)
    assert [w.split("'")[1] for w in report["warnings"]] == [r["model"] for r in report["experts"]]
    assert abs(report["model"]["cosine"][0][1]) < 0.05


def test_torch_arrays_give_the_numpy_figures(tmp_path, monkeypatch):
    """The torch path (what a GPU runs) on the CPU, against the numpy one."""
    base = base_tensors(layers=2, shape=(16, 8))
    deltas = [
        {
            name: dyadic(t.shape, seed=10 * e + i, low=0) / 8
            for i, (name, t) in enumerate(base.items())
        }
        for e in range(3)
    ]
    recipe = build(tmp_path, base, deltas, "breadcrumbs", {"density": 0.4, "gamma": 0.05})
    options = MergeOptions(device="cpu", progress=False)
    numpy_report = inspect_recipe(recipe, options, block_elements=40)
    monkeypatch.setattr(inspect_run, "arrays_for", lambda device: TorchArrays(device))
    torch_report = inspect_recipe(recipe, options, block_elements=40)
    assert flat(torch_report.model) == pytest.approx(flat(numpy_report.model), rel=1e-12)
    assert flat(torch_report.groups[0]["layers"]) == pytest.approx(
        flat(numpy_report.groups[0]["layers"]), rel=1e-12
    )


def test_vocabulary_rows_are_fitted_as_the_merge_fits_them(tmp_path):
    """An expert with 2 extra token rows (cropped) and one with 2 fewer (padded with zero
    deltas); then with tokenizer_source the longer one, whose extra rows join the reference."""
    embed = "model.embed_tokens.weight"
    base = dyadic((8, 4), seed=1) * 4
    delta_a, delta_b = dyadic((8, 4), seed=2) / 8, dyadic((6, 4), seed=3) / 8
    extra = dyadic((2, 4), seed=4) * 4
    recipe = build(tmp_path, {embed: base}, [{embed: delta_a}, {embed: torch.zeros(8, 4)}])
    save_file({embed: torch.cat([base + delta_a, extra])}, tmp_path / "expert0/model.safetensors")
    save_file({embed: base[:6] + delta_b}, tmp_path / "expert1/model.safetensors")
    model = inspect_json(recipe)[0]["model"]
    assert model["entries"] == 32
    expected = [norm({"a": delta_a}) / norm({"b": base}), norm({"b": delta_b}) / norm({"b": base})]
    assert model["relative_norm"] == pytest.approx(expected, rel=1e-12)
    cosine = float((delta_a[:6] * delta_b).sum()) / norm({"a": delta_a}) / norm({"b": delta_b})
    assert model["cosine"][0][1] == pytest.approx(cosine, rel=1e-12)

    data = json.loads(recipe.read_text())
    data["tokenizer_source"] = data["models"][0]["model"]
    recipe.write_text(json.dumps(data))
    model = inspect_json(recipe)[0]["model"]
    assert model["entries"] == 40  # the output has the tokenizer source's 10 rows
    reference = norm({"b": base, "extra": extra})
    expected = [norm({"a": delta_a}) / reference, norm({"b": delta_b}) / reference]
    assert model["relative_norm"] == pytest.approx(expected, rel=1e-12)


def test_non_finite_inputs_give_null_not_nan(tmp_path):
    base = base_tensors()
    delta = {name: dyadic(t.shape, seed=i) / 8 for i, (name, t) in enumerate(base.items())}
    delta[LAYER.format(0)][0, 0] = float("nan")
    result = runner.invoke(app, ["inspect", str(build(tmp_path, base, [delta])), "--json"])
    assert result.exit_code == 0, result.stderr

    def refuse(constant: str):
        raise AssertionError(f"{constant} in the JSON")

    report = json.loads(result.stdout, parse_constant=refuse)
    cell = report["groups"][0]["layers"][0]
    assert cell["relative_norm"] == [None] and cell["kept_mass"]["ties"] == [None]
    assert report["groups"][0]["layers"][1]["relative_norm"][0] > 0  # other tensors unaffected
