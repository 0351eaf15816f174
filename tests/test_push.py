"""moekit push / --push-to-hub: validation, exact client calls, offline and token handling (issue 6)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

from conftest import make_llama, make_tokenizer
from moekit.cli.main import main
from moekit.hub.card import render_card
from moekit.hub.push import PushConfig, check_card, push, push_folder

SECRET = "hf_SECRETtokenNeverShown123"


class Commit:
    def __init__(self, repo_id, pr):
        self.commit_url = f"https://huggingface.co/{repo_id}/commit/abc123"
        self.pr_url = f"https://huggingface.co/{repo_id}/discussions/1" if pr else None


class RecordingApi:
    """Records calls after checking they bind to ``HfApi``'s real signatures; uploads nothing."""

    def __init__(self, fail_on: str | None = None, error: Exception | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: list[str] = []
        self.fail_on, self.error = fail_on, error

    def _record(self, name, *args, **kwargs):
        inspect.signature(getattr(HfApi, name)).bind(self, *args, **kwargs)  # TypeError if HfApi would refuse
        self.calls.append((name, kwargs))
        if name == self.fail_on:
            raise self.error

    def create_repo(self, *args, **kwargs):
        self._record("create_repo", *args, **kwargs)
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def create_branch(self, *args, **kwargs):
        self._record("create_branch", *args, **kwargs)

    def upload_folder(self, *args, **kwargs):
        self._record("upload_folder", *args, **kwargs)
        root = Path(kwargs["folder_path"])
        every = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        self.uploaded = list(filter_repo_objects(every, allow_patterns=kwargs.get("allow_patterns"),
                                                 ignore_patterns=kwargs.get("ignore_patterns")))
        return Commit(kwargs["repo_id"], kwargs.get("create_pr"))


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    """An upcycled tiny MoE (its card comes from moekit) plus a hidden file that must not be uploaded."""
    from moekit.upcycle import UpcycleConfig, upcycle

    root = tmp_path_factory.mktemp("push")
    make_llama(root / "dense")
    make_tokenizer(root / "dense")
    upcycle(UpcycleConfig(str(root / "dense"), str(root / "moe"), num_experts=4, top_k=2), progress=False)
    (root / "moe" / ".cache").mkdir()
    (root / "moe" / ".cache" / "junk.lock").write_text("x")
    return root / "moe"


def visible_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not p.relative_to(folder).as_posix().startswith("."))


def test_push_calls_the_client_exactly(moe_folder):
    api = RecordingApi()
    url = push(PushConfig(str(moe_folder), "me/tiny-moe", private=True, revision="v2", commit_message="first",
                          create_pr=True), api=api)
    assert url == "https://huggingface.co/me/tiny-moe/discussions/1"
    patterns = api.calls[2][1].pop("allow_patterns")
    assert api.calls == [
        ("create_repo", {"repo_id": "me/tiny-moe", "private": True, "repo_type": "model", "exist_ok": True}),
        ("create_branch", {"repo_id": "me/tiny-moe", "branch": "v2", "repo_type": "model", "exist_ok": True}),
        ("upload_folder", {"repo_id": "me/tiny-moe", "folder_path": str(moe_folder), "repo_type": "model",
                           "revision": "v2", "commit_message": "first", "create_pr": True}),
    ]
    assert len(patterns) == len(visible_files(moe_folder))
    assert api.uploaded == visible_files(moe_folder)
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "moekit_recipe.yaml"} <= set(api.uploaded)
    assert not any(f.startswith(".") for f in api.uploaded)


def test_default_push_commits_to_main(moe_folder):
    api = RecordingApi()
    assert push_folder(moe_folder, "me/tiny-moe", api=api) == "https://huggingface.co/me/tiny-moe/commit/abc123"
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1]["private"] is False
    upload = api.calls[1][1]
    assert upload["revision"] is None and upload["create_pr"] is False
    assert upload["commit_message"] == "Upload moe with moekit"


def test_merge_push_to_hub_uploads_the_merged_folder(tmp_path):
    from moekit.merge import MergeConfig, merge

    for seed in (1, 2):
        make_llama(tmp_path / f"m{seed}", seed=seed)
        make_tokenizer(tmp_path / f"m{seed}")
    api = RecordingApi()
    out = merge(MergeConfig(str(tmp_path / "merged"), models=[str(tmp_path / "m1"), str(tmp_path / "m2")],
                            weights=[0.5, 0.5], push_to_hub="me/merged", private=True), progress=False, api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1]["private"] is True and api.calls[1][1]["folder_path"] == str(out)
    assert api.uploaded == visible_files(out)
    assert {"README.md", "config.json", "model.safetensors", "moekit_merge.json", "moekit_recipe.yaml",
            "tokenizer.json"} <= set(api.uploaded)
    assert "me/merged" in (out / "README.md").read_text()  # the usage snippet names the Hub repo


