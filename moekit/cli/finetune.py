"""``moekit finetune``: thin wrapper over :func:`moekit.finetune.finetune`."""

from __future__ import annotations

import argparse
import os

from moekit.cli.common import add_command, add_optimization_args, add_run_args

DESCRIPTION = """
Fine-tune an MoE (Mixtral, Qwen2-MoE) or a dense LLaMA with LoRA, QLoRA or full
training through TRL's SFTTrainer and PEFT, choosing which parts to train:
attention, experts (fused 3-D weights, via PEFT target_parameters), router
(trained in full; frozen unless named), shared (Qwen2-MoE shared expert), mlp
(dense FFN layers), or all.

QLoRA (--method qlora, CUDA + bitsandbytes) loads the linear layers in 4-bit NF4
and, unlike stock bitsandbytes, packs the fused experts to NF4 too, with LoRA on
them computed per expert (--no-quantize-experts keeps them bf16).

Data: JSONL / JSON / Parquet / CSV / text files or a Hub dataset with `messages`
(loss on assistant turns), `prompt`+`completion` (loss on completions), Alpaca
`instruction`/`input`/`output`, or `text`. OUT receives the PEFT adapter (or the
full model), tokenizer, model card, resolved recipe, loss log and TensorBoard logs;
--merge adds OUT/merged, a stock checkpoint. Checkpoints stay in .OUT.moekit-run
until the run finishes; --resume continues an interrupted run.
"""

EXAMPLES = """
moekit finetune ./moe ./moe-chat --data chat.jsonl                          # LoRA r=16 on attention
moekit finetune ./moe ./moe-chat --data chat.jsonl --target attention,experts --merge
moekit finetune mistralai/Mixtral-8x7B-v0.1 ./mixtral-qlora --config recipes/mixtral-qlora-attention.yaml
moekit finetune ./moe ./moe-qlora --data chat.jsonl --method qlora --target attention,experts   # all 4-bit
moekit finetune ./moe ./moe-full --data sft.parquet --method full --target experts,router --aux-loss-coef 0.01
moekit finetune ./moe ./moe-chat --data chat.jsonl --accelerate-config ddp --num-processes 8
moekit finetune ./moe ./moe-chat --data chat.jsonl --resume                 # after an interruption
"""

FIELDS = (
    "model", "output", "data", "method", "quantize_experts", "target", "lora_r", "lora_alpha", "lora_dropout", "router_aux_loss_coef",
    "merge", "data_split", "data_subset", "max_length", "packing", "packing_strategy", "eval_fraction",
    "completion_only_loss", "assistant_only_loss", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "weight_decay", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "gradient_checkpointing", "bf16", "dtype", "experts_implementation", "seed", "logging_steps", "eval_steps",
    "save_steps", "save_total_limit", "report_to", "resume_from_checkpoint", "force", "revision",
    "accelerate_config", "num_processes",
)


def register(sub) -> None:
    from moekit.finetune.targets import METHODS, TARGET_CHOICES
    from moekit.train.options import PACKING_STRATEGIES

    flag = argparse.BooleanOptionalAction
    p = add_command(sub, "finetune", "LoRA / QLoRA / full fine-tuning (TRL SFT)", DESCRIPTION, EXAMPLES, run)
    p.add_argument("model", nargs="?", metavar="MODEL", help="MoE or LLaMA model folder or Hub repo id")
    p.add_argument("output", nargs="?", metavar="OUT", help="output folder (must not exist unless --force)")
    p.add_argument("--data", metavar="SRC", help="training data: file, folder, glob or Hub dataset id")
    p.add_argument("--config", metavar="YAML", help="recipe file; its `finetune:` section sets defaults, flags win")
    g = p.add_argument_group("what to train")
    g.add_argument("--method", choices=METHODS, help="lora (default), qlora (4-bit base, CUDA) or full")
    g.add_argument("--quantize-experts", action=flag, default=None,
                   help="qlora: fused experts in NF4 too, LoRA on them per expert (default on for qlora)")
    g.add_argument("--target", metavar="LIST", help=f"comma-separated: {', '.join(TARGET_CHOICES)} "
                   "(default attention for lora/qlora, all but router for full)")
    g.add_argument("--lora-r", type=int, metavar="R", help="LoRA rank (default 16)")
    g.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha (default 32)")
    g.add_argument("--lora-dropout", type=float, metavar="P", help="LoRA dropout (default 0; must be 0 with experts)")
    g.add_argument("--aux-loss-coef", dest="router_aux_loss_coef", type=float, metavar="C",
                   help="load-balancing loss weight while the router trains (default: the model config's)")
    g.add_argument("--merge", action="store_true", default=None, help="also write OUT/merged, a stock checkpoint")
    g = p.add_argument_group("data")
    g.add_argument("--data-split", metavar="NAME", help="Hub dataset split (default train)")
    g.add_argument("--data-subset", metavar="NAME", help="Hub dataset configuration")
    g.add_argument("--max-length", type=int, metavar="T", help="tokens per example or packed sequence (default 1024)")
    g.add_argument("--packing", action=flag, default=None, help="pack examples into max-length sequences")
    g.add_argument("--packing-strategy", choices=PACKING_STRATEGIES, help="TRL packing strategy (default bfd)")
    g.add_argument("--eval-fraction", type=float, metavar="F", help="share held out for evaluation (default 0)")
    g.add_argument("--completion-only-loss", action=flag, default=None, help="prompt/completion data: loss on completions only (default on)")
    g.add_argument("--assistant-only-loss", action=flag, default=None, help="chat data: loss on assistant turns only (default on)")
    g = p.add_argument_group("training")
    g.add_argument("--num-train-epochs", type=float, metavar="E", help="epochs (default 1)")
    g.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps; wins over epochs")
    add_optimization_args(g, learning_rate="peak LR (default 2e-4 lora/qlora, 2e-5 full)")
    g = p.add_argument_group("logging, checkpoints, launch")
    add_run_args(g)


def run(args) -> int:
    from moekit.config import build_config
    from moekit.finetune import FinetuneConfig
    from moekit.train.launch import launched, relaunch
    from moekit.train.log import enable_cli_logging

    config = build_config(FinetuneConfig, args.config, "finetune", **{k: getattr(args, k) for k in FIELDS})
    if config.accelerate_config and not launched():
        from moekit.finetune.run import check_packed_experts_parallelism

        check_packed_experts_parallelism(config)  # before starting workers that would all refuse
        return relaunch(config, "finetune")
    enable_cli_logging()
    from moekit.finetune import finetune

    result = finetune(config)
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return 0
    print(f"wrote {result.output}" + (f" (merged model in {result.merged})" if result.merged else ""))
    if result.merged or config.method == "full":
        print(f"next: moekit eval {result.merged or result.output} --data FILE")
    else:
        print(f"next: PeftModel.from_pretrained(base, {str(result.output)!r}), or rerun with --merge for a stock checkpoint")
    return 0
