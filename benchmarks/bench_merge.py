"""LM-Cocktail merge speed and memory: three synthetic LLaMA-shaped bf16 checkpoints, weights
0.5 / 0.3 / 0.2. Prints JSON.

Every contender runs as its own child process; peak RSS is that child's ``ru_maxrss``
(from ``os.wait4``), wall time is measured around it. All in one run, on the same inputs,
with a warm page cache (every input is read once first):

- io_floor:    read every tensor of the three inputs with safetensors and write one
               checkpoint of the same size back (Python's floor for this job)
- moekit:      ``moekit merge OUT --model A --model B --model C --weights 0.5 0.3 0.2``
- mergekit:    ``mergekit-yaml`` 0.1.5 with ``merge_method: linear`` (same weights, bf16)
- lm_cocktail: ``LM_Cocktail.mix_models`` 0.0.4 (``model_type="decoder"``); it imports
               sentence-transformers without declaring it, so the child stubs that module
               (decoder merging never uses it). Its ``mix_models_with_data`` misspells its
               examples keyword (``example_ata``); this benchmark only calls ``mix_models``.

mergekit and lm-cocktail need their own environment (they must not change the main
one's torch/transformers); e.g. ``python -m venv --system-site-packages /tmp/bench-venv &&
/tmp/bench-venv/bin/pip install mergekit==0.1.5 lm-cocktail==0.0.4`` and pass
``--venv-python /tmp/bench-venv/bin/python``. Without it only io_floor and moekit run.

Targets (issue 6): moekit peak RSS <= 1 GB whatever the size; time <= 0.5x mergekit's.

    python benchmarks/bench_merge.py --size-gb 2 --venv-python /tmp/bench-venv/bin/python
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
from pathlib import Path

WEIGHTS = [0.5, 0.3, 0.2]

IO_FLOOR = textwrap.dedent("""
    import sys, pathlib
    from safetensors import safe_open
    from safetensors.torch import save_file
    dst, srcs = pathlib.Path(sys.argv[1]), [pathlib.Path(p) for p in sys.argv[2:]]
    dst.mkdir()
    for f in sorted(srcs[0].glob("*.safetensors")):
        handles = [safe_open(str(s / f.name), "pt") for s in srcs]
        out = {}
        for k in handles[0].keys():
            out[k] = handles[0].get_tensor(k)
            for h in handles[1:]:
                h.get_tensor(k)  # read and drop: the floor reads every input tensor once
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
        del out, handles
""")

LM_COCKTAIL = textwrap.dedent("""
    import sys, types
    # LM_Cocktail 0.0.4 imports sentence_transformers (undeclared) at import time; decoder merging never uses it.
    st = types.ModuleType("sentence_transformers")
    st.SentenceTransformer, st.models = object, types.SimpleNamespace()
    sys.modules["sentence_transformers"] = st
    from LM_Cocktail import mix_models
    out, models = sys.argv[1], sys.argv[2:]
    mix_models(model_names_or_paths=models, model_type="decoder", weights=[0.5, 0.3, 0.2], output_path=out)
""")

AGREEMENT = textwrap.dedent("""
    import json, sys, torch
    from safetensors import safe_open
    from pathlib import Path
    def index(folder):
        files = sorted(Path(folder).glob("*.safetensors"))
        return {k: f for f in files for k in safe_open(str(f), "pt").keys()}
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"]
    ref, others = sys.argv[1], sys.argv[2:]
    ri = index(ref)
    result = {}
    for other in others:
        oi, worst = index(other), 0.0
        for n in names:
            a = safe_open(str(ri[n]), "pt").get_tensor(n).float()
            b = safe_open(str(oi[n]), "pt").get_tensor(n).float()
            worst = max(worst, (a - b).abs().max().item())
        result[Path(other).name] = worst
    print(json.dumps(result))