def test_adapter_folder_needs_a_peft_card(tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(4, 8)}, folder / "adapter_model.safetensors")
    (folder / "README.md").write_text(render_card(title="a", body="b", base_model="org/base", relation="adapter",
                                                  tags=["lora"], library_name="peft"))
    api = RecordingApi()
    push_folder(folder, "me/adapter", api=api)
    assert api.uploaded == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    (folder / "README.md").write_text(render_card(title="a", body="b", base_model="org/base", relation="adapter",
                                                  tags=["lora"]))
    with pytest.raises(ValueError, match="library_name is 'transformers', expected 'peft'"):
        push_folder(folder, "me/adapter", api=RecordingApi())


# --- refusals -------------------------------------------------------------------------------


def _card(**changes) -> str:
    fields = dict(title="t", body="b", base_model=["org/a", "org/b"], relation="merge", tags=["merge"])
    fields.update(changes)
    return render_card(**fields)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cache"))
    return dst


BAD_FOLDERS = [
    ("pickle", lambda f: (f / "training_args.bin").write_bytes(b"\x80\x04"), "pickle file training_args.bin"),
    ("no-card", lambda f: (f / "README.md").unlink(), "has no README.md"),
    ("no-front-matter", lambda f: (f / "README.md").write_text("# hi\n"), "has no YAML front matter"),
    ("local-base", lambda f: (f / "README.md").write_text(_card(base_model="/tmp/my-model")), "'/tmp/my-model' is not a Hub repo id"),
    ("relation", lambda f: (f / "README.md").write_text(_card(relation="upcycle")), "'upcycle' is unknown to the Hub"),
    ("relation-no-base", lambda f: (f / "README.md").write_text(_card(base_model=None)), "needs a base_model"),
    ("tags", lambda f: (f / "README.md").write_text(_card(tags=[])), "must include moe and moekit and one of"),
    ("no-config", lambda f: (f / "config.json").unlink(), "has no config.json"),
    ("truncated", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]),
     "is truncated"),
]


@pytest.mark.parametrize("case,spoil,message", BAD_FOLDERS, ids=[b[0] for b in BAD_FOLDERS])
def test_bad_folder_is_refused_before_any_call(moe_folder, tmp_path, capsys, monkeypatch, case, spoil, message):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("HfApi must not be created"))
    folder = _copy(moe_folder, tmp_path / "moe")
    spoil(folder)
    assert main(["push", str(folder), "me/x"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moekit push: error: "), err
    assert message in err, err


def test_allow_pickle_uploads_pickle_files(moe_folder, tmp_path):
    folder = _copy(moe_folder, tmp_path / "moe")
    (folder / "training_args.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="--allow-pickle"):
        push_folder(folder, "me/x", api=RecordingApi())
    api = RecordingApi()
    push_folder(folder, "me/x", allow_pickle=True, api=api)
    assert "training_args.bin" in api.uploaded


def test_bad_repo_id_is_a_config_error(moe_folder, capsys):
    assert main(["push", str(moe_folder), "not a repo"]) == 1
    assert "is not a Hub repo id" in capsys.readouterr().err


# --- offline, token, Hub errors ---------------------------------------------------------------


def test_offline_is_one_line_and_nothing_happens(moe_folder, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("HfApi must not be created"))
    assert main(["push", str(moe_folder), "me/x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "moekit push: error: HF_HUB_OFFLINE is set, so nothing can be pushed — unset HF_HUB_OFFLINE and re-run"


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_no_token_is_one_line_and_nothing_happens(moe_folder, capsys, monkeypatch, online):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("HfApi must not be created"))
    assert main(["push", str(moe_folder), "me/x"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no Hugging Face token found" in err and "hf auth login" in err


def test_token_is_never_printed_passed_or_written(moe_folder, capsys, monkeypatch, online):
    import huggingface_hub

    api = RecordingApi()
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: SECRET)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: api)
    assert main(["push", str(moe_folder), "me/x"]) == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err and "https://huggingface.co/me/x/commit/abc123" in out.out
    assert SECRET not in repr(api.calls)  # the client finds the token itself
    assert not any(SECRET.encode() in p.read_bytes() for p in moe_folder.rglob("*") if p.is_file())


def test_hub_refusal_is_one_line(moe_folder, capsys, monkeypatch, online):
    import importlib

    import huggingface_hub
    from huggingface_hub import errors
    from huggingface_hub.errors import HfHubHTTPError

    http = importlib.import_module(errors.Response.__module__.split(".")[0])  # httpx, or the copy the Hub ships
    response = http.Response(403, request=http.Request("POST", "https://huggingface.co/api/repos/create"))
    error = HfHubHTTPError("403 Forbidden", response=response)
    api = RecordingApi(fail_on="create_repo", error=error)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: SECRET)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: api)
    assert main(["push", str(moe_folder), "me/x"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused to write to me/x (HTTP 403)" in err
    assert [c[0] for c in api.calls] == ["create_repo"]


def test_moekit_cards_pass_the_front_matter_check(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(render_card(title="t", body="b", base_model="org/base", relation=None,
                                  tags=["upcycling"], license="apache-2.0"))
    front = check_card(readme)
    assert front["pipeline_tag"] == "text-generation" and front["license"] == "apache-2.0"
    assert {"moe", "moekit", "upcycling"} <= set(front["tags"])

