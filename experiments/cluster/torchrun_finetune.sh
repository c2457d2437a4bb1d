#!/usr/bin/env bash
# Multi-node fine-tuning with torchrun (no SLURM): run this on every node with its NODE_RANK.
# Lightning detects torchrun's environment (LOCAL_RANK, WORLD_SIZE, MASTER_ADDR...).
#   NODE_RANK=0 MASTER_ADDR=node0 bash experiments/cluster/torchrun_finetune.sh /data/mouse ckpt.pth
set -euo pipefail
DATA_DIR=${1:?data directory}
CLINICAL=${2:?clinical score_sde checkpoint}
NNODES=${NNODES:-2}
GPUS=${GPUS:-4}
torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS" --node-rank="${NODE_RANK:?set NODE_RANK}" \
  --master-addr="${MASTER_ADDR:?set MASTER_ADDR}" --master-port="${MASTER_PORT:-29500}" \
  "$(command -v lfmri)" fit --config configs/model/ddpm_34m.yaml --config configs/finetune_mouse.yaml \
  --data.init_args.source.init_args.root="$DATA_DIR" \
  --model.init_args.pretrained.path="$CLINICAL" \
  --trainer.accelerator=gpu --trainer.devices="$GPUS" --trainer.num_nodes="$NNODES" --trainer.strategy=ddp \
  --ckpt_path=last
