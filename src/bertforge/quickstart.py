"""`bertforge quickstart`: the whole path on this machine, with no network and no data of the user's.

The quickstart is a list of steps (`STEPS`); each takes the shared `Context`, does one thing, records
what it wrote and returns a one-line result. `run_quickstart` runs them in order, prints one timed line
per step, then where everything was written and what to try next. Later stages of the path
(prepare -> pretrain -> fine-tune -> serve) are added as further rows of `STEPS`.

Steps now: corpus (the Python standard library's docstrings and comments by default, or --corpus,
capped at --max-mb) -> WordPiece tokenizer -> prepare (packed 128-token shards, a held-out split)
-> pretrain a small BERT (masked LM, --minutes of wall clock, one-cycle LR over the budget) ->
held-out MLM loss, accuracy and perplexity -> the model's predictions at masked positions of a held-out
passage, marked right/wrong (terminal + HTML) -> export to Hugging Face format -> read both back.
The quickstart folder is itself a run directory: `bertforge report` and `bertforge inspect` read it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bertforge.errors import BertforgeError

MARKER = ".bertforge-quickstart"  # marks a folder quickstart may overwrite on a rerun
OWNED = ("corpus", "tokenizer", "data", "checkpoints", "model", "model-hf", "config.json", "metrics.jsonl",
         "summary.json", "masked-predictions.html")
SEQ_LEN = 128
# The pretraining recipe, chosen by the recipe search in docs/RESULTS.md ("Leaving the plateau"): rotary
# positions (absolute ones stay on the unigram plateau for the whole budget), LAMB at 1e-2 with 2% warmup,
# 16-row batches (many updates), 15% masking, one-cycle over wall-clock time.
RECIPE = {"model.position_embedding_type": "rotary", "train.batch_size": 16, "optim.optimizer": "lamb",
          "optim.schedule": "time", "optim.lr": 1e-2, "optim.warmup_ratio": 0.02, "optim.betas": [0.9, 0.98],
          "optim.eps": 1e-12, "optim.clip_grad_norm": 0.5, "masking.mlm_probability": 0.15, "data.eval_rows": 512}


@dataclass
class QuickstartOptions:
    corpus: list[str] | None = None  # None: the standard-library docs corpus
    out: str = "bertforge-quickstart"
    vocab_size: int = 8192
    max_mb: float = 3.0
    preset: str = "budget-mini"
    seed: int = 0
    minutes: float = 3.25  # pretraining wall-clock budget


@dataclass
class Context:
    """What the steps share: options, output folder, the artefacts built so far, what was written."""

    opts: QuickstartOptions
    out: Path
    corpus_file: Path | None = None
    tokenizer: object | None = None
    summary: dict | None = None  # of the pretraining run
    batch: dict | None = None  # input_ids, attention_mask, logits of a held-out row (verify compares them)
    written: list[tuple[str, Path, str]] = field(default_factory=list)  # (name, path, what)

    def wrote(self, name: str, path: Path, what: str) -> None:
        self.written.append((name, path, what))


@dataclass
class Step:
    name: str
    run: Callable[[Context], str]  # returns a one-line result
    live: bool = False  # prints progress lines of its own while it runs


# ----------------------------------------------------------------------------- steps


def step_corpus(ctx: Context) -> str:
    from bertforge.data.corpus import iter_documents, write_python_docs_corpus

    max_bytes = int(ctx.opts.max_mb * 1_000_000)
    folder = ctx.out / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    if not ctx.opts.corpus:
        path = write_python_docs_corpus(folder / "python_docs.txt", max_bytes=max_bytes)
        what, capped = "Python standard-library docstrings and comments", ""
    else:
        path = folder / "corpus.txt"
        capped = _write_capped(iter_documents(ctx.opts.corpus), path, max_bytes)
        what = "your corpus " + ", ".join(ctx.opts.corpus)
    size = path.stat().st_size
    if size == 0:
        raise BertforgeError(f"the corpus is empty under --max-mb {ctx.opts.max_mb}: raise --max-mb")
    ctx.corpus_file = path
    ctx.wrote("corpus", path, "training text, documents separated by blank lines")
    docs = path.read_text(encoding="utf-8").count("\n\n")
    return f"{what}: {docs:,} documents, {size / 1e6:.2f} MB{capped}"


def _write_capped(documents, path: Path, max_bytes: int) -> str:
    """Write documents (blank-line separated) until the next would pass max_bytes; says if it stopped."""
    total = 0
    with open(path, "w", encoding="utf-8") as out:
        for doc in documents:
            size = len(doc.encode("utf-8")) + 2
            if total + size > max_bytes:
                return f" (stopped at the --max-mb {max_bytes / 1e6:g} cap; raise it to use more)"
            out.write(doc + "\n\n")
            total += size
    return ""


def step_tokenizer(ctx: Context) -> str:
    from bertforge.data.corpus import CorpusLines
    from bertforge.wordpiece import train_wordpiece

    tok = train_wordpiece(CorpusLines(ctx.corpus_file), vocab_size=ctx.opts.vocab_size, show_progress=False)
    tok.save(ctx.out / "tokenizer")
    ctx.tokenizer = tok
    ctx.wrote("tokenizer", ctx.out / "tokenizer", "vocab.txt + tokenizer.json (HF-loadable)")
    example = "Return the number of items in a container."
    return f"{tok.vocab_size:,} WordPiece tokens; {example!r} -> {' '.join(tok.tokenize(example))}"


def step_prepare(ctx: Context) -> str:
    from bertforge.data.shards import PrepareConfig, prepare

    summary = prepare(PrepareConfig(sources=[str(ctx.corpus_file)], output=str(ctx.out / "data"),
                                    tokenizer=str(ctx.out / "tokenizer"), seq_len=SEQ_LEN, val_fraction=0.05,
                                    seed=ctx.opts.seed, num_workers=0, show_progress=False))
    ctx.wrote("data", ctx.out / "data", f"{SEQ_LEN}-token packed shards + manifest.json")
    splits = summary["splits"]
    return (f"{summary['documents']:,} documents, {summary['tokens']:,} tokens -> {splits['train']['sequences']:,} "
            f"training and {splits['val']['sequences']:,} held-out rows of {SEQ_LEN} tokens")


def step_pretrain(ctx: Context) -> str:
    from bertforge.config import load_run_config
    from bertforge.workflows.pretrain import PretrainRunConfig, main

    cfg = load_run_config(PretrainRunConfig, flags={
        **RECIPE, "model.preset": ctx.opts.preset, "model.max_position_embeddings": SEQ_LEN,
        "data.path": str(ctx.out / "data"), "train.output_dir": str(ctx.out), "train.seed": ctx.opts.seed,
        "train.time_budget": f"{ctx.opts.minutes * 60:.1f}", "train.log_every": 5, "train.progress": True,
        "train.eval_every_minutes": round(max(ctx.opts.minutes / 3, 0.25), 2)})
    ctx.summary = main(cfg)
    ctx.wrote("run", ctx.out, "config.json, metrics.jsonl (loss curve), checkpoints/, summary.json")
    ctx.wrote("model", ctx.out / "model", "the pretrained model with its tokenizer (bertforge and transformers load it)")
    losses = _losses(ctx.out / "metrics.jsonl")
    return (f"'{ctx.opts.preset}' for {ctx.summary['elapsed']:.0f} s: {ctx.summary['step']:,} steps, "
            f"{ctx.summary['tokens']:,} tokens, training loss {losses[0]:.2f} -> {losses[-1]:.2f}")


def _held_out_rows(ctx: Context):
    from bertforge.data.dataset import PackedDataset

    return PackedDataset(ctx.out / "data", "val")


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def step_evaluate(ctx: Context) -> str:
    s = ctx.summary
    chance = math.log(ctx.tokenizer.vocab_size)
    return (f"held-out MLM, {s['eval_masked_tokens']:,} tokens shown as [MASK] (15%, fixed masks): accuracy "
            f"{s['eval_accuracy']:.1%}, top-5 {s['eval_top5_accuracy']:.1%}, loss {s['eval_loss']:.2f} (chance "
            f"ln V = {chance:.2f}); the most frequent prediction, {s['eval_top_prediction']!r}, is "
            f"{s['eval_top_prediction_share']:.0%} of all predictions")


def step_predictions(ctx: Context) -> str:
    import torch

    from bertforge.inspect_mlm import accuracy, masked_predictions, render_html, render_terminal
    from bertforge.model.loading import load_model

    loaded = load_model(ctx.out / "model")
    row = _held_out_rows(ctx).rows([0])[0]
    ids = [int(t) for t in row if int(t) != ctx.tokenizer.pad_token_id]
    records = masked_predictions(loaded.model, ctx.tokenizer, ids, mask_rate=0.15, seed=ctx.opts.seed)
    page = ctx.out / "masked-predictions.html"
    page.write_text(render_html(records, "bertforge quickstart: held-out predictions"), encoding="utf-8")
    ctx.wrote("view", page, "the held-out passage with predictions marked right/wrong")
    right, total = accuracy(records)
    with torch.inference_mode():
        x = torch.tensor([ids])
        ctx.batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "logits": loaded.model(x).logits}
    view = render_terminal(records, color=sys.stdout.isatty())
    return f"{right}/{total} masked tokens of a held-out passage predicted right\n{_indent(view)}"


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())


def step_export(ctx: Context) -> str:
    from bertforge.model.loading import export_hf, load_model

    path = ctx.out / "model-hf"
    model = load_model(ctx.out / "model").model
    remote = not model.config.hf_compatible  # rotary / pre-LN / GeGLU: our modeling file rides along
    export_hf(model, path, tokenizer=ctx.tokenizer, remote_code=remote)
    how = ("transformers' AutoModelForMaskedLM loads it with trust_remote_code=True" if remote
           else "transformers' BertForMaskedLM loads it")
    ctx.wrote("model-hf", path, f"Hugging Face format ({how})")
    return f"exported to {path} ({_size_mb(path):.1f} MB; {how})"


def step_verify(ctx: Context) -> str:
    import torch

    from bertforge.inference import describe
    from bertforge.model.folders import load_checked

    diffs, infos = [], []
    for path in (ctx.out / "model", ctx.out / "model-hf"):
        loaded = load_checked(path)  # what `bertforge info` does
        infos.append(describe(loaded, path))
        with torch.inference_mode():
            logits = loaded.model(ctx.batch["input_ids"], attention_mask=ctx.batch["attention_mask"]).logits
        diffs.append((logits - ctx.batch["logits"]).abs().max().item())
    counts = {i["parameters"]["total"] for i in infos}
    if len(counts) != 1 or max(diffs) > 1e-5:
        raise RuntimeError(f"saved models differ from the one in memory: parameters {counts}, "
                           f"max logit diff {max(diffs):.2e}")
    return (f"`bertforge info` reads both folders (head {infos[0]['head']}, {counts.pop():,} parameters each); "
            f"reloaded logits match (max diff {max(diffs):.1e})")


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


STEPS: list[Step] = [
    Step("corpus", step_corpus),
    Step("tokenizer", step_tokenizer),
    Step("prepare", step_prepare),
    Step("pretrain", step_pretrain, live=True),
    Step("evaluate", step_evaluate),
    Step("predictions", step_predictions),
    Step("export-hf", step_export),
    Step("verify", step_verify),
]


# ----------------------------------------------------------------------------- runner


def prepare_out(out: Path) -> None:
    """Create `out`, or reuse it when empty or made by an earlier quickstart (its parts are replaced)."""
    if out.exists() and not out.is_dir():
        raise BertforgeError(f"--out '{out}' is a file: pass a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise BertforgeError(f"--out '{out}' is not empty and was not made by quickstart: pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by bertforge quickstart; rerunning it replaces this folder's parts\n")
    for name in OWNED:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        elif (out / name).exists():
            (out / name).unlink()


def check_options(opts: QuickstartOptions) -> None:
    if opts.max_mb <= 0:
        raise BertforgeError(f"--max-mb {opts.max_mb} must be positive: pass e.g. --max-mb 1")
    if opts.minutes <= 0:
        raise BertforgeError(f"--minutes {opts.minutes} must be positive: pass e.g. --minutes 2")
    if opts.vocab_size < 128:
        raise BertforgeError(f"--vocab-size {opts.vocab_size} is too small: pass at least 128")


def run_quickstart(opts: QuickstartOptions, steps: list[Step] | None = None,
                   echo: Callable[..., None] = print) -> Context:
    """Run `steps` (default STEPS) in order, printing one timed line each, then a summary."""
    steps = STEPS if steps is None else steps
    check_options(opts)
    ctx = Context(opts=opts, out=Path(opts.out))
    prepare_out(ctx.out)
    echo(f"bertforge quickstart -> {ctx.out}/")
    start = time.perf_counter()
    width = max(len(s.name) for s in steps)
    for i, step in enumerate(steps, 1):
        echo(f"[{i}/{len(steps)}] {step.name:<{width}} ", end="\n" if step.live else "", flush=True)
        t0 = time.perf_counter()
        result = step.run(ctx)
        lead = f"[{i}/{len(steps)}] {step.name:<{width}} " if step.live else ""
        echo(f"{lead}{time.perf_counter() - t0:5.1f} s  {result}")
    echo(f"done in {time.perf_counter() - start:.1f} s\n")
    print_summary(ctx, echo)
    return ctx


def print_summary(ctx: Context, echo: Callable[..., None] = print) -> None:
    echo("written:")
    rows = [(name, f"{path}{'/' if path.is_dir() else ''}", what) for name, path, what in ctx.written]
    w1, w2 = (max(len(r[i]) for r in rows) for i in (0, 1))
    for name, path, what in rows:
        echo(f"  {name:<{w1}}  {path:<{w2}}  {what}")
    model = ctx.out / "model"
    echo("\nnext:")
    echo(f"  bertforge info {model}")
    echo(f"  bertforge fill-mask {model} \"return the [MASK] of the list.\"")
    echo(f"  bertforge inspect {ctx.out} --data {ctx.out / 'data'} --html view.html")
    plots = importlib.util.find_spec("matplotlib") is not None
    tables_only = "" if plots else " --no-plots   (tables only; pip install 'bertforge[plot]' adds the curves)"
    echo(f"  bertforge report {ctx.out} --out {ctx.out}-report{tables_only}")
    echo(f"  python -c \"from transformers import AutoModelForMaskedLM as M; "
         f"print(M.from_pretrained('{ctx.out / 'model-hf'}', trust_remote_code=True).num_parameters())\"   "
         "(with transformers)")
