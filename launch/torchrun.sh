#!/usr/bin/env bash
# Run (or resume) every stage of a recipe on one node or several: `strata train --nproc-per-node`,
# which starts the workers with torch's elastic launch API (torchrun's engine) and exits with their
# code: 0, 2 for a user error (one line), 75 after a pre-emption's checkpoint, else the worker's.
#
#   launch/torchrun.sh RECIPE [--run-dir DIR] [other `strata train` options]
#
# One node (the default): NPROC_PER_NODE processes, default one per GPU (2 on a CPU-only machine).
# Several nodes: run this once on every node with the same NNODES, MASTER_ADDR and MASTER_PORT and
# each node's own NODE_RANK (0 .. NNODES-1). The c10d rendezvous, hosted on MASTER_ADDR,
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
# and exit with code 75 (so does this script); the same command resumes. SHUTDOWN_TIMEOUT (default
# 600 s) is how long the launcher waits for that before it SIGKILLs them.
set -euo pipefail
PYTHON=${PYTHON:-python}
NPROC_PER_NODE=${NPROC_PER_NODE:-${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}}
NNODES=${NNODES:-1}
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  cores=$(nproc 2>/dev/null || echo 1)
  OMP_NUM_THREADS=$(( cores / NPROC_PER_NODE > 0 ? cores / NPROC_PER_NODE : 1 ))
fi
export OMP_NUM_THREADS
LAUNCH=(--nproc-per-node "$NPROC_PER_NODE" --shutdown-timeout "${SHUTDOWN_TIMEOUT:-600}")
if [ "$NNODES" -gt 1 ] || [ -n "${MASTER_ADDR:-}" ]; then
  : "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"  # c10d assigns the ranks; a missing one is a setup error
  LAUNCH+=(--nnodes "$NNODES" --rdzv-id "${RDZV_ID:-strata}"
           --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}")
fi
exec "$PYTHON" -m pipeline train "$@" "${LAUNCH[@]}"
