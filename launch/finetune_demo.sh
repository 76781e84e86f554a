#!/usr/bin/env bash
# Fine-tuning demo: bash launch/finetune_demo.sh TASK [RUN_DIR] [key=value ...]
#
# TASK is a row of the table below (ve, nlvr2, vqa-albef, vqa-blip, vqa-meter, retrieval,
# caption). On a fresh machine: builds the
# task's synthetic train and held-out (--eval) shards (once, under $DEMO_DATA, default runs/data),
# warm-starts from the tiny pre-training demo run ($FINETUNE_FROM, default the row's pre-training demo run; missing, it
# runs bash launch/demo.sh there first; FINETUNE_FROM=runs/demo/warm_start takes the demo's
# unimodal warm start instead), fine-tunes the tiny model on 2 DeepSpeed ranks (ZeRO-2; CPU ranks
# over gloo without a GPU), evaluates it on the held-out shards and prints the score next to the
# chance level and the set's text_only baseline (what the texts alone give away, recorded in the
# synthetic manifest). RUN_DIR (default runs/finetune_TASK) then holds config.yaml,
# tensorboard/, checkpoints/, eval.json; rerunning resumes (or, when finished, only evaluates).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

# -- the tasks: one row each -----------------------------------------------------------------------
#   task       config                data_prep source   train  held-out  pre-training demo  extra data_prep arguments (train)
TASKS="
  ve         tiny_albef_ve         synthetic_ve       2000   300       tiny_albef_elip    -
  nlvr2      tiny_albef_nlvr2      synthetic_nlvr2    4000   500       tiny_albef_elip    -
  vqa-albef  tiny_albef_vqa        synthetic_vqa      4000   500       tiny_albef_elip    -
  vqa-blip   tiny_blip_vqa         synthetic_vqa      4000   500       tiny_blip_elip     -
  vqa-meter  tiny_meter_vqa        synthetic_vqa      2000   300       tiny_meter_elip    -
  retrieval  tiny_albef_retrieval  synthetic          2000   200       tiny_albef_elip    --captions-per-image=5
  caption    tiny_blip_caption     synthetic          2000   200       tiny_albef_elip    --captions-per-image=5
"
# A new task is one more row, and, where its evaluation is new, a case in the score report at the
# end of this file. The pre-training demo is the run a task starts from: runs/demo for
# tiny_albef_elip, runs/demo_<backbone> (e.g. runs/demo_meter) for another one.

TASK=${1:?usage: bash launch/finetune_demo.sh TASK [RUN_DIR] [key=value ...]; TASK: $(awk 'NF {printf "%s ", $1}' <<<"$TASKS")}
RUN_DIR=${2:-runs/finetune_$TASK}
shift $(( $# < 2 ? $# : 2 ))
ROW=$(awk -v t="$TASK" '$1 == t' <<<"$TASKS")
if [[ -z "$ROW" ]]; then
  echo "launch/finetune_demo.sh: unknown task '$TASK'; known: $(awk 'NF {printf "%s ", $1}' <<<"$TASKS")" >&2
  exit 2
fi
read -r _ CONFIG SOURCE NUM_TRAIN NUM_EVAL PRETRAIN EXTRA <<<"$ROW"
EXTRA_ARGS=()
[[ "$EXTRA" == - ]] || EXTRA_ARGS=($EXTRA)
PY=${PYTHON:-python}
DATA=${DEMO_DATA:-runs/data}
TRAIN_DATA=$DATA/${TASK}_train
TEST_DATA=$DATA/${TASK}_test
if [[ "$PRETRAIN" == tiny_albef_elip ]]; then DEMO_RUN=runs/demo; else DEMO_RUN=runs/demo_${PRETRAIN#tiny_}; DEMO_RUN=${DEMO_RUN%_elip}; fi
WARM=${FINETUNE_FROM:-$DEMO_RUN}

# -- devices: 2 ranks; on GPUs one per GPU (at most 2), else CPU ranks over gloo ----------------
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [[ "$NGPU" -ge 1 ]]; then
  NPROC=$(( NGPU < 2 ? NGPU : 2 ))
else
  NPROC=2
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ($(nproc) + 1) / 2 ))}
fi

