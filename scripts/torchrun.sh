#!/usr/bin/env bash
# Start one node of a multi-node `plan fit` with torchrun (run this on every node, with its own NODE_RANK).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/torchrun.sh configs/quickstart.yaml --trainer.accelerator gpu
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash scripts/torchrun.sh configs/quickstart.yaml --trainer.accelerator gpu
#
# PROCS_PER_NODE processes per node (default 1; one per GPU). Lightning reads torchrun's environment, so the
# trainer only needs to know the shape: num_nodes and devices are passed to match. The strategy is the
# config's (Lightning's `auto` is DDP once there are several processes); STRATEGY=fsdp2 (or any strategy
# name) sets it. Extra arguments go to `plan fit`. Checkpoints and logs are written by global rank 0, on node 0.
set -euo pipefail
config=${1:?usage: scripts/torchrun.sh CONFIG [plan fit arguments...]}
shift
nnodes=${NNODES:-1}
procs=${PROCS_PER_NODE:-1}
strategy=()
if [[ -n "${STRATEGY:-}" ]]; then strategy=(--trainer.strategy "$STRATEGY"); fi
exec torchrun --nnodes "$nnodes" --nproc_per_node "$procs" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m plan.cli fit --config "$config" "${strategy[@]}" --trainer.num_nodes "$nnodes" --trainer.devices "$procs" "$@"
