#!/bin/bash
# Multi-node without SLURM: run this on every node with NODE_RANK=0..NNODES-1 and MASTER_ADDR set to node 0's
# address (any free port). Each node starts NPROC processes (one per GPU); Lightning reads torchrun's variables.
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/slurm/torchrun_2nodes.sh     # on node 0
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/slurm/torchrun_2nodes.sh     # on node 1
set -euo pipefail
NNODES=${NNODES:-2}
NPROC=${NPROC:-1}
CONFIG=${CONFIG:-configs/fashion_mnist/fast_resnet.yaml}
torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" \
    -m lit_imgcls fit --config "$CONFIG" \
    --trainer.num_nodes="$NNODES" --trainer.devices="$NPROC" --trainer.strategy=ddp \
    --resume=auto "$@"
