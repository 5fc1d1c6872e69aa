#!/usr/bin/env bash
# The recipe search (benchmarks/recipe_search.py, stage `run`) on a CUDA machine, as run through the
# device tool: runs/gpu holds the gzipped corpus, the tokenizers, the quickstart shards and the CPU speeds
# measured on the 2-core machine (stage `measure`). Writes $OUT/search.tgz (metrics of every variant).
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, tokenizers; print(torch.__version__, tokenizers.__version__, torch.cuda.is_available())"
mkdir -p runs/data runs/search/qs runs/search/cpu
cp -r runs/gpu/tok* runs/gpu/qs* runs/data/
cp runs/gpu/speeds-qs.json runs/search/qs/speeds.json; cp runs/gpu/speeds-cpu.json runs/search/cpu/speeds.json
gunzip -c runs/gpu/corpus26.txt.gz > runs/data/corpus26.txt
t0=$SECONDS
for v in 4096 8192 16384 32768; do
  python -m bertforge prepare runs/data/corpus26.txt --tokenizer runs/data/tok$v --output runs/data/shards$v \
    --boundary heading --num-workers 3 --no-progress > runs/data/prep$v.log 2>&1 &
done
python -m bertforge prepare runs/data/corpus26.txt --tokenizer runs/data/tok8192 --output runs/data/shards8192s64 \
  --seq-len 64 --boundary heading --num-workers 3 --no-progress > runs/data/prep8192s64.log 2>&1 &
wait; echo "prepare: $((SECONDS - t0)) s"; tail -n 2 runs/data/prep8192.log
timeout ${QS_TIMEOUT:-150} python benchmarks/recipe_search.py run --grid benchmarks/grids/${QS_GRID:-quickstart}.yaml \
  --out runs/search/qs --device cuda --parallel ${PARALLEL:-12}
echo "quickstart grid: $((SECONDS - t0)) s"
timeout ${CPU_TIMEOUT:-240} python benchmarks/recipe_search.py run --grid benchmarks/grids/${CPU_GRID:-cpu}.yaml \
  --out runs/search/cpu --device cuda --parallel ${PARALLEL:-12}
echo "cpu grid: $((SECONDS - t0)) s"
python benchmarks/recipe_search.py table --out runs/search/qs > /dev/null
python benchmarks/recipe_search.py table --out runs/search/cpu > /dev/null
tar czf "$OUT/search.tgz" runs/search/*/results.* runs/search/*/runs/*/variant.json runs/search/*/runs/*/metrics.jsonl \
  runs/search/*/runs/*/summary.json runs/search/*/runs/*/log.txt 2>/dev/null
cp runs/search/qs/results.md "$OUT/qs.md"; cp runs/search/cpu/results.md "$OUT/cpu.md"
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
