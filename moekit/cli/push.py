"""``moekit push``: thin wrapper over :func:`moekit.hub.push.push`."""

from __future__ import annotations

from moekit.cli.common import add_command

DESCRIPTION = """
Upload a moekit output folder to the Hugging Face Hub. Before anything is sent the
folder is validated: config loads, weights are complete safetensors (pickle files
refused unless --allow-pickle), and README.md has front matter the Hub accepts
(base_model, base_model_relation, library_name, tags, pipeline_tag, license).
The token comes from HF_TOKEN or `hf auth login` and is never printed or stored.
Re-running after a failure resumes: files already uploaded are skipped.
"""

EXAMPLES = """
moekit push ./llama-moe-8x me/llama-moe-8x
moekit push ./merged me/merged --private --commit-message "LM-Cocktail 0.7/0.3"
moekit push ./merged me/merged --revision v2 --create-pr
"""


def register(sub) -> None:
    p = add_command(sub, "push", "upload an output folder to the Hub", DESCRIPTION, EXAMPLES, run)
    p.add_argument("folder", nargs="?", metavar="DIR", help="folder written by a moekit command")
    p.add_argument("repo_id", nargs="?", metavar="REPO_ID", help="Hub repo, user/name or org/name")
    p.add_argument("--config", metavar="YAML", help="recipe file; its `push:` section sets defaults, flags win")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private")
    p.add_argument("--revision", help="branch to commit to (created when missing)")
    p.add_argument("--commit-message", metavar="TEXT", help="commit message")
    p.add_argument("--create-pr", action="store_true", default=None, help="open a pull request instead of committing")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="upload .bin/.pt pickle files too (they can run code when loaded)")


def run(args) -> int:
    from moekit.config import build_config
    from moekit.hub.push import PushConfig, push

    cli = {k: getattr(args, k) for k in (
        "folder", "repo_id", "private", "revision", "commit_message", "create_pr", "allow_pickle")}
    config = build_config(PushConfig, args.config, "push", **cli)
    print(f"pushed {config.folder} to https://huggingface.co/{config.repo_id}: {push(config)}")
    return 0
