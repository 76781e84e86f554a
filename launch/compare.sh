#!/usr/bin/env bash
# The CPU comparison: bash launch/compare.sh [SWEEP_DIR] [SWEEP] [run options / key=value ...]
#
# Builds synthetic shards whose captions describe only some of the shapes in each image (the
# others are unmentioned distractors: --distractors 2), trains every variant x seed of SWEEP
# (default: tiny_albef_demo, the tiny ALBEF reduction sweep cut to about 30 minutes on 2 cores;
# the full one is tiny_albef_reductions) into SWEEP_DIR (default runs/compare) on 2 ranks
# (CPU ranks over gloo without a GPU), evaluates each, then prints the comparison table and
# where the plots are. Rerunning skips finished runs and resumes unfinished ones.
# Extra arguments go to `python -m pipeline.compare run` (e.g. --seeds 0,1 or optim.max_steps=60).
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP_DIR=${1:-runs/compare}
SWEEP=${2:-tiny_albef_demo}
shift $(( $# < 2 ? $# : 2 ))
PY=${PYTHON:-python}
DATA=${COMPARE_DATA:-runs/data_distractors}
NUM_TRAIN=${COMPARE_NUM_TRAIN:-4000}
NUM_EVAL=${COMPARE_NUM_EVAL:-200}
export PYTHONUNBUFFERED=1

if [[ ! -f "$DATA/train/manifest.json" ]]; then
  echo "== building $NUM_TRAIN synthetic training samples with distractors in $DATA/train"
  "$PY" -m data_prep synthetic --num "$NUM_TRAIN" --distractors 2 --out "$DATA/train" --shard-size 250 \
    --min-shards 2 --no-progress
fi
if [[ ! -f "$DATA/eval/manifest.json" ]]; then
  echo "== building $NUM_EVAL synthetic evaluation images (5 captions each) with distractors in $DATA/eval"
  "$PY" -m data_prep synthetic --eval --num "$NUM_EVAL" --distractors 2 --out "$DATA/eval" --shard-size 100 \
    --min-shards 1 --no-progress
fi

# an EVLGen sweep's stand-in LLM (model.llm.build_if_missing), built once; other sweeps: nothing
BASE=$("$PY" -c 'import sys; from pipeline.compare.sweep import load_sweep; print(load_sweep(sys.argv[1]).base)' "$SWEEP")
"$PY" -m data_prep.tiny_llm --config "$BASE"

START=$(date +%s)
STATUS=0
"$PY" -m pipeline.compare run "$SWEEP" --out "$SWEEP_DIR" "$@" \
  data.train_shards="$DATA/train" eval.shards="$DATA/eval" || STATUS=$?
echo "== the runs took $(( $(date +%s) - START )) s"
"$PY" -m pipeline.compare report "$SWEEP_DIR"
echo "== plots: $SWEEP_DIR/quality_vs_flops.png $SWEEP_DIR/quality_vs_wall.png $SWEEP_DIR/learning_curves.png"
exit "$STATUS"
