"""Publishing a moekit output folder to the Hugging Face Hub, validated first.

``push_folder`` is what ``moekit push`` and every ``--push-to-hub REPO_ID`` call:
it checks the folder (config loads, weights complete, no pickle unless allowed,
a README whose front matter the Hub accepts), then ``create_repo`` (exist_ok) and
``upload_folder`` with exactly the validated files. The token comes from
``HF_TOKEN`` or the saved login inside ``huggingface_hub``; moekit never reads it
beyond checking that one exists, and never prints or writes it. Re-running after
a failure is safe: the repo already exists and files already uploaded are skipped.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import ConfigError, HubError, InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
RELATIONS = ("adapter", "merge", "quantized", "finetune")
KIND_TAGS = ("upcycling", "merge", "lora", "fine-tuned", "continued-pretraining")
REQUIRED_TAGS = ("moe", "moekit")


@dataclass
class PushConfig:
    """Everything ``moekit push`` needs.

    Args:
        folder: the output folder of a moekit command (model or PEFT adapter).
        repo_id: ``user/name`` or ``org/name`` on the Hub.
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to (created from main when missing).
        commit_message: defaults to "Upload <folder name> with moekit".
        create_pr: open a pull request instead of committing to the branch.
        allow_pickle: upload .bin/.pt files too (they can run code when loaded).

    Example:
        >>> from moekit.hub.push import PushConfig, push
        >>> push(PushConfig("merged", "me/merged-7b", private=True))  # doctest: +SKIP
        'https://huggingface.co/me/merged-7b/commit/...'
    """

    folder: str
    repo_id: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    create_pr: bool = False
    allow_pickle: bool = False

    def __post_init__(self):
        self.folder = os.fspath(self.folder)
        check_repo_id(self.repo_id, "repo_id")
        if self.commit_message is not None and not str(self.commit_message).strip():
            raise ConfigError("commit_message is empty — give a message or leave --commit-message out")


def check_repo_id(repo_id, field: str = "repo_id") -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        ok = isinstance(repo_id, str) and repo_id.count("/") == 1
    except HFValidationError:
        ok = False
    if not ok:
        raise ConfigError(f"{field}={repo_id!r} is not a Hub repo id — use user/name, e.g. me/llama-moe-8x")


# --- validation -----------------------------------------------------------------------------


def folder_files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a relative POSIX path, hidden files and folders left out."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append(rel.as_posix())
    return files


def check_folder(folder: str | os.PathLike, allow_pickle: bool = False) -> list[str]:
    """Validate a folder before upload; returns the files to upload.

    Checks: the config loads (``config.json``, or ``adapter_config.json`` for an
    adapter), the weights are complete safetensors, no pickle files unless
    ``allow_pickle``, and a README.md whose front matter passes :func:`check_card`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder — pass the output folder of a moekit command")
    files = folder_files(folder)
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise InputError(f"{folder} holds pickle file {pickles[0]}, which can run code when loaded — "
                         "delete it, or pass --allow-pickle if you trust it")
    adapter = (folder / "adapter_config.json").is_file()
    _check_config(folder, adapter)
    _check_weights(folder, adapter, files, allow_pickle)
    if not (folder / "README.md").is_file():
        raise InputError(f"{folder} has no README.md model card — moekit commands write one; add one before pushing")
    check_card(folder / "README.md", library="peft" if adapter else "transformers")
    return files


def _check_config(folder: Path, adapter: bool) -> None:
    if adapter:
        try:
            cfg = json.loads((folder / "adapter_config.json").read_text())
            assert isinstance(cfg, dict) and cfg.get("peft_type")
        except (json.JSONDecodeError, AssertionError):
            raise InputError(f"{folder}/adapter_config.json is not a PEFT adapter config — re-save the adapter") from None
        return
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} has no config.json — pass a saved transformers model folder")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise InputError(f"{folder}/config.json does not load in transformers ({str(e).splitlines()[0][:120]}) — fix it before pushing") from None


def _check_weights(folder: Path, adapter: bool, files: list[str], allow_pickle: bool) -> None:
    if adapter:
        if "adapter_model.safetensors" in files or (allow_pickle and "adapter_model.bin" in files):
            return
        raise InputError(f"{folder} has no adapter_model.safetensors — save the adapter with save_pretrained()")
    if allow_pickle and not any(f.endswith(".safetensors") for f in files) and any(f.endswith(".bin") for f in files):
        return
    from moekit.io import TensorIndex

    TensorIndex.from_folder(folder)  # raises on missing, truncated or pickle-only weights


def check_card(readme: str | os.PathLike, library: str = "transformers") -> dict:
    """The README's front matter as a dict, after checking the Hub will accept it.

    Requires ``library_name`` (``transformers``, or ``peft`` for adapters),
    ``pipeline_tag: text-generation``, tags ``moe`` and ``moekit`` plus one of
    ``upcycling``/``merge``/``lora``/``fine-tuned``/``continued-pretraining``; ``base_model`` entries must be Hub repo ids and
    ``base_model_relation`` one the Hub knows, with a ``base_model``.
    """
    import yaml
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    readme = Path(readme)
    match = REGEX_YAML_BLOCK.search(readme.read_text(encoding="utf-8"))
    if not match:
        raise InputError(f"{readme} has no YAML front matter — regenerate the card (moekit writes one)")
    try:
        data = yaml.safe_load(match.group(2)) or {}
    except yaml.YAMLError:
        raise InputError(f"{readme}: the front matter is not valid YAML — fix the block between the --- lines") from None
    if not isinstance(data, dict):
        raise InputError(f"{readme}: the front matter must be a YAML mapping — fix the block between the --- lines")
    problem = _card_problem(data, library)
    if problem:
        raise InputError(f"{readme}: {problem}")
    return data


