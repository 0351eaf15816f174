"""Training throughput of an upcycled MoE against its dense source. Prints JSON. Needs CUDA.

LLaMA-1B shapes (hidden 2048, FFN 8192, 16 layers, 32/8 heads, vocab 32000), synthetic
weights. For each model: bf16 weights, AdamW, forward + backward + step on batch x seq
tokens, a few warm-up steps then timed steps (CUDA-synchronised). Reports tokens/s,
MFU on *active* parameters (6 * N_active + attention 12 * L * H * T flops per token,
against 989 TFLOP/s dense bf16 on an H100) and the mean loss, so numerics can be compared:

- dense:              the LlamaForCausalLM source
- moe8_top2_grouped:  Mixtral, 8 experts (1024 neurons each) top-2, experts_implementation=grouped_mm
- moe8_top2_eager:    the same model, transformers' eager expert loop
- moe16_top4_grouped: 16 experts (512 neurons) top-4, grouped_mm
- moe8_top2_moekit:   the 8-expert model trained by ``moekit.pretrain`` itself (TRL trainer, bf16
                      autocast, load balancing 0.01, packed synthetic text): tokens/s from its log

    python benchmarks/bench_pretrain_throughput.py --batch 8 --seq 2048 --steps 10
    python benchmarks/bench_pretrain_throughput.py --smoke   # tiny shapes, CPU if no GPU: checks the script

Without --smoke it exits 0 printing {"skipped": ...} on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

PEAK_FLOPS = 989e12  # H100 SXM dense bf16
SHAPES = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
              num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
SMOKE = dict(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_model(kind: str, shapes: dict, experts: int = 8, top_k: int = 2, impl: str = "grouped_mm"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = {k: v for k, v in shapes.items() if k != "intermediate_size"}
    if kind == "dense":
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=shapes["intermediate_size"], **common))
    else:
        cfg = MixtralConfig(intermediate_size=shapes["intermediate_size"] // experts, num_local_experts=experts,
                            num_experts_per_tok=top_k, **common)
        model = MixtralForCausalLM(cfg)
        model.set_experts_implementation(impl)
    return model.to(device(), torch.bfloat16)


def active_params(model) -> int:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    if not hasattr(cfg, "num_local_experts"):
        return total
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
    return total - cfg.num_hidden_layers * (cfg.num_local_experts - cfg.num_experts_per_tok) * per_expert


def mfu(model, tokens_per_s: float, seq: int) -> dict:
    cfg = model.config
    n_act = active_params(model)
    flops_per_token = 6 * n_act + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
    return {"tokens_per_s": round(tokens_per_s), "mfu_active": round(tokens_per_s * flops_per_token / PEAK_FLOPS, 3),
            "active_params_m": round(n_act / 1e6, 1)}


def run(model, batch: int, seq: int, steps: int, warmup: int = 3) -> dict:
    """A plain loop: the model's own speed, no trainer."""
    import torch

    cuda = device() == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    g = torch.Generator(device=device()).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device(), generator=g)
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    sync()
    dt = time.perf_counter() - t0
    return {**mfu(model, batch * seq * steps / dt, seq), "first_loss": round(losses[0], 4),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None}


def run_moekit(model, batch: int, seq: int, steps: int) -> dict:
    """The same model trained by ``moekit.pretrain`` on synthetic packed text; tokens/s from its log."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moekit.pretrain import PretrainConfig, pretrain

    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    model.save_pretrained(work / "moe")
    model.to("cpu")  # pretrain loads its own copy; keep only that one on the GPU
    V = model.config.vocab_size
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(work / "moe")
    import random

    rng = random.Random(0)
    words = (3 + steps + 4) * batch * seq  # enough packed blocks for warm-up and timed steps
    (work / "text.txt").write_text(" ".join(f"t{rng.randrange(3, V)}" for _ in range(words)))
    log_every = max(1, steps // 2)
    with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its logs; stdout is for the JSON
        res = pretrain(PretrainConfig(
            str(work / "moe"), str(work / "out"), data=[str(work / "text.txt")], max_steps=3 + steps, max_length=seq,
            per_device_train_batch_size=batch, gradient_accumulation_steps=1, learning_rate=1e-5, warmup_steps=0,
            router_aux_loss_coef=0.01, gradient_checkpointing=False, logging_steps=log_every, save_steps=10**9,
            report_to=["none"], force=True), progress=False)
    speeds = [e["tokens_per_second"] for e in res.trainer.state.log_history if "tokens_per_second" in e]
    return {**mfu(model, speeds[-1], seq), "speed_logged_by": "moekit.pretrain (last logging window)",
            "note": "moekit's defaults: fp32 master weights with bf16 autocast (the loops above: pure bf16 AdamW)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps, on the CPU without a GPU")
    args = ap.parse_args()
    import torch

    if args.smoke:
        args.batch, args.seq, args.steps = 2, 64, 2
    elif not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device: this benchmark needs a GPU (run it on an H100)"}))
        return
    shapes = SMOKE if args.smoke else SHAPES
    torch.manual_seed(0)
    cases = {"dense": ("dense", 8, 2, None, run), "moe8_top2_grouped": ("moe", 8, 2, "grouped_mm", run),
             "moe8_top2_eager": ("moe", 8, 2, "eager", run), "moe16_top4_grouped": ("moe", 16, 4, "grouped_mm", run),
             "moe8_top2_moekit": ("moe", 8, 2, "grouped_mm", run_moekit)}
    results = {}
    for name, (kind, e, k, impl, measure) in cases.items():
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        model = make_model(kind, shapes, e, k, impl)
        try:
            results[name] = measure(model, args.batch, args.seq, args.steps)
        except torch.OutOfMemoryError:
            results[name] = {"error": "out of memory"}
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    dense = results["dense"].get("tokens_per_s")
    for r in results.values():
        if dense and "tokens_per_s" in r:
            r["speed_vs_dense"] = round(r["tokens_per_s"] / dense, 2)
    print(json.dumps({"benchmark": "pretrain_throughput" + (" (smoke: nothing measured)" if args.smoke else ""),
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
                      "shapes": shapes, "batch": args.batch, "seq": args.seq, "results": results,
                      "targets": {"speed_vs_dense": 1.5, "mfu_active": 0.35}}, indent=2))


if __name__ == "__main__":
    main()
