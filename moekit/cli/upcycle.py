"""``moekit upcycle``: thin wrapper over :func:`moekit.upcycle.upcycle`."""

from __future__ import annotations

from moekit.cli.common import add_command

DESCRIPTION = """
Split every dense FFN of a LLaMA-family model into experts (or copy it) and write
a Mixtral or Qwen2-MoE checkpoint that stock transformers loads with no remote code.

Each expert is a set of the FFN's intermediate neurons (LLaMA-MoE): rows of
gate_proj/up_proj and columns of down_proj. With --scale auto, all experts active
(--top-k = --num-experts) and --router zero, the output reproduces the dense model.
Weights are streamed one tensor at a time into a temporary folder that is renamed
to OUT only when everything succeeded.
"""

EXAMPLES = """
moekit upcycle meta-llama/Llama-2-7b-hf llama-moe-8x --num-experts 8 --top-k 2
moekit upcycle ./dense ./moe --num-experts 4 --top-k 4          # exact: equals the dense model
moekit upcycle ./dense ./moe --method copy --num-experts 8       # sparse upcycling
moekit upcycle ./dense ./moe --format qwen2_moe --dry-run        # print the plan only
moekit upcycle --config recipes/llama2-7b-8x-top2.yaml           # everything from a recipe
"""


def register(sub) -> None:
    from moekit.formats import FORMATS
    from moekit.upcycle.routers import ROUTERS
    from moekit.upcycle.strategies import STRATEGIES

    p = add_command(sub, "upcycle", "dense model -> stock MoE checkpoint", DESCRIPTION, EXAMPLES, run)
    p.add_argument("source", nargs="?", metavar="SRC", help="dense model folder or Hub repo id (LlamaForCausalLM)")
    p.add_argument("output", nargs="?", metavar="OUT", help="output folder (must not exist unless --force)")
    p.add_argument("--config", metavar="YAML", help="recipe file; its `upcycle:` section sets defaults, flags win")
    g = p.add_argument_group("experts")
    g.add_argument("--num-experts", type=int, metavar="N", help="experts per layer (default 8)")
    g.add_argument("--top-k", type=int, metavar="K", help="experts per token (default 2)")
    g.add_argument("--method", choices=STRATEGIES.names(), help="how neurons become experts (default random)")
    g.add_argument("--scale", metavar="auto|FLOAT", help="factor folded into experts' down_proj (default auto: exact with all experts active)")
    g.add_argument("--router", choices=ROUTERS.names(), help="router initialisation (default zero)")
    g.add_argument("--seed", type=int, help="seed for the split and the router (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=FORMATS.names(), help="output architecture (default mixtral)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="output dtype (default auto = source)")
    g.add_argument("--max-shard-size", metavar="SIZE", help="safetensors shard size (default 5GB)")
    g.add_argument("--force", action="store_true", default=None, help="replace OUT if it exists")
    g.add_argument("--dry-run", action="store_true", default=None, help="print the tensor plan and sizes, write nothing")
    g = p.add_argument_group("source")
    g.add_argument("--revision", help="Hub revision of SRC")
    g = p.add_argument_group("publishing")
    g.add_argument("--push-to-hub", metavar="REPO_ID", help="upload OUT to this Hub repo when done (see moekit push)")
    g.add_argument("--private", action="store_true", default=None, help="create the --push-to-hub repo private")
    g.add_argument("--allow-pickle", action="store_true", default=None,
                   help="read .bin pickle weights (can run code: only for checkpoints you trust)")


def run(args) -> int:
    from moekit.config import build_config
    from moekit.upcycle import UpcycleConfig, upcycle

    cli = {k: getattr(args, k) for k in (
        "source", "output", "num_experts", "top_k", "method", "scale", "router", "seed", "format", "dtype",
        "max_shard_size", "force", "dry_run", "revision", "allow_pickle", "push_to_hub", "private")}
    config = build_config(UpcycleConfig, args.config, "upcycle", **cli)
    api = None
    if config.push_to_hub and not config.dry_run:  # offline / no token: fail before converting anything
        from moekit.hub.push import hub_client

        api = hub_client()
    result = upcycle(config)
    if config.dry_run:
        print(result)
        return 0
    print(f"wrote {result}")
    if api is not None:
        from moekit.hub.push import push_folder

        print(f"pushed: {push_folder(result, config.push_to_hub, private=config.private, api=api)}")
    print(f"next: moekit eval {result} --compare {config.source}   (perplexity and expert load)")
    return 0
