#!/usr/bin/env bash
# One node, N processes: bash launch/local.sh NPROC CONFIG [key=value ...]
#
#   bash launch/local.sh 8 albef_elip train.run_dir=runs/albef_elip data.train_shards=/data/cc3m
#   LAUNCHER=deepspeed bash launch/local.sh 8 albef_elip ...   # the deepspeed launcher instead of torchrun
#
# Without a CUDA GPU the ranks run on CPU (DeepSpeed's CPU accelerator, gloo).
# Stop with Ctrl-C / SIGTERM: the ranks checkpoint at the next step; rerun the same command
# to resume (train.resume=latest is the default).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
  echo "usage: bash launch/local.sh NPROC CONFIG [key=value ...]" >&2
  exit 2
fi
NPROC=$1; CONFIG=$2; shift 2
PY=${PYTHON:-python}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ($(nproc) + NPROC - 1) / NPROC ))}
fi
export PYTHONUNBUFFERED=1

case "${LAUNCHER:-torchrun}" in
  torchrun)
    exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
      -m pipeline.train --config "$CONFIG" "$@" ;;
  deepspeed)
    exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
      --module pipeline.train --config "$CONFIG" "$@" ;;
  *)
    echo "LAUNCHER must be torchrun or deepspeed, not ${LAUNCHER}" >&2; exit 2 ;;
esac
