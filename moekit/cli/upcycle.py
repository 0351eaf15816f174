"""``moekit upcycle``: thin wrapper over :func:`moekit.upcycle.upcycle`."""

from __future__ import annotations

from moekit.cli.common import add_command, comma_ints

DESCRIPTION = """
Split every dense FFN of a LLaMA-family model into experts (or copy it) and write
a Mixtral or Qwen2-MoE checkpoint that stock transformers loads with no remote code.

Each expert is a set of the FFN's intermediate neurons (LLaMA-MoE): rows of
gate_proj/up_proj and columns of down_proj. With --scale auto and every routed
expert active (--top-k = --num-experts - --shared-experts), the output reproduces
the dense model. With fewer active, data-driven methods and routers lose far less
before any training: by default (method/router auto) neurons that fire together
form an expert and each router is fitted on calibration text (built-in text
unless --calib-data), in one streaming pass over the layers.
Weights are streamed one tensor at a time into a temporary folder that is renamed
to OUT only when everything succeeded.
"""

EXAMPLES = """
moekit upcycle meta-llama/Llama-2-7b-hf llama-moe-8x --num-experts 8 --top-k 2
moekit upcycle ./dense ./moe --num-experts 4 --top-k 4          # exact: equals the dense model
moekit upcycle ./dense ./moe --method copy --num-experts 8       # sparse upcycling
moekit upcycle ./dense ./moe --format qwen2_moe --dry-run        # print the plan only
moekit upcycle ./dense ./moe --format qwen2_moe --num-experts 8 --shared-experts 1 --top-k 1
                                                   # LLaMA-MoE-v2 "1+7 top-1": 25% of the FFN active
moekit upcycle ./dense ./moe --format qwen2_moe --shared-experts 2 --dense-layers 0,-1 --calib-data notes.jsonl
moekit upcycle ./dense ./moe --method random --router zero       # data-free (no tokenizer needed)
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
    g.add_argument("--top-k", type=int, metavar="K", help="routed experts per token (default 2)")
    g.add_argument("--shared-experts", type=int, metavar="S",
                   help="of the N slices, S (the most important neurons) form one always-on shared expert (qwen2_moe; default 0)")
    g.add_argument("--dense-layers", type=comma_ints, metavar="LIST",
                   help="layers whose FFN stays dense, e.g. 0,-1 (qwen2_moe; negative counts from the end)")
    g.add_argument("--method", choices=["auto", *STRATEGIES.names()],
                   help="how neurons become experts (default auto: coactivation if SRC has a tokenizer, else random)")
    g.add_argument("--router", choices=["auto", *ROUTERS.names()],
                   help="router initialisation (default auto: calibrated when calibrating, else zero)")
    g.add_argument("--scale", metavar="auto|FLOAT",
                   help="factor folded into routed experts' down_proj (default auto: exact with every expert active, "
                        "least-squares fitted otherwise)")
    g.add_argument("--norm-topk-prob", type=_bool, metavar="true|false",
                   help="renormalise top-k weights (default: true for mixtral and copy, else false)")
    g.add_argument("--seed", type=int, help="seed for the split and the router (default 0)")
    g = p.add_argument_group("calibration (data-driven methods, routers and shared experts)")
    g.add_argument("--calib-data", metavar="DATA",
                   help="text: .txt/.jsonl/.json/.parquet, Hub dataset name[:config][@split], or builtin (default)")
    g.add_argument("--calib-text-field", metavar="FIELD", help="field with the text in JSON/Parquet/dataset rows (default text)")
    g.add_argument("--calib-tokens", type=int, metavar="T", help="calibration token budget (default 8192)")
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
        "max_shard_size", "force", "dry_run", "revision", "allow_pickle", "push_to_hub", "private", "shared_experts",
        "dense_layers", "norm_topk_prob", "calib_data", "calib_text_field", "calib_tokens")}
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
    _print_recall(result)
    if api is not None:
        from moekit.hub.push import push_folder

        print(f"pushed: {push_folder(result, config.push_to_hub, private=config.private, api=api)}")
    print(f"next: moekit eval {result} --compare {config.source}   (perplexity and expert load)")
    return 0


def _bool(value: str) -> bool:
    import argparse

    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not true or false")


def _print_recall(out) -> None:
    """Router-vs-oracle recall per layer, from the provenance file the run wrote."""
    import json
    from pathlib import Path

    from moekit.upcycle.convert import PROVENANCE_FILE

    prov = json.loads((Path(out) / PROVENANCE_FILE).read_text())
    recall = prov.get("router_recall") or {}
    if prov.get("calibration"):
        c = prov["calibration"]
        print(f"calibrated on {c['tokens']:,} tokens of {c['data']} in {c['seconds']:.0f}s "
              f"(method {prov['method']}, router {prov['router']})")
    if recall:
        values = list(recall.values())
        print(f"router top-k recall vs oracle (held-out calibration tokens): mean {sum(values) / len(values):.2f}, "
              "per layer " + " ".join(f"{v:.2f}" for v in values))
