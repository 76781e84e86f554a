#!/usr/bin/env bash
# The demo: bash launch/demo.sh [RUN_DIR] [CONFIG] [key=value ...]
#
# On a fresh machine: builds synthetic train and eval shards (once, under $DEMO_DATA, default
# runs/data), trains the unimodal warm start (tiny CLIP with the backbone's ViT, the stand-in
# for ALBEF's pre-trained DeiT and BERT, METER's CLIP ViT and RoBERTa), pre-trains the tiny ALBEF with ELIP from it on 2 DeepSpeed ranks (ZeRO-2),
# evaluates zero-shot retrieval and prints the table next to the chance level. A few minutes.
# DEMO_WARM_START=<config> picks another warm start, DEMO_WARM_START= (empty) skips it.
# A captioning config (bash launch/demo.sh runs/demo_evlgen tiny_evlgen_opt) is evaluated by
# captioning instead: BLEU, METEOR, ROUGE-L and CIDEr next to the untrained model's.
# Without a CUDA GPU the ranks run on CPU; on a GPU node the same command uses the GPUs.
# RUN_DIR (default runs/demo) then holds config.yaml, tensorboard/, checkpoints/, eval.json;
# rerunning resumes (or, when finished, only evaluates again).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/demo}
CONFIG=${2:-tiny_albef_elip}
shift $(( $# < 2 ? $# : 2 ))
PY=${PYTHON:-python}
DATA=${DEMO_DATA:-runs/data}
NUM_TRAIN=${DEMO_NUM_TRAIN:-4000}
NUM_EVAL=${DEMO_NUM_EVAL:-200}
export PYTHONUNBUFFERED=1

# -- devices: 2 ranks; on GPUs one per GPU (at most 2), else CPU ranks over gloo ----------------
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [[ "$NGPU" -ge 1 ]]; then
  NPROC=$(( NGPU < 2 ? NGPU : 2 ))
  echo "== $NGPU GPU(s) found: $NPROC rank(s) on CUDA"
else
  NPROC=2
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ($(nproc) + 1) / 2 ))}
  echo "== no GPU: 2 ranks on CPU (DeepSpeed CPU accelerator, gloo)"
fi

# -- data ----------------------------------------------------------------------------------------
if [[ ! -f "$DATA/synthetic_train/manifest.json" ]]; then
  echo "== building $NUM_TRAIN synthetic training samples in $DATA/synthetic_train"
  "$PY" -m data_prep synthetic --num "$NUM_TRAIN" --out "$DATA/synthetic_train" --shard-size 250 \
    --min-shards 2 --no-progress
fi
if [[ ! -f "$DATA/synthetic_eval/manifest.json" ]]; then
  echo "== building $NUM_EVAL synthetic evaluation images (5 captions each) in $DATA/synthetic_eval"
  "$PY" -m data_prep synthetic --eval --num "$NUM_EVAL" --out "$DATA/synthetic_eval" --shard-size 100 \
    --min-shards 1 --no-progress
fi

# -- a config's stand-in LLM (EVLGen's model.llm.build_if_missing), built once; others: nothing ----
"$PY" -m data_prep.tiny_llm --config "$CONFIG" "$@"

train() {  # train CONFIG RUN_DIR [key=value ...]
  local config=$1 run_dir=$2; shift 2
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m pipeline.train --config "$config" \
    train.run_dir="$run_dir" data.train_shards="$DATA/synthetic_train" eval.shards="$DATA/synthetic_eval" "$@"
}
START=$(date +%s)

# -- warm start: fusion backbones with ITC start from pre-trained unimodal encoders -------------
# the model's name, for BERT-based backbones its number of text-only layers and its ViT: the
# warm start trains as many text layers and the same ViT, so that every encoder weight starts
# pre-trained (METER's CLIP-style ViT differs from ALBEF's)
read -r MODEL TEXT_LAYERS VIT_NAME VIT_KWARGS < <("$PY" -c 'import json, sys; from pipeline.config import load_config
m = load_config(sys.argv[1]).model; v = getattr(m, "vision", None)
print(m.name, getattr(getattr(m, "text", None), "text_layers", "-"), getattr(v, "model_name", "-"),
      json.dumps(getattr(v, "timm_kwargs", None), separators=(",", ":")))' "$CONFIG")
WARM_START=${DEMO_WARM_START-auto}
if [[ "$WARM_START" == auto ]]; then
  case "$MODEL" in albef|blip|meter) WARM_START=tiny_clip ;; *) WARM_START= ;; esac
fi
INIT=()
if [[ -n "$WARM_START" ]]; then
  echo "== warm start: $WARM_START (in-batch contrastive) into $RUN_DIR/warm_start"
  WARM_ARGS=()
  [[ "$TEXT_LAYERS" == - ]] || WARM_ARGS=(model.text.text_layers="$TEXT_LAYERS")
  [[ "$VIT_NAME" == - ]] || WARM_ARGS+=(model.vision.model_name="$VIT_NAME" model.vision.timm_kwargs="$VIT_KWARGS")
  train "$WARM_START" "$RUN_DIR/warm_start" "${WARM_ARGS[@]}"
  INIT=(train.init_from="$RUN_DIR/warm_start")
fi

# -- pre-training --------------------------------------------------------------------------------
echo "== pre-training $CONFIG into $RUN_DIR (TensorBoard: tensorboard --logdir $RUN_DIR)"
train "$CONFIG" "$RUN_DIR" "${INIT[@]}" "$@"
echo "== training took $(( $(date +%s) - START )) s"

# -- evaluation ----------------------------------------------------------------------------------
TASK=$("$PY" -c 'import sys
from pipeline.config import load_config
from pipeline.models import eval_task
print(eval_task(load_config(sys.argv[1], sys.argv[2:]).model.name))' "$CONFIG" "$@" 2>/dev/null | tail -n 1)
if [[ "$TASK" == caption ]]; then
echo "== captioning on $DATA/synthetic_eval, next to the same model untrained"
"$PY" -m pipeline.eval caption --run "$RUN_DIR" --shards "$DATA/synthetic_eval" --compare-untrained
"$PY" - "$RUN_DIR/eval.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
u = m["untrained"]
ok = m["cider"] >= 1.5 * u["cider"] and m["cider"] >= u["cider"] + 20
print(f"CIDEr {m['cider']:.1f} (untrained {u['cider']:.1f}), BLEU-4 {m['bleu_4']:.1f} (untrained {u['bleu_4']:.1f}): "
      + ("clearly above the untrained model (at least 1.5x and +20 CIDEr)" if ok
         else "NOT clearly above the untrained model"))
sys.exit(0 if ok else 1)
PY
else
echo "== zero-shot retrieval on $DATA/synthetic_eval"
"$PY" -m pipeline.eval retrieval --run "$RUN_DIR" --shards "$DATA/synthetic_eval"
"$PY" - "$RUN_DIR/eval.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
ok = m["txt_r1"] >= 2 * m["chance_txt_r1"] and m["img_r1"] >= 2 * m["chance_img_r1"]
print(f"R@1 text {m['txt_r1']:.1f} (chance {m['chance_txt_r1']:.1f}), image {m['img_r1']:.1f} "
      f"(chance {m['chance_img_r1']:.1f}): " + ("clearly above chance (at least 2x)" if ok else "NOT clearly above chance"))
sys.exit(0 if ok else 1)
PY
fi
echo "== done: $RUN_DIR holds config.yaml, tensorboard/, checkpoints/, eval.json"
