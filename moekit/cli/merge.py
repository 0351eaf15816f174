"""``moekit merge``: thin wrapper over :mod:`moekit.merge`."""

from __future__ import annotations

from moekit.cli.common import add_command

DESCRIPTION = """
Average models tensor by tensor (LM-Cocktail): M = Σ wᵢ·Mᵢ, or with a target model
M = α·M_target + (1−α)·Σ wᵢ·Mᵢ. Weights are given (--weights, summing to 1) or
computed from a few examples of the target task (--examples): wᵢ = softmax(−Lᵢ/τ),
Lᵢ each model's mean loss on the examples' output tokens.

Works on dense LLaMA and on MoE checkpoints (experts merged expert by expert) of one
architecture and size; --model BASE+ADAPTER merges a PEFT LoRA adapter into BASE first.
Every tensor is read from every model, combined in float32 and written, one block of
rows at a time: memory stays well under 1 GB whatever the model size. Nothing is
written until every input is validated, and OUT appears only when complete.
"""

EXAMPLES = """
moekit merge merged --model ./chat --model ./base --weights 0.7 0.3
moekit merge merged --model ./math --model ./code --model ./chat --examples task.jsonl   # τ = 5
moekit merge merged --base ./finetuned --alpha 0.5 --model ./base --model ./chat --weights 0.5 0.5
moekit merge merged --model ./moe+./moe-lora --model ./moe --weights 0.5 0.5 --push-to-hub me/moe-merged
moekit merge --config recipes/merge-cocktail.yaml
"""


def register(sub) -> None:
    from moekit.merge.config import DTYPES
    from moekit.merge.methods import METHODS

    p = add_command(sub, "merge", "average models (LM-Cocktail), streamed", DESCRIPTION, EXAMPLES, run)
    p.add_argument("output", nargs="?", metavar="OUT", help="output folder (must not exist unless --force)")
    p.add_argument("--config", metavar="YAML", help="recipe file; its `merge:` section sets defaults, flags win")
    g = p.add_argument_group("models and weights")
    g.add_argument("--model", dest="models", action="append", metavar="MODEL",
                   help="a model folder, Hub id or BASE+ADAPTER (repeat: one per model)")
    g.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per --model, summing to 1")
    g.add_argument("--examples", metavar="JSONL", help='rows {"input","output"} or {"messages"}: weights = softmax(-loss/T)')
    g.add_argument("--temperature", type=float, metavar="T", help="softmax temperature for --examples (default 5)")
    g.add_argument("--base", metavar="MODEL", help="target model of M = α·target + (1−α)·Σ wᵢ·Mᵢ")
    g.add_argument("--alpha", type=float, help="the target's share α (default 0.5 with --base)")
    g.add_argument("--normalize", action="store_true", default=None, help="divide --weights by their sum")
    g.add_argument("--allow-negative", action="store_true", default=None, help="accept negative weights / α outside [0, 1]")
    g.add_argument("--method", choices=METHODS.names(), help="how tensors are combined (default linear)")
    g = p.add_argument_group("losses (with --examples)")
    g.add_argument("--max-length", type=int, metavar="N", help="tokens per example (default 2048)")
    g.add_argument("--batch-size", type=int, metavar="N", help="examples per forward pass (default 2)")
    g.add_argument("--device", help="auto (CUDA if available), cpu, cuda, cuda:1 ... (default auto)")
    g = p.add_argument_group("output")
    g.add_argument("--dtype", choices=DTYPES, help="output dtype (default auto = the first model's)")
    g.add_argument("--tokenizer-from", metavar="MODEL", help="copy this model's tokenizer (default: the first input's)")
    g.add_argument("--max-shard-size", metavar="SIZE", help="safetensors shard size (default 5GB)")
    g.add_argument("--force", action="store_true", default=None, help="replace OUT if it exists")
    g.add_argument("--dry-run", action="store_true", default=None, help="validate and print the weights, write nothing")
    g.add_argument("--push-to-hub", metavar="REPO_ID", help="upload OUT to this Hub repo when done (see moekit push)")
    g.add_argument("--private", action="store_true", default=None, help="create the --push-to-hub repo private")


def run(args) -> int:
    from moekit.config import build_config
    from moekit.merge import MergeConfig
    from moekit.merge.streaming import describe_plan, plan_merge, write_merge

    cli = {k: getattr(args, k) for k in (
        "output", "models", "weights", "examples", "temperature", "base", "alpha", "normalize", "allow_negative",
        "method", "max_length", "batch_size", "device", "dtype", "tokenizer_from", "max_shard_size", "force",
        "dry_run", "push_to_hub", "private")}
    config = build_config(MergeConfig, args.config, "merge", **cli)
    api = None
    if config.push_to_hub and not config.dry_run:  # offline / no token: fail before merging anything
        from moekit.hub.push import hub_client

        api = hub_client()
    plan = plan_merge(config)
    print(describe_plan(plan), flush=True)
    if config.dry_run:
        return 0
    out = write_merge(plan)
    print(f"wrote {out}")
    if config.push_to_hub:
        from moekit.hub.push import push_folder

        print(f"pushed: {push_folder(out, config.push_to_hub, private=config.private, api=api)}")
    else:
        print(f"next: moekit eval {out} --data FILE   or   moekit push {out} USER/NAME")
    return 0
