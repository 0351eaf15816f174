#!/usr/bin/env bash
# Every GPU check this project has, in parts that each fit one 10-minute device call.
# Results (JSON and logs) go to $OUT (default ./gpu-results). Run from the repository root:
#
#   bash benchmarks/gpu_session.sh tests        # the CUDA tests (QLoRA with NF4 experts, LoRA, ...)
#   bash benchmarks/gpu_session.sh layer        # bench_expert_lora.py on the GPU (one experts layer)
#   bash benchmarks/gpu_session.sh finetune     # bench_finetune.py: moekit QLoRA contenders, 7B shapes
#   bash benchmarks/gpu_session.sh stock        # bench_finetune.py: the stock QLoRA path (the reference)
#   bash benchmarks/gpu_session.sh throughput   # bench_pretrain_throughput.py (issue 4's speed figures)
#
# Wheels the machine lacks (trl, datasets, dill, multiprocess, gguf, bitsandbytes, a newer
# transformers) are installed first from ./.whl when that folder exists (see the device README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1

case "${1:-}" in
  tests)
    python3 -m pytest -q -m gpu -rs tests 2>&1 | tee "$OUT/gpu_tests.log" ;;
  layer)
    python3 benchmarks/bench_expert_lora.py 2>"$OUT/bench_expert_lora.err" | tee "$OUT/bench_expert_lora.json" ;;
  finetune)
    python3 benchmarks/bench_finetune.py --workdir /tmp/bench-ft --only "moekit qlora" --only "moekit qlora-bf16-experts" \
      2>"$OUT/bench_finetune_moekit.err" | tee "$OUT/bench_finetune_moekit.json" ;;
  stock)
    python3 benchmarks/bench_finetune.py --workdir /tmp/bench-ft --only "stock qlora" --only "moekit lora" \
      2>"$OUT/bench_finetune_stock.err" | tee "$OUT/bench_finetune_stock.json" ;;
  throughput)
    python3 benchmarks/bench_pretrain_throughput.py --batch 8 --seq 2048 --steps 10 \
      2>"$OUT/bench_throughput.err" | tee "$OUT/bench_throughput.json" ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh tests|layer|finetune|stock|throughput" >&2; exit 2 ;;
esac
