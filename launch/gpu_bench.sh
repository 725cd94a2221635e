#!/usr/bin/env bash
# Every accelerator figure of the project in one command, meant to finish in under 8 minutes on
# one H200: bench generate, sft and dpo on random-init TinyLlama-1.1B and Llama-3-8B shapes,
# bench influence (exact and first-order, all 256 rows of the original reference set) on the
# TinyLlama shape, all in bf16 compute, no download (random weights, data in launch/data).
#
#   launch/gpu_bench.sh [OUT_DIR]           the real shapes on the default JAX backend
#   launch/gpu_bench.sh --tiny [OUT_DIR]    the same steps on CPU with a tiny shape and sizes
#                                           (or GPU_BENCH_TINY=1): checks that the script works
#
# Writes OUT_DIR/<bench>_<shape>.json per benchmark (its log beside it), then OUT_DIR/gpu_bench.json
# (all results and the machine) and OUT_DIR/gpu_bench.md (tokens/s, MFU against the device's
# bf16 dense peak, 989 TFLOP/s for an H200, seconds per influence example, peak memory).
# A benchmark that fails is listed as failed and the others still run. PYTHON picks the
# interpreter (default python3); OUT_DIR defaults to gpu_bench_out.
set -uo pipefail
tiny=${GPU_BENCH_TINY:-0}
if [ "${1:-}" = "--tiny" ]; then tiny=1; shift; fi
out=${1:-gpu_bench_out}
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MONTESSORI_SHARED_DATA=${MONTESSORI_SHARED_DATA:-$PWD/launch/data}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
mkdir -p "$out"
rm -f "$out"/*.json "$out"/*.log "$out/gpu_bench.md" "$out/failed.txt"

if [ "$tiny" = 1 ]; then
  export JAX_PLATFORMS=cpu
  shapes=(tiny)
  gen=(--batch-sizes 1,2 --max-new-tokens 8 --repeats 1 --length 16)
  sft=(--batch-size 2 --length 64 --steps 2)
  dpo=(--batch-size 1 --length 64 --steps 1)
  infl=(--ref-rows 32 --probes 4 --batch-size 2)  # the GPU run takes all 256
  big=()
else
  shapes=(tinyllama llama3-8b)
  gen=(--batch-sizes 1,64 --max-new-tokens 128 --repeats 2 --length 128)
  sft=(--batch-size 8 --length 1024 --steps 5)
  dpo=(--batch-size 4 --length 1024 --steps 3)
  infl=(--ref-rows 256 --probes 64)
  big=(--param-dtype bfloat16 --remat)  # Llama-3-8B: fp32 params + AdamW would not fit in 141 GB
fi

run() {  # run NAME bench args...: one benchmark, its JSON and log in OUT_DIR
  local name=$1; shift
  echo "== $name: montessori bench $*"
  if ! "$py" -m montessori_jax.cli bench "$@" --json "$out/$name.json" >"$out/$name.log" 2>&1; then
    echo "   failed (see $out/$name.log)"; echo "$name" >>"$out/failed.txt"
  fi
  tail -n 3 "$out/$name.log" | sed 's/^/   /'
}

for shape in "${shapes[@]}"; do
  extra=()
  if [ "$shape" = llama3-8b ]; then
    extra=("${big[@]}")
    sft=(--batch-size 4 --length 1024 --steps 3)
    dpo=(--batch-size 2 --length 1024 --steps 2)
  fi
  run "generate_$shape" generate --random "$shape" --dtype bfloat16 --no-transformers "${gen[@]}"
  run "sft_$shape" sft --random "$shape" --dtype bfloat16 --no-transformers "${sft[@]}" "${extra[@]}"
  if [ "$shape" != llama3-8b ]; then
    run "influence_$shape" influence --random "$shape" --dtype bfloat16 --original 0 "${infl[@]}"
  fi
  run "dpo_$shape" dpo --random "$shape" --dtype bfloat16 --no-transformers "${dpo[@]}" "${extra[@]}"
done
"$py" -m montessori_jax.bench.report "$out"
