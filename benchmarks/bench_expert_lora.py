"""Memory and time of LoRA on one layer of fused experts: PEFT's fold vs moekit's factored forward. Prints JSON.

One Mixtral experts layer with the shapes of an 8-way split of LLaMA-2-7B (8 experts of 1376,
hidden 4096), a batch of 1 x 2048 tokens routed top-2, LoRA r=16 on ``gate_up_proj`` and
``down_proj``; one forward and backward pass (the work a layer does under gradient
checkpointing). Contenders, each in its own child process:

- peft fp32:     PEFT ``target_parameters`` on fp32 experts (the stock QLoRA path:
                 ``prepare_model_for_kbit_training`` upcasts every weight it cannot quantize)
- peft bf16:     PEFT ``target_parameters`` on bf16 experts (moekit's QLoRA before this change)
- factored bf16: moekit's per-expert ``(x·Aᵀ)·Bᵀ`` forward on bf16 experts (``--no-quantize-experts``)
- factored nf4:  the same on NF4 experts (moekit's QLoRA default)

Reported per contender: the layer's weight bytes (experts + LoRA), the transient peak above them
during forward + backward, wall time, and the difference of its output and LoRA gradients from
``peft bf16``'s, as ‖Δ‖ / ‖reference‖ (bf16 rounding; for nf4 also the rounding of
the weights to 4 bits — ``tests/test_expert_lora.py`` checks that path against PEFT on the
dequantized weights). On CUDA memory is
``torch.cuda.max_memory_allocated``; on CPU it is the process's peak RSS (VmHWM, reset after
set-up), which also counts allocator slack.

    python benchmarks/bench_expert_lora.py                 # CUDA if present, else CPU
    python benchmarks/bench_expert_lora.py --tokens 512    # a quicker CPU run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONTENDERS = ("peft fp32", "peft bf16", "factored bf16", "factored nf4")
E, I, H, TOP_K, R = 8, 11008 // 8, 4096, 2, 16


def rss_peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM (the peak RSS) to the current RSS
        f.write("5")


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def build(contender: str, device: str, tokens: int):
    """The experts layer inside a stub ``mlp`` (so PEFT's names match a real model), its LoRA, and inputs."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from moekit.finetune import expert_lora as EL

    torch.manual_seed(0)
    dtype = torch.float32 if contender == "peft fp32" else torch.bfloat16
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E)
    holder = nn.Module()
    holder.mlp = nn.Module()
    with torch.device(device):
        holder.mlp.experts = MixtralExperts(cfg).to(dtype)
        for p in holder.mlp.experts.parameters():
            nn.init.normal_(p, 0, 0.02)
            p.requires_grad_(False)
    lora = LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0,
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    inject_adapter_in_model(lora, holder)
    gen = torch.Generator().manual_seed(1)
    for name, p in holder.named_parameters():
        if "lora_" in name:  # LoRA in fp32 (PEFT's autocast_adapter_dtype); B random so the update counts
            p.data = (torch.randn(p.shape, generator=gen) * 0.02).to(device)
    if contender.startswith("factored"):
        EL.install(holder, quantize=contender.endswith("nf4"))
    hidden = (torch.randn(tokens, H, generator=gen) * 0.5).to(device, dtype)
    logits = torch.randn(tokens, E, generator=gen)
    weights, index = torch.softmax(logits, -1).topk(TOP_K, -1)
    return holder, hidden.requires_grad_(), index.to(device), weights.to(device, dtype)


def worker(contender: str, device: str, tokens: int) -> dict:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    holder, hidden, index, weights = build(contender, device, tokens)
    experts = holder.mlp.experts
    from moekit.finetune.expert_lora import Packed4bit

    packed = [m for m in holder.modules() if isinstance(m, Packed4bit)]
    weight_bytes = (sum(t.numel() * t.element_size() for t in holder.parameters())
                    + sum(m.nbytes for m in packed))  # NF4 bytes and their statistics
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_kb("VmRSS") * 1024
        rss_peak_reset()
    t0 = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        out = experts(hidden, index, weights)
    out.float().square().mean().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_kb("VmHWM") * 1024) - base
    grads = {n: p.grad.float().cpu() for n, p in holder.named_parameters() if p.grad is not None}
    torch.save({"out": out.detach().float().cpu(), "grads": grads}, os.environ["BENCH_OUT"])
    return {"contender": contender, "weights_mb": round(weight_bytes / 2**20, 1),
            "transient_peak_mb": round(peak / 2**20, 1), "fwd_bwd_s": round(seconds, 3),
            "lora_grads": len(grads)}


def compare(results: list[dict], files: dict[str, str]) -> None:
    """‖Δ‖ / ‖ref‖ of output and LoRA gradients against ``peft bf16`` (same seed and weights)."""
    import torch

    ref = torch.load(files["peft bf16"], weights_only=True)
    rel = lambda a, b: round(((a - b).norm() / b.norm()).item(), 5)
    for r in results:
        if r["contender"] in files and "error" not in r:
            got = torch.load(files[r["contender"]], weights_only=True)
            r["rel_diff_out_vs_peft_bf16"] = rel(got["out"], ref["out"])
            r["rel_diff_lora_grads_vs_peft_bf16"] = max(rel(got["grads"][n], g) for n, g in ref["grads"].items())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="tokens in the batch (default 1 x 2048)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.device, a.tokens)))
        return 0

    import importlib.util
    import tempfile

    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    results, files = [], {}
    tmp = tempfile.mkdtemp(prefix="bench-expert-lora-")
    for c in CONTENDERS:
        if c.endswith("nf4") and not has_bnb:
            results.append({"contender": c, "error": "bitsandbytes not installed"})
            continue
        files[c] = os.path.join(tmp, c.replace(" ", "_") + ".pt")
        cmd = [sys.executable, __file__, "--worker", c, "--device", device, "--tokens", str(a.tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_OUT": files[c]})
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        results.append(json.loads(lines[-1]) if proc.returncode == 0 and lines else
                       {"contender": c, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]})
    compare(results, files)
    print(json.dumps({
        "benchmark": "expert_lora", "device": torch.cuda.get_device_name(0) if device == "cuda" else
        f"CPU, {os.cpu_count()} cores", "torch": torch.__version__,
        "layer": {"experts": E, "expert_size": I, "hidden": H, "top_k": TOP_K, "lora_r": R, "tokens": a.tokens},
        "memory": "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS (VmHWM) above set-up",
        "results": results,
    }, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main())