# -- data ----------------------------------------------------------------------------------------
if [[ ! -f "$TRAIN_DATA/manifest.json" ]]; then
  echo "== building $NUM_TRAIN $SOURCE training samples in $TRAIN_DATA"
  "$PY" -m data_prep "$SOURCE" --num "$NUM_TRAIN" --out "$TRAIN_DATA" --image-size 64 --shard-size 250 \
    --min-shards 2 --no-progress "${EXTRA_ARGS[@]}"
fi
if [[ ! -f "$TEST_DATA/manifest.json" ]]; then
  echo "== building $NUM_EVAL held-out $SOURCE samples in $TEST_DATA"
  "$PY" -m data_prep "$SOURCE" --eval --num "$NUM_EVAL" --out "$TEST_DATA" --image-size 64 --shard-size 100 \
    --min-shards 1 --no-progress
fi

# -- warm start: the tiny pre-training demo run ----------------------------------------------------
if ! "$PY" -c 'import sys; from pipeline.models.weights import find_checkpoint; find_checkpoint(sys.argv[1])' "$WARM" 2>/dev/null; then
  echo "== no pre-training checkpoint in $WARM: running the pre-training demo there first"
  bash launch/demo.sh "$WARM" "$PRETRAIN"
fi

# -- fine-tuning -----------------------------------------------------------------------------------
START=$(date +%s)
echo "== fine-tuning $CONFIG from $WARM into $RUN_DIR on $NPROC rank(s)"
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m pipeline.train --config "$CONFIG" \
  train.run_dir="$RUN_DIR" train.init_from="$WARM" data.train_shards="$TRAIN_DATA" eval.shards="$TEST_DATA" "$@"
echo "== fine-tuning took $(( $(date +%s) - START )) s"

# -- evaluation on the held-out shards ----------------------------------------------------------
EVAL=$("$PY" -c 'import sys
from pipeline.config import load_config
from pipeline.models import eval_task
cfg = load_config(sys.argv[1], sys.argv[2:])
print(cfg.eval.task or eval_task(cfg.model.name))' "$CONFIG" "$@" 2>/dev/null | tail -n 1)
EVAL_ARGS=()
[[ "$EVAL" == caption ]] && EVAL_ARGS=(--compare-untrained)  # captioning's chance level: the untrained model
echo "== $EVAL evaluation on $TEST_DATA"
"$PY" -m pipeline.eval "$EVAL" --run "$RUN_DIR" --shards "$TEST_DATA" "${EVAL_ARGS[@]}"
"$PY" - "$EVAL" "$RUN_DIR/eval.json" "$TEST_DATA/manifest.json" "$TASK" "$(( $(date +%s) - START ))" <<'PY'
import json, sys
kind, task, seconds = sys.argv[1], sys.argv[4], sys.argv[5]
m = json.load(open(sys.argv[2]))
sources = json.load(open(sys.argv[3])).get("sources", {}).values()
text_only = next((100 * s["text_only"] for s in sources if s.get("text_only") is not None), None)
text = "n/a" if text_only is None else f"{text_only:.1f}"
if kind == "retrieval":
    ok = m["txt_r1"] >= 2 * m["chance_txt_r1"] and m["img_r1"] >= 2 * m["chance_img_r1"]
    line = (f"R@1 text {m['txt_r1']:.1f} / image {m['img_r1']:.1f} (chance {m['chance_txt_r1']:.1f} / "
            f"{m['chance_img_r1']:.1f}; text_only {text})")
    verdict = "at least 2x chance"
elif kind == "caption":
    u = m["untrained"]
    ok = m["cider"] >= 1.5 * u["cider"] and m["cider"] >= u["cider"] + 20
    line = f"CIDEr {m['cider']:.1f} (untrained {u['cider']:.1f}; text_only {text}), BLEU-4 {m['bleu_4']:.1f}"
    verdict = "at least 1.5x and +20 CIDEr over the untrained model"
else:  # classify, vqa: an accuracy beside its majority-answer chance
    ok = m["accuracy"] >= m["chance"] + 10
    line = f"accuracy {m['accuracy']:.1f} (chance {m['chance']:.1f}; text_only {text})"
    if text_only is not None:
        line += ", " + ("above" if m["accuracy"] > text_only else "not above") + " text_only"
    verdict = "at least 10 points above chance"
print(f"{task}: {line}; {seconds} s: " + ("learned: " if ok else "NOT learned: ") + verdict)
sys.exit(0 if ok else 1)
PY
echo "== done: $RUN_DIR holds config.yaml, tensorboard/, checkpoints/, eval.json"
