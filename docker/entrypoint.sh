#!/usr/bin/env bash
# gcl container entry point: one torchrun process per visible GPU of this node, running train.py.
#
#   docker run ... gcl [hydra overrides]   ->  torchrun --standalone --nproc_per_node=N /opt/gcl/train.py [overrides]
#
# Environment:
#   NPROC_PER_NODE  processes on this node (default: visible GPUs - CUDA_VISIBLE_DEVICES entries if set, else
#                   `nvidia-smi -L`; 1 on a machine without GPUs, which trains on the CPU)
#   NNODES          number of nodes (default 1). With NNODES > 1 also set
#   NODE_RANK       this node's rank, 0..NNODES-1
#   MASTER_ADDR     address of node 0, reachable from every node
#   MASTER_PORT     port on node 0 (default 29500)
# A first argument of python, python3, bash, sh, torchrun or accelerate runs that command instead (evaluate,
# export, a shell).
set -euo pipefail

TRAIN_SCRIPT=/opt/gcl/train.py

die() {
  echo "gcl-entrypoint: $*" >&2
  exit 2
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_pos_int() { is_uint "$1" && ((10#$1 > 0)); } # 10#: "08" is eight, not a bad octal number

count_gpus() {
  # CUDA_VISIBLE_DEVICES restricts what torch sees, so it wins over nvidia-smi when set.
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    if [[ -z "${CUDA_VISIBLE_DEVICES}" || "${CUDA_VISIBLE_DEVICES}" == "-1" ]]; then
      echo 0
    else
      local -a ids
      IFS=',' read -r -a ids <<<"${CUDA_VISIBLE_DEVICES}"
      echo "${#ids[@]}"
    fi
  elif command -v nvidia-smi >/dev/null 2>&1; then
    # Only "GPU i: ..." lines; MIG devices are listed indented below their GPU.
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

case "${1:-}" in
  python | python3 | bash | sh | torchrun | accelerate) exec "$@" ;;
esac

if [[ -n "${NPROC_PER_NODE:-}" ]]; then
  is_pos_int "${NPROC_PER_NODE}" || die "NPROC_PER_NODE=${NPROC_PER_NODE} is not a positive integer"
  nproc=$((10#${NPROC_PER_NODE}))
else
  gpus="$(count_gpus)"
  if ((gpus > 0)); then
    nproc="${gpus}"
  else
    echo "gcl-entrypoint: no GPU visible; running 1 process on the CPU (docker run --gpus all to use GPUs)" >&2
    nproc=1
  fi
fi

nnodes="${NNODES:-1}"
is_pos_int "${nnodes}" || die "NNODES=${nnodes} is not a positive integer"
nnodes=$((10#${nnodes}))

if ((nnodes > 1)); then
  [[ -n "${MASTER_ADDR:-}" ]] || die "NNODES=${nnodes} needs MASTER_ADDR (the address of node 0)"
  [[ -n "${NODE_RANK:-}" ]] || die "NNODES=${nnodes} needs NODE_RANK (0..$((nnodes - 1)), 0 on the MASTER_ADDR node)"
  if ! is_uint "${NODE_RANK}" || ((10#${NODE_RANK} >= nnodes)); then
    die "NODE_RANK=${NODE_RANK} is not in 0..$((nnodes - 1))"
  fi
  port="${MASTER_PORT:-29500}"
  is_uint "${port}" || die "MASTER_PORT=${port} is not a port number"
  launch=(--nnodes="${nnodes}" --node_rank="$((10#${NODE_RANK}))" --master_addr="${MASTER_ADDR}" --master_port="${port}")
else
  # One node: torchrun picks a free local port itself.
  launch=(--standalone)
fi

echo "gcl-entrypoint: torchrun ${launch[*]} --nproc_per_node=${nproc} ${TRAIN_SCRIPT} $*" >&2
exec torchrun "${launch[@]}" --nproc_per_node="${nproc}" "${TRAIN_SCRIPT}" "$@"