def _card_problem(data: dict, library: str) -> str | None:
    tags = data.get("tags") or []
    if data.get("library_name") != library:
        return f"library_name is {data.get('library_name')!r}, expected {library!r} — set it in the front matter"
    if data.get("pipeline_tag") != "text-generation":
        return f"pipeline_tag is {data.get('pipeline_tag')!r} — set pipeline_tag: text-generation"
    if not isinstance(tags, list) or any(t not in tags for t in REQUIRED_TAGS) or not any(t in tags for t in KIND_TAGS):
        return f"tags {tags} must include {' and '.join(REQUIRED_TAGS)} and one of {', '.join(KIND_TAGS)} — add them"
    base = data.get("base_model")
    bases = [base] if isinstance(base, str) else base
    if base is not None and (not isinstance(bases, list) or not bases or not all(isinstance(b, str) for b in bases)):
        return f"base_model {base!r} must be a repo id or a list of repo ids — fix it"
    for b in bases or []:
        try:
            check_repo_id(b, "base_model")
        except ConfigError:
            return f"base_model {b!r} is not a Hub repo id (a local path?) — use the source's repo id or remove it"
    relation = data.get("base_model_relation")
    if relation is not None and relation not in RELATIONS:
        return f"base_model_relation {relation!r} is unknown to the Hub — use one of {', '.join(RELATIONS)} or remove it"
    if relation is not None and base is None:
        return f"base_model_relation {relation!r} needs a base_model — add the source repo ids or remove the relation"
    if data.get("license") is not None and not isinstance(data["license"], str):
        return f"license {data['license']!r} must be a license id string such as apache-2.0"
    return None


# --- upload ---------------------------------------------------------------------------------


def hub_client():
    """An ``HfApi`` after checking the Hub is usable: not offline, a token exists (never shown)."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed — unset HF_HUB_OFFLINE and re-run")
    try:
        token = huggingface_hub.get_token()
    except Exception as e:  # an OIDC exchange that fails raises; its text could carry secrets
        raise HubError(f"could not get a Hugging Face token ({e.__class__.__name__}) — run `hf auth login` or set HF_TOKEN") from None
    if not token:
        raise HubError("no Hugging Face token found — run `hf auth login` (with write access) or set HF_TOKEN, then re-run")
    del token
    return huggingface_hub.HfApi()


@contextlib.contextmanager
def _hub_errors(repo_id: str):
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed — unset HF_HUB_OFFLINE and re-run") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubError(f"the Hub refused to write to {repo_id} (HTTP {status}) — log in with a write token "
                           "(`hf auth login`) and check you may create repos in that namespace") from None
        raise HubError(f"pushing to {repo_id} failed ({e.__class__.__name__}{f', HTTP {status}' if status else ''}) — "
                       "re-run the same command: files already uploaded are skipped") from None
    except (ConnectionError, TimeoutError) as e:
        raise HubError(f"cannot reach the Hub ({e.__class__.__name__}) — check the network and re-run") from None
    except Exception as e:
        if e.__class__.__module__.startswith("httpx"):  # transport errors of huggingface_hub's HTTP client
            raise HubError(f"cannot reach the Hub ({e.__class__.__name__}) — check the network and re-run") from None
        raise


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, create_pr: bool = False, allow_pickle: bool = False,
                api=None) -> str:
    """Validate ``folder`` and upload it to ``repo_id``; returns the commit (or pull request) URL.

    ``api`` is anything with ``HfApi``'s ``create_repo``/``create_branch``/``upload_folder``
    signatures (tests pass a recording fake); by default a real ``HfApi`` once the Hub
    is known to be reachable and a token exists.

    Example:
        >>> push_folder("merged", "me/merged-7b", private=True)  # doctest: +SKIP
        'https://huggingface.co/me/merged-7b/commit/0123abc'
    """
    check_repo_id(repo_id)
    folder = Path(folder)
    files = check_folder(folder, allow_pickle)
    api = api or hub_client()
    with _hub_errors(repo_id):
        api.create_repo(repo_id=repo_id, private=private, repo_type="model", exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
            commit_message=commit_message or f"Upload {folder.resolve().name} with moekit",
            create_pr=create_pr, allow_patterns=[glob.escape(f) for f in files],
        )
    return getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"


def push(config: PushConfig, api=None) -> str:
    """:func:`push_folder` with a :class:`PushConfig` (what ``moekit push`` runs)."""
    return push_folder(config.folder, config.repo_id, private=config.private, revision=config.revision,
                       commit_message=config.commit_message, create_pr=config.create_pr,
                       allow_pickle=config.allow_pickle, api=api)
