#!/usr/bin/env bash
# One command for a lent GPU machine (no package registry there): install peftfast without touching its torch,
# run the GPU tests, the fused-LoRA layer benchmark and `peftfast bench`, and leave everything under
# benchmarks/results/<date>-<gpu>/ (JSON + PNG + logs, with device, versions and commit inside).
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || { echo "no CUDA GPU"; exit 2; }
out=${OUT_DIR:-benchmarks/results/$(date +%F)-$gpu}
mkdir -p "$out"
pip install --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { tail -20 "$out/install.log"; exit 1; }
python -m peftfast info | tee "$out/info.txt"
PEFTFAST_GPU_TESTS=1 python -m pytest -m gpu -q tests/ 2>&1 | tee "$out/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
python benchmarks/bench_lora.py --gpu --out "$out" 2>&1 | tee "$out/bench_lora.log"
python benchmarks/bench_adapter.py --gpu --out "$out" 2>&1 | tee "$out/bench_adapter.log"
python benchmarks/bench_attention.py --gpu --out "$out" 2>&1 | tee "$out/bench_attention.log"
python benchmarks/bench_norm.py --gpu --out "$out" 2>&1 | tee "$out/bench_norm.log"
python benchmarks/bench_cross_entropy.py --gpu --out "$out" 2>&1 | tee "$out/bench_cross_entropy.log"
python benchmarks/bench_nf4.py --gpu --out "$out" 2>&1 | tee "$out/bench_nf4.log"
python -m peftfast bench --model llama-layer --dtype bf16 --steps 20 --seq-len 2048 --batch-size 4 --quiet \
    --out "$out/bench-llama-layer" 2>&1 | tee "$out/bench.log"
echo "results in $out (GPU tests rc=$tests_rc)"
exit "$tests_rc"
