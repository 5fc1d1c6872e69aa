#!/usr/bin/env bash
# The fine-tuning table of docs/RESULTS.md for one starting model: SST-2, CoLA, MRPC, RTE, STS-B, SQuAD v1.1
# and ARC-Easy, each sized to run on 2 CPU cores in minutes (train subsets and epochs below), then one
# `bertforge report` over the runs.
#
#   bash benchmarks/finetune_table.sh MODEL OUT [LR]      # e.g. $MINILM runs/table-minilm 5e-5
#
# MODEL: our model directory or a Hugging Face BERT directory. LR: peak learning rate (default 5e-5).
# Data from ../shared/data (the repository's sibling). Writes OUT/<task>/ and OUT/report/report.md.
# A finished task (its metrics.json exists) is skipped, so a stopped table resumes. EXTRA="KEY=VALUE ..."
# is appended to every run, e.g. EXTRA="data.max_train_examples=16 data.max_eval_examples=16" for a smoke run.
# For a small from-scratch model: LR 3e-4 and EXTRA="model.classifier_pooling=mean model.hidden_dropout_prob=0.1"
# (docs/RESULTS.md, "Fine-tuning: the from-scratch checkpoint").
set -euo pipefail
MODEL=${1:?usage: finetune_table.sh MODEL OUT [LR]}
OUT=${2:?usage: finetune_table.sh MODEL OUT [LR]}
LR=${3:-5e-5}
DATA=${DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
[ -d "$DATA/sst2" ] || { echo "error: no shared data at '$DATA': set DATA=PATH/TO/shared/data" >&2; exit 2; }

ft() {  # task data-folder extra-args...
  local task=$1 folder=$2; shift 2
  if [ -f "$OUT/$task/metrics.json" ]; then echo "== $task: done already ($OUT/$task)"; return; fi
  echo "== $task"
  local start=$SECONDS
  bertforge finetune --task "$task" --model "$MODEL" --data "$DATA/$folder" --output "$OUT/$task" \
    --lr "$LR" --no-progress "$@" ${EXTRA:-}
  echo "== $task: $((SECONDS - start)) s"
}

ft sst2 sst2 --epochs 1 --max-seq-length 64 data.max_train_examples=12000
ft cola cola --epochs 3 --max-seq-length 64
ft mrpc mrpc --epochs 3
ft rte rte --epochs 3 --batch-size 16
ft stsb stsb --epochs 3
ft arc_easy arc --epochs 2 --batch-size 16
# 128-token windows (a budget model has 128 positions), 48 context tokens shared by neighbouring windows
ft squad squad --epochs 1 --batch-size 32 --max-seq-length 128 data.doc_stride=48 \
  data.max_train_examples=3000 data.max_eval_examples=1000
bertforge report "$OUT"/{sst2,cola,mrpc,rte,stsb,arc_easy,squad} --out "$OUT/report" --no-plots
cat "$OUT/report/report.md"
