"""``moekit pretrain``: thin wrapper over :func:`moekit.pretrain.pretrain`."""

from __future__ import annotations

import argparse
import os

from moekit.cli.common import add_command, add_optimization_args, add_run_args

DESCRIPTION = """
Continue pretraining an upcycled MoE (Mixtral, Qwen2-MoE) — or a dense LLaMA — on
raw text, through TRL's SFTTrainer. Sources (text / JSONL / Parquet files, folders,
globs, Hub datasets; --streaming for corpora larger than disk) are mixed by static
--weights, tokenised once (cached next to the data, keyed by data + tokenizer +
settings) and packed into --max-length blocks.

MoE losses: load balancing (--aux-loss-coef, transformers' own), router z-loss
(--z-loss-coef), and distillation from the dense model you upcycled from
(--teacher, --distill-weight, --distill-temperature). --train picks what learns;
--router-warmup-steps trains the routers alone first. Held-out perplexity and
expert load (per-expert share, max/min, routing entropy) are evaluated every
--eval-steps into TensorBoard and the JSON log; training logs show tokens/s.

OUT receives a stock checkpoint of the same architecture, the tokenizer, a model
card, the resolved recipe and the logs. Checkpoints stay in .OUT.moekit-run until
the run finishes; --resume continues an interrupted run.
"""

EXAMPLES = """
moekit pretrain ./moe ./moe-cpt --data notes.txt --max-tokens 5000000 --eval-fraction 0.02
moekit pretrain ./moe ./moe-cpt --data web.jsonl --data code.parquet --weights 3 1 --max-steps 2000
moekit pretrain ./moe ./moe-cpt --data notes.txt --teacher ./dense --distill-weight 0.5 --max-tokens 5000000
moekit pretrain ./moe ./moe-cpt --data notes.txt --train router --max-steps 200 --aux-loss-coef 0.01
moekit pretrain --config recipes/llama2-7b-8x-top2.yaml --accelerate-config fsdp2 --num-processes 8
moekit pretrain ./moe ./moe-cpt --data notes.txt --max-tokens 5000000 --resume   # after an interruption
"""

FIELDS = (
    "model", "output", "data", "weights", "mixture_stopping", "eval_data", "eval_tokens", "streaming", "train",
    "max_tokens", "router_aux_loss_coef", "z_loss_coef", "router_warmup_steps", "teacher", "distill_weight",
    "distill_temperature", "max_length", "eval_fraction", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "weight_decay", "max_grad_norm", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "gradient_checkpointing", "bf16", "dtype", "experts_implementation", "seed",
    "logging_steps", "eval_steps", "save_steps", "save_total_limit", "report_to", "resume_from_checkpoint", "force",
    "revision", "accelerate_config", "num_processes", "push_to_hub", "private",
)


def register(sub) -> None:
    from moekit.pretrain.config import STOPPING, TRAIN_CHOICES

    flag = argparse.BooleanOptionalAction
    p = add_command(sub, "pretrain", "continued pretraining on raw text (MoE losses, distillation)",
                    DESCRIPTION, EXAMPLES, run)
    p.add_argument("model", nargs="?", metavar="MODEL", help="upcycled MoE (or dense LLaMA) folder or Hub repo id")
    p.add_argument("output", nargs="?", metavar="OUT", help="output folder (must not exist unless --force)")
    p.add_argument("--config", metavar="YAML", help="recipe file; its `pretrain:` section sets defaults, flags win")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="SRC",
                   help="a source (repeat for a mixture): file, folder, glob, or Hub dataset name[:subset][@split]")
    g.add_argument("--weights", type=float, nargs="+", metavar="W", help="one mixing weight per --data (default equal)")
    g.add_argument("--mixture-stopping", choices=STOPPING,
                   help="first_exhausted (default: exact weights, no repeats) or all_exhausted (small sources repeat)")
    g.add_argument("--streaming", action=flag, default=None, help="read the sources lazily (needs --max-steps/--max-tokens)")
    g.add_argument("--max-length", type=int, metavar="T", help="tokens per packed sequence (default 1024)")
    g.add_argument("--eval-fraction", type=float, metavar="F", help="share of each source's documents held out (default 0)")
    g.add_argument("--eval-data", action="append", metavar="SRC", help="held-out source(s) instead of --eval-fraction")
    g.add_argument("--eval-tokens", type=int, metavar="N", help="evaluate on at most N held-out tokens")
    g = p.add_argument_group("what to train, losses")
    g.add_argument("--train", metavar="LIST", help=f"all (default: every parameter) or comma-separated groups: "
                   f"{', '.join(TRAIN_CHOICES[1:])}")
    g.add_argument("--aux-loss-coef", dest="router_aux_loss_coef", type=float, metavar="C",
                   help="load-balancing loss weight (default: the model config's)")
    g.add_argument("--z-loss-coef", type=float, metavar="C", help="router z-loss weight (default 0; ST-MoE used 0.001)")
    g.add_argument("--router-warmup-steps", type=int, metavar="N", help="train only the routers for the first N steps")
    g.add_argument("--teacher", metavar="DENSE", help="distil from this model (same tokenizer), e.g. the dense source")
    g.add_argument("--distill-weight", type=float, metavar="W", help="loss = (1-W) LM + W T² KL (default 0.5)")
    g.add_argument("--distill-temperature", type=float, metavar="T", help="softmax temperature for the KL (default 1)")
    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps")
    g.add_argument("--max-tokens", type=int, metavar="N", help="tokens to train on (instead of --max-steps)")
    g.add_argument("--num-train-epochs", type=float, metavar="E", help="epochs when neither --max-steps nor --max-tokens")
    g.add_argument("--max-grad-norm", type=float, metavar="N", help="gradient clipping (default 1.0)")
    add_optimization_args(
        g, learning_rate="peak LR (default 2e-4, LLaMA-MoE's)",
        lr_scheduler_type="cosine (default), cosine_with_min_lr, linear, constant ...",
        per_device_train_batch_size="sequences per device (default 2)",
        dtype="weight dtype at load (default auto: float32 master weights)",
        seed="seed for data order and mixture (default 0)")
    g = p.add_argument_group("logging, checkpoints, launch, publishing")
    add_run_args(g)
    g.add_argument("--push-to-hub", metavar="REPO_ID", help="upload OUT to this Hub repo when done (see moekit push)")
    g.add_argument("--private", action="store_true", default=None, help="create the --push-to-hub repo private")


def run(args) -> int:
    from moekit.config import build_config
    from moekit.pretrain import PretrainConfig
    from moekit.train.launch import launched, relaunch
    from moekit.train.log import enable_cli_logging

    config = build_config(PretrainConfig, args.config, "pretrain", **{k: getattr(args, k) for k in FIELDS})
    if config.push_to_hub and not launched():  # offline / no token: fail before training
        from moekit.hub.push import hub_client

        hub_client()
    if config.accelerate_config and not launched():
        return relaunch(config, "pretrain")
    enable_cli_logging()
    from moekit.pretrain import pretrain

    result = pretrain(config)
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return 0
    ev = result.metrics
    ppl = f", held-out perplexity {ev['perplexity']:.3f}" if "perplexity" in ev else ""
    print(f"wrote {result.output} ({result.tokens:,} tokens{ppl})")
    if config.push_to_hub:
        from moekit.hub.push import push_folder

        print(f"pushed: {push_folder(result.output, config.push_to_hub, private=config.private)}")
    print(f"next: moekit eval {result.output} --compare {config.teacher or 'DENSE_SOURCE'}   "
          "(perplexity ratio), or moekit finetune")
    return 0
