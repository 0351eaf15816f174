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

    python benchmarks/bench_pretrain_throughput.py --batch 8 --seq 2048 --steps 10
"""

from __future__ import annotations

import argparse
import json
import time

PEAK_FLOPS = 989e12  # H100 SXM dense bf16


def make_model(kind: str, experts: int = 8, top_k: int = 2, impl: str = "grouped_mm"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, max_position_embeddings=4096)
    if kind == "dense":
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=8192, **common))
    else:
        cfg = MixtralConfig(intermediate_size=8192 // experts, num_local_experts=experts,
                            num_experts_per_tok=top_k, **common)
        model = MixtralForCausalLM(cfg)
        model.set_experts_implementation(impl)
    return model.to("cuda", torch.bfloat16)


def active_params(model) -> int:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    if not hasattr(cfg, "num_local_experts"):
        return total
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
    return total - cfg.num_hidden_layers * (cfg.num_local_experts - cfg.num_experts_per_tok) * per_expert


def run(model, batch: int, seq: int, steps: int, warmup: int = 3) -> dict:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda", generator=g)
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    cfg = model.config
    n_act = active_params(model)
    flops_per_token = 6 * n_act + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
    tps = batch * seq * steps / dt
    return {"tokens_per_s": round(tps), "mfu_active": round(tps * flops_per_token / PEAK_FLOPS, 3),
            "active_params_m": round(n_act / 1e6, 1), "first_loss": round(losses[0], 4),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device: this benchmark needs a GPU (run it on an H100)"}))
        return
    torch.manual_seed(0)
    cases = {"dense": ("dense", 8, 2, None), "moe8_top2_grouped": ("moe", 8, 2, "grouped_mm"),
             "moe8_top2_eager": ("moe", 8, 2, "eager"), "moe16_top4_grouped": ("moe", 16, 4, "grouped_mm")}
    results = {}
    for name, (kind, e, k, impl) in cases.items():
        torch.cuda.reset_peak_memory_stats()
        model = make_model(kind, e, k, impl)
        try:
            results[name] = run(model, args.batch, args.seq, args.steps)
        except torch.OutOfMemoryError:
            results[name] = {"error": "out of memory"}
        del model
        torch.cuda.empty_cache()
    dense = results["dense"].get("tokens_per_s")
    for r in results.values():
        if dense and "tokens_per_s" in r:
            r["speed_vs_dense"] = round(r["tokens_per_s"] / dense, 2)
    print(json.dumps({"device": torch.cuda.get_device_name(), "batch": args.batch, "seq": args.seq,
                      "results": results, "targets": {"speed_vs_dense": 1.5, "mfu_active": 0.35}}, indent=2))


if __name__ == "__main__":
    main()
