"""Hub models end to end through a local stand-in for the Hub (tests/hub_server.py).

The real ``huggingface_hub`` client talks HTTP to 127.0.0.1: downloads pinned to commits, the
offline cache, pushes in one commit, and every failure as one line with the right exit code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import VALID_TOKEN, FakeHub
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

from della_cli.api import MergeOptions, run_merge
from della_cli.cli import app
from della_cli.tiny import make_expert, random_delta

PARAMETERS = {"density": 0.7, "epsilon": 0.07, "lambda": 1.1}
runner = CliRunner()


def invoke(*args: object) -> Result:
    return runner.invoke(app, [str(arg) for arg in args])


def recipe(base: str, *models: str) -> dict:
    return {
        "merge_method": "della",
        "base_model": base,
        "models": [{"model": ref, "parameters": {"weight": 1.0}} for ref in models],
        "parameters": PARAMETERS,
        "seed": 3,
    }


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def one_line_error(result: Result, code: int, fragment: str) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert VALID_TOKEN not in result.output
    return lines[0]


@pytest.fixture
def published(fake_hub: FakeHub, model_zoo) -> dict[str, str]:
    """org/base (tagged v1), org/math and org/code on the fake Hub; their commits by id."""
    commits = {"org/base": fake_hub.add_model("org/base", model_zoo("llama"), tag="v1")}
    for index, name in enumerate(("org/math", "org/code"), start=1):
        commits[name] = fake_hub.add_model(name, model_zoo("llama", expert=index))
    return commits


def test_hub_merge_pins_commits_equals_local_merge_and_reruns_offline(
    fake_hub, published, model_zoo, write_recipe, tmp_path, monkeypatch
):
    math_commit = published["org/math"]
    hub_recipe = write_recipe(recipe("org/base@v1", f"org/math@{math_commit}", "org/code"))
    report = run_merge(hub_recipe, tmp_path / "hub-out", MergeOptions(device="cpu"))
    assert report.inputs == {
        "org/base@v1": published["org/base"],
        f"org/math@{math_commit}": math_commit,
        "org/code": published["org/code"],
    }
    local = [str(model_zoo("llama", expert=i)) for i in (1, 2)]
    local_recipe = write_recipe(recipe(str(model_zoo("llama")), *local), "local.yaml")
    run_merge(local_recipe, tmp_path / "local-out", MergeOptions(device="cpu"))
    hub_out, local_out = tmp_path / "hub-out", tmp_path / "local-out"
    assert (hub_out / "model.safetensors").read_bytes() == (
        local_out / "model.safetensors"
    ).read_bytes()
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (hub_out / name).read_bytes() == (local_out / name).read_bytes()

    front = front_matter((hub_out / "README.md").read_text())
    assert front["base_model"] == ["org/base", "org/math", "org/code"]
    assert front["base_model_relation"] == "merge"
    assert [(i["model"], i["commit"]) for i in front["merge_inputs"]] == [
        (name, published[name]) for name in ("org/base", "org/math", "org/code")
    ]
    assert front["merge_inputs"][0]["revision"] == "v1"

    # The Hub moves on and goes away; offline, the cache gives the same inputs back.
    fake_hub.add_model("org/code", model_zoo("llama", expert=3))
    fake_hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests_before = len(fake_hub.requests)
    again = run_merge(hub_recipe, tmp_path / "offline-out", MergeOptions(device="cpu"))
    assert again.inputs == report.inputs
    assert len(fake_hub.requests) == requests_before
    assert (tmp_path / "offline-out" / "model.safetensors").read_bytes() == (
        hub_out / "model.safetensors"
    ).read_bytes()


def test_revisions_resolve_to_their_commits_and_only_merge_files_download(
    fake_hub, model_zoo, write_recipe, tmp_path
):
    base = model_zoo("llama")
    first = fake_hub.add_model("org/base", base)
    expert = model_zoo("llama", expert=1)
    first_math = fake_hub.add_model("org/math", expert)
    # A later commit on main changes the expert and adds files a merge must not download.
    changed = make_expert(base, tmp_path / "changed", random_delta(9))
    (changed / "training_args.bin").write_bytes(b"x" * 1000)
    (changed / "optimizer.pt").write_bytes(b"y" * 1000)
    latest_math = fake_hub.add_model("org/math", changed)

    pinned = write_recipe(recipe("org/base", f"org/math@{first_math}"), "pinned.yaml")
    report = run_merge(pinned, tmp_path / "pinned", MergeOptions(device="cpu"))
    assert report.inputs == {"org/base": first, f"org/math@{first_math}": first_math}
    latest = write_recipe(recipe("org/base", "org/math@main"), "latest.yaml")
    assert run_merge(latest, tmp_path / "latest", MergeOptions(device="cpu")).inputs == {
        "org/base": first,
        "org/math@main": latest_math,
    }
    expected = load_file(expert / "model.safetensors")
    got = {k: v for k, v in load_file(changed / "model.safetensors").items()}
    assert any(not (expected[k] == got[k]).all() for k in expected)
    downloaded = {r.path.rsplit("/", 1)[-1] for r in fake_hub.requests if r.served_bytes}
    assert "training_args.bin" not in downloaded and "optimizer.pt" not in downloaded


@pytest.mark.parametrize(
    ("model", "code", "fragment"),
    [
        ("org/nowhere", 2, "model 'org/nowhere': no such repository on the Hub"),
        ("org/base@no-such-branch", 2, "no such revision (branch, tag or commit)"),
    ],
    ids=["missing-repo", "missing-revision"],
)
def test_unknown_repo_or_revision_is_one_line(
    published, write_recipe, tmp_path, model, code, fragment
):
    path = write_recipe(recipe(model, "org/math"))
    result = invoke("merge", path, tmp_path / "out")
    one_line_error(result, code, fragment)
    assert not (tmp_path / "out").exists()


def test_hub_down_is_one_line_exit_1(published, fake_hub, write_recipe, tmp_path):
    fake_hub.stop()
    result = invoke("merge", write_recipe(recipe("org/base", "org/math")), tmp_path / "out")
    one_line_error(result, 1, "cannot be reached")
    assert not (tmp_path / "out").exists()


# --- push --------------------------------------------------------------------------------


def test_merge_push_to_hub_uploads_the_folder_in_one_commit(
    fake_hub, published, write_recipe, tmp_path
):
    out = tmp_path / "merged"
    path = write_recipe(recipe("org/base@v1", "org/math", "org/code"))
    result = invoke("merge", path, out, "--push-to-hub", "me/merged", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["url"] == f"{fake_hub.url}/me/merged"
    assert summary["inputs"]["org/base@v1"] == published["org/base"]

    commits = fake_hub.commits("me/merged")
    assert len(commits) == 1
    local_files = {p.name for p in out.iterdir()}
    assert set(commits[0].files) == local_files
    assert all(commits[0].files[name] == (out / name).read_bytes() for name in local_files)
    card = commits[0].files["README.md"].decode()
    commits_in_card = {i["model"]: i["commit"] for i in front_matter(card)["merge_inputs"]}
    assert commits_in_card == published
    assert not fake_hub.repos["me/merged"].private


def test_push_redacts_local_paths_and_honours_private_revision_message(
    fake_hub, published, model_zoo, write_recipe, tmp_path
):
    local_expert = model_zoo("llama", expert=1)
    out = tmp_path / "merged"
    run_merge(
        write_recipe(recipe("org/base", str(local_expert), "org/code")),
        out,
        MergeOptions(device="cpu"),
    )
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = invoke(
        "push", out, "me/secret", "--private", "--revision", "exp", "--commit-message", "try 1"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"pushed {out} to {fake_hub.url}/me/secret/tree/exp"
    assert fake_hub.repos["me/secret"].private
    assert fake_hub.commits("me/secret", "main") == []
    (commit,) = fake_hub.commits("me/secret", "exp")
    assert commit.message == "try 1"
    for name in ("README.md", "della_recipe.yaml"):
        text = commit.files[name].decode()
        assert str(local_expert.parent) not in text, name
        assert local_expert.name in text
    front = front_matter(commit.files["README.md"].decode())
    assert front["base_model"] == ["org/base", "org/code"]
    assert {"model": local_expert.name, "role": "model", "source": "local folder"} in front[
        "merge_inputs"
    ]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the folder is untouched"


@pytest.fixture
def merged(published, write_recipe, tmp_path) -> Path:
    out = tmp_path / "merged"
    run_merge(write_recipe(recipe("org/base", "org/math")), out, MergeOptions(device="cpu"))
    return out


def test_push_failures_are_one_line_and_keep_the_folder(fake_hub, merged, monkeypatch):
    snapshot = {p.name: p.read_bytes() for p in merged.iterdir()}
    fake_hub.forbidden_orgs.add("them")
    one_line_error(invoke("push", merged, "them/model"), 1, "no write access there (403)")

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    one_line_error(invoke("push", merged, "me/model"), 1, "the Hub refused the token (401)")

    monkeypatch.delenv("HF_TOKEN")
    one_line_error(invoke("push", merged, "me/model"), 1, "no Hugging Face token found")

    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    fake_hub.stop()
    one_line_error(invoke("push", merged, "me/model"), 1, "cannot be reached")
    one_line_error(invoke("push", merged, "not-a-repo-id"), 2, "not a Hub repository id")
    one_line_error(invoke("push", merged.parent, "me/model"), 2, "not a complete model folder")
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == snapshot
    assert "me/model" not in fake_hub.repos


def test_merge_then_failed_push_keeps_the_merge_and_says_how_to_retry(
    fake_hub, published, write_recipe, tmp_path
):
    fake_hub.forbidden_orgs.add("them")
    out = tmp_path / "merged"
    result = invoke(
        "merge", write_recipe(recipe("org/base", "org/math")), out, "--push-to-hub", "them/m"
    )
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "error: pushing to them/m: the token has no write access there (403); use a token "
        f"with write access; {out} is intact; push it later with `della push {out} them/m`"
    )
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert invoke("verify", out).exit_code == 0


def test_merge_push_to_hub_without_a_token_fails_before_merging(
    fake_hub, published, write_recipe, tmp_path, monkeypatch
):
    monkeypatch.delenv("HF_TOKEN")
    out = tmp_path / "merged"
    path = write_recipe(recipe("org/base", "org/math"))
    one_line_error(invoke("merge", path, out, "--push-to-hub", "me/m"), 1, "no Hugging Face token")
    # The plan (headers only) came first; no weight was downloaded, nothing written.
    assert not out.exists() and shard_bytes_served(fake_hub) == 0


def test_the_token_never_appears_in_output_files_or_uploads(
    fake_hub, published, write_recipe, tmp_path
):
    out = tmp_path / "merged"
    path = write_recipe(recipe("org/base", "org/math"))
    results = [
        invoke("merge", path, out, "--push-to-hub", "me/m"),
        invoke("merge", path, tmp_path / "json", "--json", "--push-to-hub", "me/j"),
        invoke("merge", path, tmp_path / "x", "--dry-run"),
        invoke("push", out, "me/again", "--json"),
    ]
    for result in results:
        assert result.exit_code == 0, result.output
        assert VALID_TOKEN not in result.output
    for folder in (out, tmp_path / "json"):
        for file in folder.iterdir():
            assert VALID_TOKEN.encode() not in file.read_bytes(), file
    for repo in fake_hub.repos.values():
        for history in repo.branches.values():
            for commit in history:
                assert all(VALID_TOKEN.encode() not in data for data in commit.files.values())
    assert all(r.authorized for r in fake_hub.requests if r.method == "POST")


def test_cache_is_shared_and_honours_hf_home(published, write_recipe, tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    run_merge(write_recipe(recipe("org/base", "org/math")), tmp_path / "o", MergeOptions())
    snapshot = home / "hub" / "models--org--base" / "snapshots" / published["org/base"]
    assert (snapshot / "model.safetensors").is_file()


# --- plan before download ------------------------------------------------------------------


def edited_copy(source: Path, folder: Path, edit) -> Path:
    """``source`` with its tensors edited by ``edit`` (a function of the tensor dict)."""
    folder.mkdir()
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for path in source.iterdir():
        if path.name != "model.safetensors":
            shutil.copy2(path, folder / path.name)
    return folder


def shard_bytes_served(hub: FakeHub) -> int:
    """Bytes of safetensors served beyond what a header read needs (8 + the header)."""
    return sum(
        r.served_bytes
        for r in hub.requests
        if r.path.endswith(".safetensors") and not (r.range or "").startswith("bytes=")
    )


def test_plan_of_an_incompatible_recipe_lists_every_problem_and_downloads_no_shard(
    fake_hub, published, model_zoo, write_recipe, tmp_path
):
    base = model_zoo("llama")

    def narrow_norm(tensors):
        tensors["model.norm.weight"] = torch.ones(24)
        tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][
            :, :8
        ].contiguous()

    fake_hub.add_model("org/narrow", edited_copy(base, tmp_path / "narrow", narrow_norm))
    fake_hub.add_model("org/gpt", model_zoo("gpt2"))
    path = write_recipe(recipe("org/base", "org/narrow", "org/gpt", "org/math"))
    result = invoke("plan", path, "--json")
    assert result.exit_code == 2, result.output
    report = json.loads(result.stdout)
    assert report["can_run"] is False
    problems = "\n".join(report["problems"])
    # One line for the model, naming its first mismatch and how many more there are.
    narrow = [line for line in report["problems"] if line.startswith("'org/narrow'")]
    assert narrow == [
        "'org/narrow' has 'model.layers.0.mlp.up_proj.weight' of shape (64, 8) but the base has "
        "(64, 32), and 1 more tensor(s) differ ('model.norm.weight' (24,) vs (32,)); all models "
        "must share the base's architecture"
    ]
    assert "'org/gpt' shares no tensor name with the base" in problems
    assert set(report["inputs"]) == {"org/base", "org/narrow", "org/gpt", "org/math"}
    assert report["warnings"] == [
        "'org/gpt' is a gpt2 model (GPT2LMHeadModel) but 'org/base' is a llama model "
        "(LlamaForCausalLM); check that they share an architecture"
    ]

    human = invoke("plan", path)
    assert human.exit_code == 2 and human.stdout == ""
    assert human.stderr.startswith("error: the merge cannot run (2 problems):")
    assert shard_bytes_served(fake_hub) == 0
    shard_reads = [r for r in fake_hub.requests if r.path.endswith(".safetensors")]
    assert shard_reads and all(r.method == "GET" and r.range for r in shard_reads)


def test_plan_reports_groups_vocab_rows_download_and_disk_then_merge_downloads(
    fake_hub, published, model_zoo, write_recipe, tmp_path
):
    def add_rows(tensors):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = torch.cat([tensors[name], tensors[name][:3]])

    wide = edited_copy(model_zoo("llama", expert=1), tmp_path / "wide", add_rows)
    fake_hub.add_model("org/wide", wide)
    path = write_recipe(recipe("org/base", "org/wide", "org/code"))
    out = tmp_path / "merged"
    result = invoke("merge", path, out, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["can_run"] and report["problems"] == []
    expected = (
        sum(
            (model_zoo(*spec) / "model.safetensors").stat().st_size
            for spec in (("llama",), ("llama", 2))
        )
        + (wide / "model.safetensors").stat().st_size
    )
    assert report["download_bytes"] == expected
    groups = {(g["tensors"], g["action"]): g["count"] for g in report["groups"]}
    assert groups[("model.layers.*.mlp.up_proj.weight", "merged")] == 2
    rows = model_zoo_rows = load_file(model_zoo("llama") / "model.safetensors")[
        "model.embed_tokens.weight"
    ].shape[0]
    crop = f"cropped: 'org/wide' {rows + 3} rows to {model_zoo_rows}"
    assert groups[("model.embed_tokens.weight", crop)] == 1
    assert report["output_bytes"] > 0 and report["working_memory_bytes"] > 0
    (disk,) = report["disk"]
    assert set(disk["holds"]) == {"output", "Hub cache"}
    assert disk["needed_bytes"] == report["output_bytes"] + expected
    assert shard_bytes_served(fake_hub) == 0
    assert not out.exists()

    human = invoke("plan", path)
    assert human.exit_code == 0, human.output
    assert f"org/wide: commit {fake_hub.commits('org/wide')[-1].sha}" in human.stdout
    assert "  merged" in human.stdout and "cropped: 'org/wide'" in human.stdout
    assert "to download" in human.stdout

    assert invoke("merge", path, out, "--quiet").exit_code == 0
    assert shard_bytes_served(fake_hub) == expected
    again = json.loads(invoke("plan", path, "--json").stdout)
    assert again["download_bytes"] == 0, "everything is cached now"


def test_a_merge_that_cannot_fit_on_disk_is_refused_before_download(
    fake_hub, published, write_recipe, tmp_path, monkeypatch
):
    import della_cli.preflight as preflight

    monkeypatch.setattr(preflight, "free_bytes", lambda path: 1000)
    out = tmp_path / "merged"
    result = invoke("merge", write_recipe(recipe("org/base", "org/math")), out)
    assert result.exit_code == 2
    assert "free some space" in result.stderr and "1.0 kB is free" in result.stderr
    assert shard_bytes_served(fake_hub) == 0
    assert not out.exists()


# --- the README's batch script -------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def readme_batch_script() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("```bash\n#!/usr/bin/env bash") + len("```bash\n")
    return text[start : text.index("```", start)]


def test_readme_batch_script_merges_pushes_and_reports_failures(
    fake_hub, published, tmp_path, monkeypatch
):
    """The README's script, run as written by bash with ``della`` on the PATH, against the
    fake Hub: one good recipe merged and pushed, one naming a missing model reported."""
    import os
    import subprocess
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "della").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m della_cli "$@"\n')
    (bin_dir / "della").chmod(0o755)
    batch = tmp_path / "recipes" / "batch"
    batch.mkdir(parents=True)
    (batch / "good.yaml").write_text(json.dumps(recipe("org/base", "org/math")))
    (batch / "broken.yaml").write_text(json.dumps(recipe("org/base", "org/missing")))
    (tmp_path / "batch.sh").write_text(readme_batch_script())
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        ["bash", "batch.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout.splitlines() == [
        "bad     broken (recipe, models or options; see the error above)",
        "ok      good",
    ]
    assert "error: model 'org/missing': no such repository" in done.stderr
    assert VALID_TOKEN not in done.stdout + done.stderr
    (commit,) = fake_hub.commits("me/good")
    assert set(commit.files) == {p.name for p in (tmp_path / "merged" / "good").iterdir()}
    assert "me/broken" not in fake_hub.repos


def test_plan_of_a_repo_without_safetensors_names_it(fake_hub, published, tmp_path, write_recipe):
    pickle_only = tmp_path / "pickle-only"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text('{"model_type": "llama"}')
    (pickle_only / "pytorch_model.bin").write_bytes(b"not read")
    fake_hub.add_model("org/pickled", pickle_only)
    result = invoke("plan", write_recipe(recipe("org/base", "org/pickled")))
    one_line_error(result, 2, "model 'org/pickled': the repository lacks a weight file")
    assert fake_hub.served("pytorch_model.bin") == 0


def test_a_hub_merge_reads_its_recipe_and_plans_once(
    fake_hub, published, write_recipe, tmp_path, monkeypatch
):
    """The session is built once: the plan made from remote headers is the one merged, after
    the weights are downloaded at the commits it pinned."""
    import della_cli.recipe
    import della_cli.session

    calls = {"recipe": 0, "plan": 0}
    load_recipe, build_plan = della_cli.recipe.load_recipe, della_cli.session.build_plan

    def counted_recipe(*args, **kwargs):
        calls["recipe"] += 1
        return load_recipe(*args, **kwargs)

    def counted_plan(*args, **kwargs):
        calls["plan"] += 1
        return build_plan(*args, **kwargs)

    monkeypatch.setattr(della_cli.session, "load_recipe", counted_recipe)
    monkeypatch.setattr(della_cli.session, "build_plan", counted_plan)
    path = write_recipe(recipe("org/base", "org/math", "org/code"))
    result = invoke("merge", path, tmp_path / "merged", "--quiet")
    assert result.exit_code == 0, result.output
    assert calls == {"recipe": 1, "plan": 1}
    assert shard_bytes_served(fake_hub) > 0  # the weights were downloaded, after the plan
