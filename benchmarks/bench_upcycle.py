"""Upcycling speed and memory on a synthetic LLaMA-shaped bf16 checkpoint. Prints JSON.

Every contender runs as its own child process; peak RSS is that child's
``ru_maxrss`` (from ``os.wait4``), wall time is measured around it. Measured in
one run, on the same input, with a warm page cache (a plain copy runs first):

- copy:        ``shutil.copytree`` of the checkpoint (the disk's floor)
- io_floor:    read every tensor with safetensors and write it back (Python's floor)
- moekit:      ``moekit upcycle --method random --router zero`` (8 experts, top-2)
- moekit_copy: ``moekit upcycle --method copy`` (8 experts, top-2)
- mergekit:    ``mergekit-moe`` with ``gate_mode: random`` and the dense model as every
               expert (skipped unless ``--mergekit-python`` points at a Python with mergekit)

Targets (issue 2): moekit time <= 1.5x io_floor, peak RSS <= 0.5x checkpoint;
moekit_copy <= 0.5x mergekit's time and <= 1 GB peak RSS.

    python benchmarks/bench_upcycle.py --size-gb 2 --mergekit-python /tmp/mk/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

IO_FLOOR = textwrap.dedent("""
    import sys, pathlib
    from safetensors import safe_open
    from safetensors.torch import save_file
    src, dst = map(pathlib.Path, sys.argv[1:3]); dst.mkdir()
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            save_file({k: h.get_tensor(k) for k in h.keys()}, str(dst / f.name))
""")
COPY = "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])"


def make_checkpoint(folder: Path, size_gb: float, seed: int = 0) -> dict:
    """A LLaMA-1B-shaped bf16 checkpoint (hidden 2048, FFN 5632, 32/8 heads) of about ``size_gb``."""
    import torch
    from transformers import LlamaConfig

    from moekit.io import ShardedWriter, atomic_output
    from moekit.io.writer import TensorSpec

    H, I, V, kv = 2048, 5632, 32000, 512
    per_layer = 2 * H * H + 2 * kv * H + 3 * H * I + 2 * H
    layers = max(1, round((size_gb * 1e9 / 2 - 2 * V * H) / per_layer))
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, architectures=["LlamaForCausalLM"],
                      dtype="bfloat16")
    plan = [TensorSpec("model.embed_tokens.weight", (V, H), "bfloat16")]
    for l in range(layers):
        p = f"model.layers.{l}."
        plan += [TensorSpec(p + "input_layernorm.weight", (H,), "bfloat16"),
                 TensorSpec(p + "post_attention_layernorm.weight", (H,), "bfloat16")]
        plan += [TensorSpec(p + f"self_attn.{n}_proj.weight", s, "bfloat16")
                 for n, s in (("q", (H, H)), ("k", (kv, H)), ("v", (kv, H)), ("o", (H, H)))]
        plan += [TensorSpec(p + f"mlp.{n}.weight", s, "bfloat16")
                 for n, s in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))]
    plan += [TensorSpec("model.norm.weight", (H,), "bfloat16"), TensorSpec("lm_head.weight", (V, H), "bfloat16")]
    g = torch.Generator().manual_seed(seed)
    with atomic_output(folder) as tmp, ShardedWriter(tmp, plan, "1GB") as w:
        for spec in plan:
            w.write(spec.name, (torch.randn(spec.shape, generator=g) * 0.02).to(torch.bfloat16))
        cfg.save_pretrained(tmp)
        _tokenizer(tmp)
    return {"layers": layers, "bytes": sum(s.nbytes for s in plan)}


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def measure(cmd: list[str], out: Path | None = None, keep: bool = False) -> dict:
    """Wall seconds and peak RSS (GB) of one child process; its output folder is removed unless ``keep``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    result = {"seconds": round(seconds, 2), "peak_rss_gb": round(usage.ru_maxrss / 1e6, 3)}
    if os.waitstatus_to_exitcode(status) != 0:
        result["error"] = err.decode(errors="replace").strip().splitlines()[-3:]
    if out is not None and out.exists():
        result["output_gb"] = round(sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e9, 3)
        if not keep:
            shutil.rmtree(out)
    return result


def mergekit_config(dense: Path, folder: Path) -> Path:
    experts = "\n".join(f"  - source_model: {dense}\n    positive_prompts: [\"expert {i}\"]" for i in range(8))
    path = folder / "mergekit-moe.yml"
    path.write_text(f"base_model: {dense}\ngate_mode: random\ndtype: bfloat16\nexperts_per_token: 2\nexperts:\n{experts}\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    ap.add_argument("--mergekit-python", default=None, help="python with mergekit 0.1.5 installed")
    ap.add_argument("--make-checkpoint", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_checkpoint:  # child mode: keeps torch out of the measuring parent
        print(json.dumps(make_checkpoint(Path(args.make_checkpoint), args.size_gb)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moekit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    dense = work / "dense"
    try:
        # The parent never imports torch: a forked child's ru_maxrss starts at the parent's RSS.
        info = {"layers": None, "bytes": None}
        if not dense.exists():
            info = json.loads(subprocess.check_output([sys.executable, __file__, "--size-gb", str(args.size_gb),
                                                       "--make-checkpoint", str(dense)]).decode().splitlines()[-1])
        size = info["bytes"] or sum(f.stat().st_size for f in dense.glob("*.safetensors"))
        py = sys.executable
        moekit = [py, "-m", "moekit.cli.main", "upcycle", str(dense)]
        runs = {
            "copy": measure([py, "-c", COPY, str(dense), str(work / "copy")], work / "copy"),
            "io_floor": measure([py, "-c", IO_FLOOR, str(dense), str(work / "floor")], work / "floor"),
            # the data-free split: this measures streaming conversion, not calibration (see bench_quality.py)
            "moekit": measure(moekit + [str(work / "moe"), "--num-experts", "8", "--top-k", "2", "--method", "random",
                                        "--router", "zero"], work / "moe"),
            "moekit_copy": measure(moekit + [str(work / "moe-copy"), "--method", "copy", "--num-experts", "8",
                                             "--top-k", "2"], work / "moe-copy"),
        }
        if args.mergekit_python:
            mk = Path(args.mergekit_python).parent / "mergekit-moe"
            runs["mergekit"] = measure([str(mk), str(mergekit_config(dense, work)), str(work / "mk"),
                                        "--i-understand-this-is-not-useful-without-training"], work / "mk")
        gb = size / 1e9
        report = {
            "checkpoint_gb": round(gb, 3), "layers": info["layers"], "runs": runs,
            "moekit_time_vs_io_floor": round(runs["moekit"]["seconds"] / runs["io_floor"]["seconds"], 2),
            "moekit_rss_vs_checkpoint": round(runs["moekit"]["peak_rss_gb"] / gb, 3),
            "targets": {"time_vs_io_floor": 1.5, "rss_vs_checkpoint": 0.5},
        }
        if "mergekit" in runs and "error" not in runs["mergekit"]:
            report["copy_time_vs_mergekit"] = round(runs["moekit_copy"]["seconds"] / runs["mergekit"]["seconds"], 2)
            report["targets"].update({"copy_time_vs_mergekit": 0.5, "copy_peak_rss_gb": 1.0})
        print(json.dumps(report, indent=2))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
