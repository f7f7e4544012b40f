"""Model references: which are local folders and which are Hub ids; Hub settings read at call
time from the environment (huggingface_hub reads some only at import)."""

from __future__ import annotations

from pathlib import Path

import pytest

from della_cli.api import locate_model
from della_cli.hub import HubRef, cache_dir, endpoint, offline, parse_hub_ref, token


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("org/name", HubRef("org/name")),
        ("meta-llama/Llama-2-13b-hf", HubRef("meta-llama/Llama-2-13b-hf")),
        ("org/name@main", HubRef("org/name", "main")),
        ("org/name@v1.0", HubRef("org/name", "v1.0")),
        ("org/name@" + "a" * 40, HubRef("org/name", "a" * 40)),
        ("./org/name", None),
        ("/models/org/name", None),
        ("~/org/name", None),
        ("name", None),
        ("a/b/c", None),
        ("org/name@", None),
        ("org/na me", None),
    ],
)
def test_parse_hub_ref(ref: str, expected: HubRef | None):
    assert parse_hub_ref(ref) == expected


def test_local_folders_win_over_hub_ids(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "here").mkdir(parents=True)
    recipes = tmp_path / "recipes"
    (recipes / "beside" / "model").mkdir(parents=True)
    assert locate_model("org/here", recipes) == Path("org/here")
    assert locate_model("beside/model", recipes) == recipes / "beside" / "model"
    assert locate_model("org/elsewhere", recipes) == HubRef("org/elsewhere")
    assert locate_model("org/elsewhere@dev", None) == HubRef("org/elsewhere", "dev")
    assert locate_model("./org/elsewhere", recipes) == Path("org/elsewhere")
    assert locate_model(str(tmp_path / "nope"), recipes) == tmp_path / "nope"


def test_settings_follow_the_environment_at_call_time(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    assert endpoint() == "http://127.0.0.1:9"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not offline()
    assert token() is None
    (tmp_path / "home" / "token").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "home" / "token").write_text("hf_from_login_cache\n")
    assert token() == "hf_from_login_cache"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert token() == "hf_from_env"
