#!/usr/bin/env bash
# Run (or resume) every stage of a recipe under torchrun.
#
#   launch/torchrun.sh RECIPE [--run-dir DIR]
#
# One node: NPROC processes (default: one per GPU, or 2 on a CPU-only machine).
# Several nodes: run this on every node with NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT set;
# torchrun's c10d rendezvous then joins them (the run folder must be on a shared filesystem).
set -euo pipefail
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}
NNODES=${NNODES:-1}
if [ "$NNODES" -eq 1 ]; then
  RDZV=(--standalone)
else
  RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --rdzv_backend c10d
        --rdzv_id "${RDZV_ID:-strata}" --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}")
fi
exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc_per_node "$NPROC" -m pipeline train "$@"