""")


def make_checkpoints(root: Path, size_gb: float) -> dict:
    """Three LLaMA-1B-shaped bf16 checkpoints of about ``size_gb`` each (bench_upcycle's maker, seeds 0-2)."""
    from bench_upcycle import make_checkpoint

    infos = [make_checkpoint(root / name, size_gb, seed) for seed, name in enumerate("abc")]
    return infos[0]

def warm(folders: list[Path]) -> None:
    """Read every input file once so every contender starts from the same (warm) page cache."""
    for folder in folders:
        for f in folder.glob("*.safetensors"):
            with open(f, "rb", buffering=0) as h:
                while h.read(1 << 24):
                    pass


def measure(cmd: list[str], out: Path) -> dict:
    """bench_upcycle's measurement, keeping the output for the agreement check."""
    from bench_upcycle import measure as measure_child

    return measure_child(cmd, out, keep=True)


def mergekit_config(inputs: list[Path], work: Path) -> Path:
    models = "\n".join(f"  - model: {m}\n    parameters:\n      weight: {w}" for m, w in zip(inputs, WEIGHTS))
    path = work / "mergekit-linear.yml"
    path.write_text(f"merge_method: linear\ndtype: bfloat16\nmodels:\n{models}\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="size of each input checkpoint (default 2)")
    ap.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    ap.add_argument("--venv-python", default=None, help="python with mergekit 0.1.5 and lm-cocktail 0.0.4")
    ap.add_argument("--skip", nargs="*", default=[], choices=["io_floor", "moekit", "mergekit", "lm_cocktail"])
    ap.add_argument("--make-checkpoints", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_checkpoints:  # child mode: keeps torch out of the measuring parent
        print(json.dumps(make_checkpoints(Path(args.make_checkpoints), args.size_gb)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moekit-bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = [work / n for n in "abc"]
    try:
        # The parent never imports torch: a forked child's ru_maxrss starts at the parent's RSS.
        info = {"layers": None, "bytes": None}
        if not all(i.exists() for i in inputs):
            for i in inputs:
                shutil.rmtree(i, ignore_errors=True)
            info = json.loads(subprocess.check_output([sys.executable, __file__, "--size-gb", str(args.size_gb),
                                                       "--make-checkpoints", str(work)]).decode().splitlines()[-1])
        size = info["bytes"] or sum(f.stat().st_size for f in inputs[0].glob("*.safetensors"))
        py, venv = sys.executable, args.venv_python
        contenders = {
            "io_floor": [py, "-c", IO_FLOOR],
            "moekit": [py, "-m", "moekit.cli.main", "merge"],
        }
        if venv:
            contenders["mergekit"] = [str(Path(venv).parent / "mergekit-yaml"), str(mergekit_config(inputs, work))]
            contenders["lm_cocktail"] = [venv, "-c", LM_COCKTAIL]
        runs, outputs = {}, {}
        for name, cmd in contenders.items():
            if name in args.skip:
                continue
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            if name == "moekit":
                cmd = cmd + [str(out), *sum((["--model", str(i)] for i in inputs), []),
                             "--weights", *map(str, WEIGHTS)]
            else:
                cmd = cmd + [str(out)] + ([] if name == "mergekit" else list(map(str, inputs)))
            warm(inputs)
            runs[name] = measure(cmd, out)
            if name != "io_floor" and "error" not in runs[name]:
                outputs[name] = out
            elif out.exists():
                shutil.rmtree(out)
        gb = size / 1e9
        report = {"input_gb_each": round(gb, 3), "inputs": 3, "weights": WEIGHTS, "layers": info["layers"],
                  "cpu_count": os.cpu_count(), "runs": runs}
        if "moekit" in outputs and len(outputs) > 1:  # every linear merge should agree to bf16 rounding
            report["max_abs_diff_vs_moekit"] = json.loads(subprocess.check_output(
                [py, "-c", AGREEMENT, str(outputs["moekit"]), *(str(o) for n, o in outputs.items() if n != "moekit")]
            ).decode().splitlines()[-1])
        m = runs.get("moekit", {})
        if m and "error" not in m:
            report["moekit_peak_rss_gb"] = m["peak_rss_gb"]
            if "io_floor" in runs:
                report["moekit_time_vs_io_floor"] = round(m["seconds"] / runs["io_floor"]["seconds"], 2)
            if "mergekit" in outputs:
                report["moekit_time_vs_mergekit"] = round(m["seconds"] / runs["mergekit"]["seconds"], 2)
            if "lm_cocktail" in outputs:
                report["moekit_time_vs_lm_cocktail"] = round(m["seconds"] / runs["lm_cocktail"]["seconds"], 2)
        report["targets"] = {"moekit_peak_rss_gb": 1.0, "moekit_time_vs_mergekit": 0.5}
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(report, indent=2))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
