#!/usr/bin/env bash
# One command for a lent GPU machine (no package registry there): install peftfast without touching its torch,
# run the GPU tests, every kernel benchmark and `peftfast bench` on the 8B preset (LoRA, packed, QLoRA), leave
# everything under benchmarks/results/<date>-<gpu>/ (JSON + PNG + logs, with device, versions and commit inside) and
# regenerate the summary table of benchmarks/README.md from those JSON files. RUN_GPU_PARTS picks parts:
#   tests kernels bench   (the default) everything: longer than one lease of a few minutes allows
#   quick                 = smoke headline: what a 15-minute lease must bring back first, each part under its own
#                           time limit (RUN_GPU_PART_LIMIT seconds, default 240) so that one slow part cannot take
#                           the rest; on the device tool: OUT_DIR=$OUT/results RUN_GPU_PARTS=quick bash benchmarks/run_gpu.sh
#   smoke                 the fused LoRA and attention GPU tests, stopping at the first failure
#   headline              peftfast bench, llama-3-8b, LoRA r=16 all linears, dropout 0.05, bf16, seq 2048, the largest
#                         batch PEFT fits, against PEFT and Liger: the issue's first target
# The baselines the machine lacks come as wheels in .whl/ (git-ignored), installed here without dependencies or an
# index: before the lease, `pip download --no-deps -d .whl liger-kernel bitsandbytes` (about 44 MB: Liger 0.8.5 and
# bitsandbytes 0.50.2 import and patch under the machine's torch 2.11 / transformers 5.17, checked on CPU), then
# `carry: [".whl"]` on the device tool.
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || { echo "no CUDA GPU"; exit 2; }
out=${OUT_DIR:-benchmarks/results/$(date +%F)-$gpu}
mkdir -p "$out"
if ! pip install --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
  # the GPU paths are Triton: a failed build of peftfast._C (CPU kernels, CUDA NF4) must not cost the whole lease
  tail -20 "$out/install.log"
  echo "peftfast._C did not build (install.log); installing without it" | tee -a "$out/parts.log"
  PEFTFAST_BUILD_EXT=0 pip install --no-deps --no-build-isolation -e . >>"$out/install.log" 2>&1 \
    || { tail -20 "$out/install.log"; exit 1; }
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  pip install --no-deps --no-index .whl/*.whl >"$out/wheels.log" 2>&1 \
    && echo "installed carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')" | tee -a "$out/parts.log" \
    || { tail -5 "$out/wheels.log"; echo "carried wheels did not install (wheels.log)" | tee -a "$out/parts.log"; }
fi
python -m peftfast info | tee "$out/info.txt"
parts=${RUN_GPU_PARTS:-tests kernels bench}  # e.g. RUN_GPU_PARTS=bench on a second call where one call is capped
parts=${parts//quick/smoke headline}
limit=${RUN_GPU_PART_LIMIT:-240}
tests_rc=0
if [[ " $parts " == *" smoke "* ]]; then
  start=$SECONDS
  PEFTFAST_GPU_TESTS=1 timeout "$limit" python -m pytest -m gpu -x -q tests/test_lora_gpu.py tests/test_attention_gpu.py \
      2>&1 | tee "$out/gpu-smoke.log"
  tests_rc=${PIPESTATUS[0]}
  echo "smoke: rc=$tests_rc in $((SECONDS - start)) s" | tee -a "$out/parts.log"
fi
if [[ " $parts " == *" headline "* ]]; then
  start=$SECONDS
  timeout "$limit" python -m peftfast bench --model llama-3-8b --batch-size auto --dtype bf16 --seq-len 2048 \
      --steps 5 --recompute up --quiet --baselines peft,liger --out "$out/bench-llama-3-8b-headline" \
      2>&1 | tee "$out/bench-llama-3-8b-headline.log"
  echo "headline: rc=${PIPESTATUS[0]} in $((SECONDS - start)) s" | tee -a "$out/parts.log"
fi
if [[ " $parts " == *" tests "* ]]; then
  PEFTFAST_GPU_TESTS=1 python -m pytest -m gpu -q tests/ 2>&1 | tee "$out/gpu-tests.log"
  tests_rc=${PIPESTATUS[0]}
fi
if [[ " $parts " == *" kernels "* ]]; then
  for b in lora adapter attention norm cross_entropy nf4 moe; do
    python "benchmarks/bench_$b.py" --gpu --out "$out" 2>&1 | tee "$out/bench_$b.log"
  done
fi
if [[ " $parts " == *" bench "* ]]; then
  # the issue's end-to-end targets: Llama-3-8B, LoRA r=16 on all linears, dropout 0.05, seq 2048, the largest batch
  # PEFT fits, every baseline that is installed (the others are listed as skipped, with the reason)
  common=(--dtype bf16 --seq-len 2048 --steps 10 --quiet --baselines peft,peft+compile,liger,unsloth)
  python -m peftfast bench --model llama-3-8b --batch-size auto "${common[@]}" --out "$out/bench-llama-3-8b" \
      2>&1 | tee "$out/bench-llama-3-8b.log"
  # packing vs padding: documents of 25-100% of 2048 tokens, packed per row or one per row (real tokens counted)
  # (the patch default only: the recompute ladder is the first run's)
  python -m peftfast bench --model llama-3-8b --batch-size auto --packed --recompute up "${common[@]}" \
      --out "$out/bench-llama-3-8b-packed" 2>&1 | tee "$out/bench-llama-3-8b-packed.log"
  python -m peftfast bench --model llama-3-8b --batch-size auto --padded --recompute up "${common[@]}" \
      --out "$out/bench-llama-3-8b-padded" 2>&1 | tee "$out/bench-llama-3-8b-padded.log"
  python -m peftfast bench --model llama-3-8b --method qlora --batch-size auto --recompute up "${common[@]}" \
      --out "$out/bench-llama-3-8b-qlora" 2>&1 | tee "$out/bench-llama-3-8b-qlora.log"
  # QDoRA: PEFT's DoRA over bitsandbytes NF4 vs patched (a one-line skip where bitsandbytes is not installed)
  python -m peftfast bench --model llama-3-8b --method qdora --batch-size auto --recompute up "${common[@]}" \
      --out "$out/bench-llama-3-8b-qdora" 2>&1 | tee "$out/bench-llama-3-8b-qdora.log"
  # DoRA with dropout (the DoRA MLP op) on the 1B shape: PEFT's DoRA forms W + s·B A per layer and call
  python -m peftfast bench --model llama-3.2-1b --method dora --batch-size auto --recompute up "${common[@]}" \
      --out "$out/bench-llama-3.2-1b-dora" 2>&1 | tee "$out/bench-llama-3.2-1b-dora.log"
  # packed projections: Phi-3-mini's qkv_proj and gate_up_proj (the packed LoRA-MLP op)
  python -m peftfast bench --model phi-3-mini --batch-size auto --recompute up "${common[@]}" \
      --out "$out/bench-phi-3-mini" 2>&1 | tee "$out/bench-phi-3-mini.log"
  # mixture of experts: Qwen3-30B-A3B's shapes cut to 8 of 48 layers, LoRA on the attention and the expert stacks
  # (PEFT takes no LoRA dropout there), PEFT's merged stacks vs the experts op's grouped kernels
  python -m peftfast bench --model qwen3-30b-a3b --layers 8 --dropout 0 --batch-size auto --recompute up \
      "${common[@]}" --out "$out/bench-qwen3-30b-a3b" 2>&1 | tee "$out/bench-qwen3-30b-a3b.log"
  # gpt-oss-20b's shapes cut to 8 of 24 layers: biased expert stacks, interleaved clamped SwiGLU, attention sinks
  python -m peftfast bench --model gpt-oss-20b --layers 8 --dropout 0 --batch-size auto --recompute up \
      "${common[@]}" --out "$out/bench-gpt-oss-20b" 2>&1 | tee "$out/bench-gpt-oss-20b.log"
  # speech: Whisper large-v3 on 30 s log-mel windows and 128-token transcripts (the encoder's window is fixed)
  python -m peftfast bench --model whisper-large-v3 --batch-size auto --dtype bf16 --steps 10 --quiet \
      --recompute up --baselines peft,peft+compile --out "$out/bench-whisper-large-v3" \
      2>&1 | tee "$out/bench-whisper-large-v3.log"
fi
# the summary table of benchmarks/README.md, regenerated from every bench.json of this run
python benchmarks/summarize.py "$out" 2>&1 | tail -1
echo "results in $out (GPU tests rc=$tests_rc)"
exit "$tests_rc"
