"""`bertforge quickstart`: the whole path on this machine, with no network and no data of the user's.

The quickstart is a list of steps (`STEPS`); each takes the shared `Context`, does one thing, records
what it wrote and returns a one-line result. `run_quickstart` runs them in order, prints one timed line
per step, then where everything was written and what to try next. Later stages of the path
(prepare -> pretrain -> fine-tune -> serve) are added as further rows of `STEPS`.

Steps now: corpus (the Python standard library's docstrings and comments by default, or --corpus,
capped at --max-mb) -> WordPiece tokenizer -> a BertForMaskedLM with the vocabulary padded to a
multiple of 64 -> forward pass and MLM loss on masked corpus sentences (untrained, so the loss is
near chance, ln V) -> save in our format -> export to Hugging Face format -> read both back.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bertforge.errors import BertforgeError

MARKER = ".bertforge-quickstart"  # marks a folder quickstart may overwrite on a rerun
OWNED = ("corpus", "tokenizer", "model", "model-hf")
NUM_SENTENCES = 8
MASK_RATE = 0.15
MAX_TOKENS = 128


@dataclass
class QuickstartOptions:
    corpus: list[str] | None = None  # None: the standard-library docs corpus
    out: str = "bertforge-quickstart"
    vocab_size: int = 8192
    max_mb: float = 1.0
    preset: str = "mini"
    seed: int = 0


@dataclass
class Context:
    """What the steps share: options, output folder, the artefacts built so far, what was written."""

    opts: QuickstartOptions
    out: Path
    corpus_file: Path | None = None
    tokenizer: object | None = None
    model: object | None = None
    batch: dict | None = None  # input_ids, attention_mask, labels of the forward step
    written: list[tuple[str, Path, str]] = field(default_factory=list)  # (name, path, what)

    def wrote(self, name: str, path: Path, what: str) -> None:
        self.written.append((name, path, what))


@dataclass
class Step:
    name: str
    run: Callable[[Context], str]  # returns a one-line result


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
    from bertforge.wordpiece import train_wordpiece

    tok = train_wordpiece([ctx.corpus_file], vocab_size=ctx.opts.vocab_size, show_progress=False)
    tok.save(ctx.out / "tokenizer")
    ctx.tokenizer = tok
    ctx.wrote("tokenizer", ctx.out / "tokenizer", "vocab.txt + tokenizer.json (HF-loadable)")
    example = "Return the number of items in a container."
    return f"{tok.vocab_size:,} WordPiece tokens; {example!r} -> {' '.join(tok.tokenize(example))}"


def step_model(ctx: Context) -> str:
    import torch

    from bertforge.inference import count_parameters
    from bertforge.model.bert import BertConfig, pad_vocab_size
    from bertforge.model.heads import BertForMaskedLM

    tok = ctx.tokenizer
    config = BertConfig.from_preset(ctx.opts.preset, vocab_size=pad_vocab_size(tok.vocab_size),
                                    pad_token_id=tok.pad_token_id)
    torch.manual_seed(ctx.opts.seed)
    ctx.model = BertForMaskedLM(config).eval()
    total, non_emb = count_parameters(ctx.model)
    vocab = (f"vocab {tok.vocab_size:,} padded to {config.vocab_size:,}" if config.vocab_size != tok.vocab_size
             else f"vocab {tok.vocab_size:,} (a multiple of 64 already)")
    return (f"BertForMaskedLM '{ctx.opts.preset}': {config.num_hidden_layers} layers, hidden "
            f"{config.hidden_size}, {vocab}; "
            f"{total / 1e6:.2f}M parameters ({non_emb / 1e6:.2f}M non-embedding)")


def step_forward(ctx: Context) -> str:
    import torch

    tok, model = ctx.tokenizer, ctx.model
    sentences = pick_sentences(ctx.corpus_file, NUM_SENTENCES)
    encs = tok.encode_batch(sentences, max_length=MAX_TOKENS, truncation="longest_first")
    T = max(len(e.input_ids) for e in encs)
    ids = torch.full((len(encs), T), tok.pad_token_id)  # (B, T)
    attention = torch.zeros_like(ids)
    for i, e in enumerate(encs):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention[i, : len(e.input_ids)] = 1
    gen = torch.Generator().manual_seed(ctx.opts.seed)
    maskable = attention.bool() & ~torch.isin(ids, torch.tensor(sorted(tok.special_ids)))
    chosen = maskable & (torch.rand(ids.shape, generator=gen) < MASK_RATE)
    if not chosen.any():  # very short sentences: mask one token so the loss is defined
        chosen.view(-1)[maskable.view(-1).nonzero()[0]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    masked = torch.where(chosen, torch.full_like(ids, tok.mask_token_id), ids)
    with torch.inference_mode():
        logits = model(masked, attention_mask=attention).logits  # (B, T, V)
        loss = model(masked, attention_mask=attention, labels=labels).loss
    ctx.batch = {"input_ids": masked, "attention_mask": attention, "logits": logits}
    chance = math.log(tok.vocab_size)
    return (f"{len(sentences)} corpus sentences, batch {tuple(ids.shape)} -> logits {tuple(logits.shape)}; "
            f"MLM loss {loss.item():.2f} on {int(chosen.sum())} masked tokens (untrained, so near "
            f"chance ln {tok.vocab_size} = {chance:.2f})")


def pick_sentences(path: Path, n: int) -> list[str]:
    """n lines of 8-60 words spread evenly over the corpus file (any non-empty lines if too few)."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    good = [ln for ln in lines if 8 <= len(ln.split()) <= 60] or lines
    if not good:
        raise BertforgeError(f"corpus '{path}' has no text lines: pass a corpus with text")
    stride = max(1, len(good) // n)
    return good[::stride][:n]


def step_save(ctx: Context) -> str:
    from bertforge.model.loading import save_model

    path = ctx.out / "model"
    save_model(ctx.model, path, tokenizer=ctx.tokenizer, meta={"created_by": "bertforge quickstart",
                                                                 "pretrained": False})
    ctx.wrote("model", path, "our format (safetensors + config), with its tokenizer")
    return f"saved to {path} ({_size_mb(path):.1f} MB)"


def step_export(ctx: Context) -> str:
    from bertforge.model.loading import export_hf

    path = ctx.out / "model-hf"
    export_hf(ctx.model, path, tokenizer=ctx.tokenizer)
    ctx.wrote("model-hf", path, "Hugging Face format (transformers' BertForMaskedLM loads it)")
    return f"exported to {path} ({_size_mb(path):.1f} MB)"


def step_verify(ctx: Context) -> str:
    import torch

    from bertforge.inference import describe, load_checked

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
    return (f"`bertforge info` reads both ({infos[0]['source']} and {infos[1]['source']}, head "
            f"{infos[0]['head']}, {counts.pop():,} parameters); reloaded logits match (max diff "
            f"{max(diffs):.1e})")


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


STEPS: list[Step] = [
    Step("corpus", step_corpus),
    Step("tokenizer", step_tokenizer),
    Step("model", step_model),
    Step("forward", step_forward),
    Step("save", step_save),
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
        if (out / name).exists():
            shutil.rmtree(out / name)


def check_options(opts: QuickstartOptions) -> None:
    if opts.max_mb <= 0:
        raise BertforgeError(f"--max-mb {opts.max_mb} must be positive: pass e.g. --max-mb 1")
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
        echo(f"[{i}/{len(steps)}] {step.name:<{width}} ", end="", flush=True)
        t0 = time.perf_counter()
        result = step.run(ctx)
        echo(f"{time.perf_counter() - t0:5.1f} s  {result}")
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
    echo(f"  bertforge fill-mask {model} \"return the [MASK] of items.\"   (untrained: random guesses)")
    echo(f"  python -c \"from transformers import AutoModelForMaskedLM as M; "
         f"print(M.from_pretrained('{ctx.out / 'model-hf'}').num_parameters())\"   (with transformers)")
