#!/usr/bin/env bash
# The GPU checks of the plateau work, as run once through the device tool (runs/gpu as for gpu_search.sh):
# 1. the control: transformers.BertForMaskedLM vs ours, same config (post-LN mini, absolute positions),
#    data, masks, optimizer and tokens (10 CPU-minutes of ours), and ours with rotary positions;
# 2. the gpu-budget recipe for GPU_SECONDS of wall clock on the 32k-vocabulary shards.
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/out}; mkdir -p "$OUT" runs/data runs/control
cp -r runs/gpu/tok8192 runs/gpu/tok32768 runs/data/; gunzip -c runs/gpu/corpus26.txt.gz > runs/data/corpus26.txt
for v in 8192 32768; do
  python -m bertforge prepare runs/data/corpus26.txt --tokenizer runs/data/tok$v --output runs/data/shards$v \
    --boundary heading --num-workers 6 --no-progress > runs/data/prep$v.log 2>&1 &
done; wait
BASE="model.max_position_embeddings=128 model.hidden_dropout_prob=0 model.attention_probs_dropout_prob=0 \
  train.batch_size=32 optim.lr=1e-3 optim.warmup_ratio=0.05 optim.betas=[0.9,0.98] optim.eps=1e-12 \
  optim.weight_decay=0.01 optim.clip_grad_norm=0.5 masking.mlm_probability=0.25 data.eval_rows=1024 train.log_every=20"
T=${CONTROL_TOKENS:-5010000}
timeout ${CONTROL_S:-50} python benchmarks/hf_control.py --impl hf --data runs/data/shards8192 --tokens $T --evals 4 --out runs/control/hf model.preset=mini $BASE > runs/control/hf.log 2>&1 &
timeout ${CONTROL_S:-50} python benchmarks/hf_control.py --impl ours --data runs/data/shards8192 --tokens $T --evals 4 --out runs/control/ours model.preset=mini $BASE > runs/control/ours.log 2>&1 &
timeout ${CONTROL_S:-50} python benchmarks/hf_control.py --impl ours --data runs/data/shards8192 --tokens $T --evals 4 --out runs/control/ours-rotary model.preset=mini model.position_embedding_type=rotary $BASE > runs/control/ours-rotary.log 2>&1 &
wait; tail -n 1 runs/control/*.log
timeout $((${GPU_SECONDS:-100} + 60)) python -m bertforge pretrain --config configs/gpu-budget.yaml --data runs/data/shards32768 \
  --output runs/gpu-budget train.time_budget=${GPU_SECONDS:-100} train.compile=${GPU_COMPILE:-false} train.progress=false train.eval_every_minutes=0.5 \
  train.save_every_minutes=0 train.log_every=20 > runs/gpu-budget.log 2>&1
tail -n 3 runs/gpu-budget.log
# 3. issue 12's GPU table (benchmarks/bench_gpu.py), cut to BENCH_S seconds: its cases run headline first
timeout $((${BENCH_S:-55} + 20)) python benchmarks/bench_gpu.py --out runs/gpu-bench.json --budget-s ${BENCH_S:-55} > runs/gpu-bench.log 2>&1
tail -n 30 runs/gpu-bench.json.md 2>/dev/null || tail -n 30 runs/gpu-bench.md 2>/dev/null; tail -n 3 runs/gpu-bench.log
tar czf "$OUT/final.tgz" runs/control runs/gpu-budget/metrics.jsonl runs/gpu-budget/summary.json runs/gpu-budget/config.json \
  runs/gpu-budget.log runs/gpu-bench* 2>/dev/null
