"""Peak GPU memory and tokens/s of QLoRA and LoRA fine-tuning of an 8-expert MoE. Prints JSON.

Model: an 8-expert split of a LLaMA-2-7B-shaped model (hidden 4096, 32 layers, 32
heads, FFN 11008 -> 8 experts of 1376, top-2, vocab 32000) in Mixtral format, with
synthetic (random) bf16 weights. Sequence 2048, batch 1, gradient checkpointing,
LoRA r=16 / alpha=32, lr 2e-4, same data and seed for every run.

Contenders, each in its own child process (so peak memory is that run's alone):
- stock qlora:  bitsandbytes NF4 via BitsAndBytesConfig (default skip list),
                ``prepare_model_for_kbit_training`` (upcasts every non-4-bit weight,
                fused experts included, to fp32), PEFT LoRA (experts via target_parameters)
- moekit qlora: moekit's path: NF4 on nn.Linear, lm_head/routers skipped, no fp32
                upcast (fused experts stay bf16)
- moekit lora:  bf16 base, LoRA adapters (the stock and moekit LoRA paths are the same)
for targets ``attention`` and ``attention,experts``. Each reports peak allocated /
reserved GPU memory, tokens/s over the timed steps, and the loss at every step
(compare losses across paths: same data, same seed, same adapters at init).

Issue 5's reference (H100, stock path): QLoRA attention 32 GB, attention+experts 52 GB.
Targets: attention+experts <= 24 GB with the same losses; stretch <= 12 GB. The per-layer
part of this (no GPU needed) is ``benchmarks/bench_expert_lora.py``.

    python benchmarks/bench_finetune.py                 # full 7B shapes (about 15 GB of disk)
    python benchmarks/bench_finetune.py --small         # 1-layer smoke run
    python benchmarks/bench_finetune.py --only "moekit qlora"
    python benchmarks/bench_finetune.py --smoke         # tiny shapes, CPU if no GPU: checks the script, measures nothing

Without --smoke it exits 0 printing {"skipped": "no CUDA ..."} on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008 // 8, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, num_local_experts=8, num_experts_per_tok=2,
              max_position_embeddings=4096)
SMALL = dict(SHAPES, num_hidden_layers=1)
SMOKE = dict(vocab_size=512, hidden_size=256, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)
CONTENDERS = [(path, method, targets) for targets in ("attention", "attention,experts")
              for path, method in (("stock", "qlora"), ("moekit", "qlora"), ("moekit", "qlora-bf16-experts"),
                                   ("moekit", "lora"))]


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_checkpoint(folder: Path, shapes: dict) -> None:
    """Random bf16 Mixtral weights, initialised on the GPU, plus a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, MixtralConfig, PreTrainedTokenizerFast

    cfg = MixtralConfig(**shapes, bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=["MixtralForCausalLM"])
    torch.manual_seed(0)
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():  # a random router, so routing varies between tokens
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.02)
    model.save_pretrained(folder)
    del model
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, shapes["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(folder)


def stock_qlora(model_dir: Path):
    """The path users copy from the QLoRA docs: default skip list, prepare_model_for_kbit_training."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0 if device() == "cuda" else "cpu"})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def worker(model_dir: Path, path: str, method: str, targets: str, steps: int, seq: int) -> dict:
    """One contender: load, train ``steps`` steps, report memory, speed and losses."""
    import datasets
    import torch
    from transformers import AutoConfig, AutoTokenizer, TrainerCallback

    from moekit.finetune.targets import quantization_skip_modules, resolve_targets
    from moekit.train import trainer as T
    from moekit.train.options import TrainingOptions

    from moekit.finetune.run import factor_experts

    cfg = AutoConfig.from_pretrained(model_dir)
    variant, method = method, method.split("-")[0]  # qlora-bf16-experts: qlora, experts left in bf16
    chosen = resolve_targets(cfg, targets.split(","), method)
    cuda = device() == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    peak_gb = lambda: (torch.cuda.max_memory_allocated() if cuda else rss_peak_bytes()) / 1e9
    if path == "stock":
        model = stock_qlora(model_dir)
    else:
        quant = T.bnb_4bit_config(quantization_skip_modules(cfg)) if method == "qlora" else None
        model = T.load_model(model_dir, dtype="bfloat16", moe=True, quantization_config=quant,
                             device_map=None if cuda else {"": "cpu"})
        if quant is None:
            model.to(device())
    load_gb = peak_gb()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (steps, seq), generator=g).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    options = TrainingOptions(max_length=seq, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                              max_steps=steps, learning_rate=2e-4, warmup_steps=0, lr_scheduler_type="constant",
                              logging_steps=1, save_steps=10**6, report_to=["none"], seed=0,
                              trainer_args={"save_strategy": "no"})
    run = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    prec = T.precision(options, adapters=True, quantized=method == "qlora")  # bf16 weights + autocast on GPUs
    args = T.sft_config(options, run, prec=prec, progress=False, evaluate=False, router_aux_loss_coef=0.0)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **kw):
            sync()
            times.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = T.build_trainer(model, tokenizer, data, None, args, peft_config=chosen.lora_config(16, 32, 0.0),
                              callbacks=[Clock()])
    if path == "moekit" and method == "qlora":  # what moekit.finetune does after building the trainer
        factor_experts(trainer.model, quantize=variant == "qlora")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    sync()
    T.train(trainer)
    timed = times[2:] if len(times) > 3 else times  # two warm-up steps
    step_s = (timed[-1] - timed[0]) / max(len(timed) - 1, 1)
    return {
        "path": path, "method": variant, "targets": targets,
        "peak_allocated_gb": round(peak_gb(), 2),  # CPU (--smoke): the process's peak RSS
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2) if cuda else None,
        "after_load_gb": round(load_gb, 2),
        "trainable_params": trainable,
        "step_s": round(step_s, 3),
        "tokens_per_s": round(seq / step_s, 1),
        "losses": [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e],
    }


def rss_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(model_dir: Path, contender: tuple, steps: int, seq: int, timeout: int) -> dict:
    path, method, targets = contender
    cmd = [sys.executable, __file__, "--worker", json.dumps([str(model_dir), path, method, targets, steps, seq])]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"path": path, "method": method, "targets": targets, "error": f"timeout after {timeout}s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        oom = "OutOfMemoryError" in proc.stderr
        return {"path": path, "method": method, "targets": targets, "error": "CUDA OOM" if oom else tail}
    return json.loads(lines[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per contender (first two are warm-up)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--small", action="store_true", help="1 layer of the 7B shapes: a quick GPU run of this script")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, 3 steps of 64 tokens, on the CPU without a GPU: checks the script runs")
    p.add_argument("--only", action="append", help='run only "PATH METHOD" contenders, e.g. "moekit qlora"')
    p.add_argument("--workdir", help="where the synthetic checkpoint is written (default: a temp folder)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per contender")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        print(json.dumps(worker(Path(json.loads(a.worker)[0]), *json.loads(a.worker)[1:])))
        return 0

    import torch

    if a.smoke:
        a.steps, a.seq = 3, 64
    elif not torch.cuda.is_available():
        print(json.dumps({"benchmark": "finetune", "skipped": "no CUDA device: this benchmark measures GPU memory"}))
        return 0
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        print(json.dumps({"benchmark": "finetune", "skipped": "bitsandbytes is not installed (pip install bitsandbytes)"}))
        return 0
    shapes = SMOKE if a.smoke else SMALL if a.small else SHAPES
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-finetune-"))
    model_dir = work / ("moe-smoke-8x" if a.smoke else "moe-7b-shaped-1layer-8x" if a.small else "moe-7b-shaped-8x")
    t0 = time.perf_counter()
    if not (model_dir / "config.json").is_file():
        make_checkpoint(model_dir, shapes)
    build_s = time.perf_counter() - t0
    contenders = [c for c in CONTENDERS if not a.only or f"{c[0]} {c[1]}" in a.only]
    results = [run_child(model_dir, c, a.steps, a.seq, a.timeout) for c in contenders]
    import peft
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    print(json.dumps({
        "benchmark": "finetune" + (" (smoke: nothing measured)" if a.smoke else ""),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU", "versions": versions,
        "model": {"format": "mixtral", **shapes, "weights": "synthetic bf16"},
        "seq": a.seq, "batch": 1, "steps": a.steps, "gradient_checkpointing": True, "lora_r": 16,
        "checkpoint_build_s": round(build_s, 1),
        "reference_stock_h100_gb": {"attention": 32, "attention,experts": 52},
        "targets_gb": {"attention,experts": 24, "stretch": 12},
        "results": results,
    }, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main())
