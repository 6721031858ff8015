#!/usr/bin/env bash
# Run (or resume) every stage of a recipe under torchrun, on one node or several.
#
#   launch/torchrun.sh RECIPE [--run-dir DIR] [other `strata train` options]
#
# One node (the default): NPROC_PER_NODE processes, default one per GPU (2 on a CPU-only machine).
# Several nodes: run this once on every node with the same NNODES, MASTER_ADDR and MASTER_PORT and
# each node's own NODE_RANK (0 .. NNODES-1). torchrun's c10d rendezvous, hosted on MASTER_ADDR,
# joins them -- no ssh, no hostfile. The run folder must be on a filesystem every node shares.
#
#   NPROC_PER_NODE  processes on this node          (NPROC is accepted too)
#   NNODES          nodes in the job                 default 1
#   NODE_RANK       this node's index                required when NNODES > 1
#   MASTER_ADDR     host of the rendezvous           required when NNODES > 1
#   MASTER_PORT     its port                         default 29500
#   RDZV_ID         rendezvous id (a job id)         default strata
#   OMP_NUM_THREADS CPU threads per process          default: cores / processes (at least 1)
#   PYTHON          the interpreter                  default python
#
# SIGTERM and SIGUSR1 are forwarded to the workers, which finish their step, write a checkpoint
# and exit with code 75; the same command resumes. SHUTDOWN_TIMEOUT (default 600 s) is how long
# torchrun waits for that before it SIGKILLs them.
set -euo pipefail
PYTHON=${PYTHON:-python}
NPROC_PER_NODE=${NPROC_PER_NODE:-${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}}
NNODES=${NNODES:-1}
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  cores=$(nproc 2>/dev/null || echo 1)
  OMP_NUM_THREADS=$(( cores / NPROC_PER_NODE > 0 ? cores / NPROC_PER_NODE : 1 ))
fi
export OMP_NUM_THREADS
if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  RDZV=(--standalone)
else
  RDZV=(--nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}" --rdzv-backend c10d
        --rdzv-id "${RDZV_ID:-strata}" --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}")
fi
exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node "$NPROC_PER_NODE" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-600}" \
  -m pipeline train "$@"
