"""``moekit eval``: thin wrapper over :func:`moekit.eval.evaluate`."""

from __future__ import annotations

from moekit.cli.common import add_command

DESCRIPTION = """
Perplexity of a dense or MoE model on a text file, a Hub dataset or built-in text,
token-weighted over windows of --seq-len tokens starting every --stride tokens
(default: disjoint windows). --compare evaluates a second model on the same tokens,
e.g. the dense model you upcycled from. Prints a table; --output writes JSON.
"""

EXAMPLES = """
moekit eval ./moe --compare ./dense                       # built-in held-out text
moekit eval ./moe --data notes.txt --seq-len 1024 --stride 512
moekit eval ./moe --data corpus.jsonl --text-field content --output eval.json
moekit eval ./moe --data wikitext:wikitext-2-raw-v1@test  # a Hub dataset
moekit eval ./moe --compare ./dense --expert-stats --plots plots/   # expert load, entropy, oracle recall + PNGs
"""


def register(sub) -> None:
    p = add_command(sub, "eval", "perplexity of a dense or MoE model", DESCRIPTION, EXAMPLES, run)
    p.add_argument("model", nargs="?", metavar="MODEL", help="model folder or Hub repo id")
    p.add_argument("--data", help="text source: .txt/.jsonl/.json/.parquet, Hub dataset name[:config][@split], or builtin (default)")
    p.add_argument("--text-field", help="field with the text in JSON/Parquet/dataset rows (default text)")
    p.add_argument("--seq-len", type=int, help="context length per window (default 512)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default = seq-len)")
    p.add_argument("--batch-size", type=int, help="windows per forward pass (default 4)")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    p.add_argument("--compare", metavar="MODEL2", help="also evaluate this model on the same tokens")
    p.add_argument("--output", metavar="JSON", help="write results here")
    p.add_argument("--expert-stats", action="store_true", default=None,
                   help="MoE models: per-layer expert load, max/min load ratio, routing entropy, router-vs-oracle recall")
    p.add_argument("--plots", metavar="DIR", help="write PNGs here: expert-load heat map and perplexity bars (implies --expert-stats)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="default auto (bf16 on CUDA)")
    p.add_argument("--config", metavar="YAML", help="recipe file; its `eval:` section sets defaults")


def run(args) -> int:
    from moekit.config import build_config
    from moekit.eval.perplexity import EvalConfig, evaluate, format_report

    keys = ("model", "data", "text_field", "seq_len", "stride", "batch_size", "max_tokens", "compare", "output",
            "device", "dtype", "expert_stats", "plots")
    config = build_config(EvalConfig, args.config, "eval", **{k: getattr(args, k) for k in keys})
    report = evaluate(config)
    print(format_report(report))
    if config.output:
        print(f"wrote {config.output}")
    return 0
