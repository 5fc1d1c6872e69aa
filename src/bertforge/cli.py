"""The `bertforge` command line: a table of commands, each an argument-adding function and a runner.

`COMMANDS` maps a command name to `Command(help, add_arguments, run, examples)`. A name with a space
(`"tokenizer train"`) is a subcommand of a group (`GROUPS` holds the group's help). To add a command,
write its two small functions and add one row; `build_parser` does the rest.

Parsing only: every runner imports the module that does the work inside the function (so
`bertforge --help` starts without importing torch) and prints its result. `main` turns user errors
(`BertforgeError`, and unreadable files) into one `error: ...` line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from typing import NamedTuple

from bertforge import __version__
from bertforge.errors import BertforgeError
from bertforge.workflows import finetune_cli as ft
from bertforge.workflows import sentence_cli as st

EXIT_USAGE = 2
OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=")
EXIT_INTERRUPTED = 130
TORCHRUN_COMMANDS = ("pretrain", "finetune")  # the commands that split work over torchrun's processes


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; a wider first column so command names and help share a line."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if action.help is not argparse.SUPPRESS:  # argparse forgets the subcommands' extra indent
            for sub in self._iter_indented_subactions(action):
                length = len(self._format_action_invocation(sub)) + self._current_indent
                self._action_max_length = max(self._action_max_length, length)


class Command(NamedTuple):
    """A row of COMMANDS. `add_arguments` and `run` are callables or "module:function" references,
    imported only when that command is the one being run (so heavy modules stay unloaded for --help)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | str
    run: Callable[[argparse.Namespace], int] | str
    examples: str = ""


def resolve(ref):
    """A callable, or "package.module:function" imported now."""
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------- quickstart


def add_quickstart_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", nargs="+", action="extend", metavar="PATH",
                   help="text files, folders, .gz or .jsonl to train on (default: the docstrings and "
                        "comments of this Python's standard library, no download)")
    p.add_argument("--out", default="bertforge-quickstart", metavar="DIR",
                   help="folder for everything quickstart writes (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8192, metavar="N",
                   help="WordPiece vocabulary size (default: %(default)s)")
    p.add_argument("--max-mb", type=float, default=3.0, metavar="N",
                   help="use at most N MB of the corpus (default: %(default)s)")
    p.add_argument("--preset", default="budget-mini", choices=("tiny", "mini", "small", "budget-mini", "budget-small"),
                   help="model shape (default: %(default)s: 4 layers, hidden 256, pre-LN, GeGLU, rotary positions)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=3.25, metavar="M",
                   help="pretraining wall-clock budget in minutes (default: %(default)s)")


def run_quickstart(args: argparse.Namespace) -> int:
    from bertforge.quickstart import QuickstartOptions
    from bertforge.quickstart import run_quickstart as run

    run(QuickstartOptions(corpus=args.corpus, out=args.out, vocab_size=args.vocab_size,
                          max_mb=args.max_mb, preset=args.preset, seed=args.seed,
                          minutes=args.minutes))
    return 0


# ----------------------------------------------------------------------------- tokenizer train


def add_tokenizer_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", nargs="+", metavar="PATH", help="text files, folders, .gz or .jsonl files")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder to write vocab.txt, tokenizer.json and tokenizer_config.json into")
    p.add_argument("--vocab-size", type=int, default=30522, metavar="N", help="(default: %(default)s)")
    p.add_argument("--min-frequency", type=int, default=2, metavar="N",
                   help="keep merges seen at least N times (default: %(default)s)")
    p.add_argument("--limit-alphabet", type=int, default=1000, metavar="N",
                   help="at most N distinct characters (default: %(default)s)")
    p.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=True,
                   help="lowercase the text (default: on; --no-lowercase for a cased vocabulary)")
    p.add_argument("--strip-accents", action=argparse.BooleanOptionalAction, default=None,
                   help="strip accents (default: the same as --lowercase)")
    p.add_argument("--overwrite", action="store_true", help="replace tokenizer files already in --out")


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from bertforge.inference import train_tokenizer

    info = train_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size, lowercase=args.lowercase,
                           strip_accents=args.strip_accents, min_frequency=args.min_frequency,
                           limit_alphabet=args.limit_alphabet, overwrite=args.overwrite)
    print(f"trained a WordPiece vocabulary of {info['vocab_size']:,} tokens in {info['seconds']:.1f} s")
    print(f"wrote {', '.join(info['files'])} to {info['out']}")
    print(f"example: {info['example']!r} -> {' '.join(info['example_tokens'])}")
    return 0


# ----------------------------------------------------------------------------- fill-mask


def add_fill_mask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder with a masked-LM head (ours or Hugging Face)")
    p.add_argument("text", help="text with one or more [MASK] tokens")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="predictions per mask (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_fill_mask(args: argparse.Namespace) -> int:
    from bertforge.inference import fill_mask

    results = fill_mask(args.model, args.text, top_k=args.top_k)
    if args.json:
        print(json.dumps([[{"token": t, "prob": p} for t, p in preds] for preds in results]))
        return 0
    for i, preds in enumerate(results, 1):
        print(f"[MASK] {i} of {len(results)}:")
        for token, prob in preds:
            print(f"  {prob:8.4f}  {token}")
    return 0


# ----------------------------------------------------------------------------- similarity / embed


def add_similarity_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder (sentence-transformers, Hugging Face or ours)")
    p.add_argument("a", help="first text")
    p.add_argument("b", help="second text")


def run_similarity(args: argparse.Namespace) -> int:
    from bertforge.inference import similarity

    print(f"{similarity(args.model, args.a, args.b):.4f}")
    return 0


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder (sentence-transformers, Hugging Face or ours)")
    p.add_argument("--input", required=True, metavar="FILE",
                   help="UTF-8 text, one text per line, or .jsonl with a text field")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="where to write the embeddings: .npy (N x H float32), .jsonl or .csv")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="field holding the text in .jsonl input (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="(default: %(default)s)")
    p.add_argument("--max-seq-length", type=int, default=None, metavar="T",
                   help="tokens per text (default: the model's setting); longer texts are truncated "
                        "and counted in a note")


def run_embed(args: argparse.Namespace) -> int:
    from bertforge.inference import embed

    info = embed(args.model, args.input, args.output, batch_size=args.batch_size,
                 text_field=args.text_field, max_seq_length=args.max_seq_length)
    print(f"embedded {info['count']:,} texts -> {info['output']} ({info['count']} x {info['dim']}) "
          f"in {info['seconds']:.1f} s")
    if info["truncated"]:
        print(f"note: {info['truncated']} texts were longer than {info['max_seq_length']} tokens and were "
              "truncated (raise --max-seq-length to keep more)", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- convert / info


CONVERT_HELP = """\
targets (every architecture bertforge trains, every head; BERT architecture = post-LN, biases,
MLP feed-forward, absolute positions; budget presets = pre-LN, no biases, GeGLU):
  hf                     a transformers folder. BERT architecture: plain BertModel / BertFor* classes,
                         no extra code. Other architectures: config.json, weights and
                         modeling_bertforge.py; load with AutoModel*.from_pretrained(dest,
                         trust_remote_code=True). AutoModel, AutoModelForPreTraining, ...MaskedLM,
                         ...SequenceClassification, ...QuestionAnswering, ...MultipleChoice.
                         Tokenizer model_max_length = the model's position count.
  sentence-transformers  the encoder + pooling (+ normalize): SentenceTransformer(dest); add
                         trust_remote_code=True for non-BERT architectures. Drops task heads.
  onnx                   model.onnx (opset 18, dynamic batch and sequence axes; inputs input_ids,
                         attention_mask, token_type_ids) + config.json + tokenizer. Outputs: the
                         head's (logits, start/end_logits, last_hidden_state + pooler_output);
                         sentence models also sentence_embedding. Needs bertforge[onnx].
  bertforge              the folder training writes: the hf layout plus bertforge's run metadata
                         (task, labels, pooling), which `bertforge` commands read back."""


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.description = f"{p.description}\n\n{CONVERT_HELP}"
    p.add_argument("source", help="model folder: ours, Hugging Face BERT or sentence-transformers")
    p.add_argument("dest", help="new folder to write")
    p.add_argument("--to", required=True, choices=("hf", "sentence-transformers", "onnx", "bertforge"),
                   help="output format (see targets above)")
    p.add_argument("--overwrite", action="store_true", help="replace dest when it already has files")


def run_convert(args: argparse.Namespace) -> int:
    from bertforge.inference import convert

    info = convert(args.source, args.dest, to=args.to, overwrite=args.overwrite)
    print(f"converted {info['source_format']} ({info['head']}) -> {info['to']}: {info['dest']}")
    if info.get("outputs"):
        print(f"ONNX outputs: {', '.join(info['outputs'])}")
    if info["remote_code"]:
        print("note: this architecture has no transformers class: load it with trust_remote_code=True "
              "(its code is modeling_bertforge.py in the folder)")
    return 0


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder: ours, Hugging Face BERT or sentence-transformers")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_info(args: argparse.Namespace) -> int:
    from bertforge.inference import format_model_info, model_info

    info = model_info(args.model)
    print(json.dumps(info, indent=2) if args.json else format_model_info(info))
    return 0


# ----------------------------------------------------------------------------- the table

GROUPS: dict[str, str] = {
    "tokenizer": "WordPiece vocabularies: train",
}

COMMANDS: dict[str, Command] = {
    "quickstart": Command(
        "train a vocabulary, build a BERT and run it end to end (no network, no data needed)",
        add_quickstart_arguments, run_quickstart,
        "  bertforge quickstart\n"
        "  bertforge quickstart --out qs --max-mb 4 --vocab-size 16384\n"
        "  bertforge quickstart --corpus my_texts/ notes.txt.gz --preset tiny"),
    "tokenizer train": Command(
        "train a WordPiece vocabulary on text files, folders or .gz",
        add_tokenizer_train_arguments, run_tokenizer_train,
        "  bertforge tokenizer train corpus.txt --out tok --vocab-size 8192\n"
        "  bertforge tokenizer train data/ wiki.txt.gz --out tok --no-lowercase"),
    "fill-mask": Command(
        "predict the tokens behind [MASK] with a masked-LM model",
        add_fill_mask_arguments, run_fill_mask,
        '  bertforge fill-mask bertforge-quickstart/model "the [MASK] of the module"\n'
        '  bertforge fill-mask path/to/bert-base-uncased "paris is the [MASK] of france." --top-k 3'),
    "embed": Command(
        "write sentence embeddings of a file of texts (.npy, .jsonl or .csv)",
        add_embed_arguments, run_embed,
        "  bertforge embed path/to/all-MiniLM-L6-v2 --input sentences.txt --output emb.npy\n"
        "  bertforge embed MODEL --input docs.jsonl --text-field body --output emb.jsonl"),
    "similarity": Command(
        "cosine similarity of two texts' sentence embeddings",
        add_similarity_arguments, run_similarity,
        '  bertforge similarity path/to/all-MiniLM-L6-v2 "A man is eating." "Someone eats food."'),
    "convert": Command(
        "export a model to transformers, sentence-transformers or ONNX (every architecture)",
        add_convert_arguments, run_convert,
        "  bertforge convert bertforge-quickstart/model hf-out --to hf\n"
        "  bertforge convert runs/cpu-budget/model st-out --to sentence-transformers\n"
        "  bertforge convert runs/cpu-budget/model onnx-out --to onnx\n"
        "  bertforge convert path/to/hf-bert ours --to bertforge"),
    "info": Command(
        "show a model's format, head, parameter counts, config and tokenizer",
        add_info_arguments, run_info,
        "  bertforge info bertforge-quickstart/model\n"
        "  bertforge info path/to/all-MiniLM-L6-v2 --json"),
    "prepare": Command(
        "tokenize a corpus into packed (or NSP pair) memmap shards with a manifest",
        "bertforge.data.prepare_cli:add_prepare_arguments", "bertforge.data.prepare_cli:run_prepare",
        "  bertforge prepare corpus/ --tokenizer tok/ --output data/shards\n"
        "  bertforge prepare wiki.txt.gz books.jsonl --text-field body --tokenizer tok/ --output data/nsp --mode nsp"),
    "pretrain": Command(
        "pretrain a BERT with MLM (NSP optional) on prepared shards; resumable, DDP via torchrun",
        "bertforge.workflows.pretrain_cli:add_pretrain_arguments", "bertforge.workflows.pretrain_cli:run_pretrain",
        "  bertforge pretrain --config configs/tiny-smoke.yaml --data data/shards --output runs/smoke\n"
        "  bertforge pretrain --config configs/cpu-budget.yaml --data data/shards --output runs/cpu --time-budget 1h\n"
        "  bertforge pretrain --config configs/cpu-budget.yaml --data data/shards --output runs/cpu --resume\n"
        "  bertforge pretrain --data data/shards --output runs/lamb optim.optimizer=lamb optim.lr=2e-3 train.max_steps=2000\n"
        "  torchrun --nproc_per_node 2 -m bertforge pretrain --config configs/gpu-budget.yaml --data d --output runs/gpu"),
    "sanity": Command(
        "can this setup overfit one batch? pass/fail with hints (learning rate, masking, labels)",
        "bertforge.workflows.pretrain_cli:add_sanity_arguments", "bertforge.workflows.pretrain_cli:run_sanity",
        "  bertforge sanity --data data/shards\n"
        "  bertforge sanity --config configs/cpu-budget.yaml --data data/shards optim.lr=1.0   # fails, says why"),
    "plan": Command(
        "estimate training memory (weights, gradients, optimizer, activations) and which devices it fits",
        "bertforge.plan:add_plan_arguments", "bertforge.plan:run_plan",
        "  bertforge plan --preset base --batch 32 --seq 128 --precision bf16\n"
        "  bertforge plan --preset large --batch 8 --seq 512 --gradient-checkpointing --offload --device-gb 24"),
    "inspect": Command(
        "a model's predictions at masked positions, right/wrong, in the terminal or as HTML",
        "bertforge.inspect_mlm:add_inspect_arguments", "bertforge.inspect_mlm:run_inspect",
        "  bertforge inspect runs/cpu-budget --data data/shards --html view.html\n"
        '  bertforge inspect runs/cpu-budget/model --text "The cat sat on the mat."'),
    "report": Command(
        "plot and compare runs: loss, accuracy and LR curves (PNG), markdown/CSV tables",
        "bertforge.report:add_report_arguments", "bertforge.report:run_report",
        "  bertforge report runs/adamw runs/lamb runs/adafactor --out report"),
    "finetune": Command(ft.FINETUNE_HELP, ft.add_finetune_arguments, ft.run_finetune, ft.FINETUNE_EXAMPLES),
    "evaluate": Command(ft.EVALUATE_HELP, ft.add_evaluate_arguments, ft.run_evaluate, ft.EVALUATE_EXAMPLES),
    "predict": Command(ft.PREDICT_HELP, ft.add_predict_arguments, ft.run_predict, ft.PREDICT_EXAMPLES),
    "sentence-train": Command(st.SENTENCE_HELP, st.add_sentence_train_arguments, st.run_sentence_train,
                              st.SENTENCE_EXAMPLES),
    "sts-eval": Command(st.STS_HELP, st.add_sts_eval_arguments, st.run_sts_eval, st.STS_EXAMPLES),
    "distill": Command(st.DISTILL_HELP, st.add_distill_arguments, st.run_distill, st.DISTILL_EXAMPLES),
    "serve": Command(
        "serve models over HTTP: OpenAI-compatible embeddings, similarity, fill-mask, classify, QA, a web page",
        "bertforge.serve.command:add_serve_arguments", "bertforge.serve.command:run_serve",
        "  bertforge serve path/to/all-MiniLM-L6-v2                 # http://127.0.0.1:8000/\n"
        "  bertforge serve minilm=path/to/all-MiniLM-L6-v2 mlm=bertforge-quickstart/model --port 8080\n"
        "  BERTFORGE_API_KEY=s3cret bertforge serve MODEL --host 0.0.0.0 --cors-origin https://app.example"),
}


def selected_command(argv: list[str] | None) -> str | None:
    """The COMMANDS key that argv runs ("tokenizer train", "pretrain"), or None."""
    if not argv:
        return None
    if len(argv) > 1 and f"{argv[0]} {argv[1]}" in COMMANDS:
        return f"{argv[0]} {argv[1]}"
    return argv[0] if argv[0] in COMMANDS else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the command it selects gets its arguments (and imports)."""
    selected = selected_command(argv)
    parser = argparse.ArgumentParser(
        prog="bertforge", formatter_class=HelpFormatter,
        description="Train BERT encoders from scratch and put them to work.",
        epilog="start here:\n  bertforge quickstart\n\nrun `bertforge COMMAND --help` for a command's "
               "options and examples.")
    parser.add_argument("--version", action="version", version=f"bertforge {__version__}")
    top = parser.add_subparsers(title="commands", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, cmd in COMMANDS.items():
        *group, leaf = name.split(" ")
        subparsers = top
        if group:
            subparsers = groups.get(group[0]) or _add_group(top, group[0], groups)
        p = subparsers.add_parser(leaf, help=cmd.help, description=cmd.help,
                                  formatter_class=HelpFormatter,
                                  epilog=f"examples:\n{cmd.examples}" if cmd.examples else None)
        if argv is None or name == selected:
            resolve(cmd.add_arguments)(p)
        p.set_defaults(run=cmd.run)
    return parser


def _add_group(top: argparse._SubParsersAction, name: str,
               groups: dict[str, argparse._SubParsersAction]) -> argparse._SubParsersAction:
    help_text = GROUPS.get(name, name)
    gp = top.add_parser(name, help=help_text, description=help_text,
                        formatter_class=HelpFormatter)
    gp.set_defaults(run=None, group_parser=gp)
    groups[name] = gp.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    return groups[name]


def under_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def main(argv: list[str | os.PathLike] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 usage or input error, 130 interrupted).

    Under torchrun the process ends here with os._exit once its output is flushed: the run's files are
    written and closed, and skipping interpreter teardown avoids the gloo/NCCL threads' exit-time aborts."""
    code = _main(argv)
    if under_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str | os.PathLike] | None) -> int:
    argv = sys.argv[1:] if argv is None else [os.fspath(a) for a in argv]
    parser = build_parser(argv)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # dotted overrides may stand anywhere (argparse collects positionals in one run only)
            if not (hasattr(args, "overrides") and all(OVERRIDE.match(x) for x in extra)):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = [*args.overrides, *extra]
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    if getattr(args, "run", None) is None:
        (getattr(args, "group_parser", None) or parser).print_help(sys.stderr)
        return EXIT_USAGE
    name = selected_command(argv)
    if under_torchrun() and name not in TORCHRUN_COMMANDS:
        return _fail(f"{name} runs in one process but torchrun started {os.environ['WORLD_SIZE']} (N copies would "
                     f"write one folder): run plain `bertforge {name}`; torchrun is for "
                     f"{' and '.join(TORCHRUN_COMMANDS)}")
    try:
        return resolve(args.run)(args)
    except BertforgeError as exc:
        return _fail(str(exc))
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        return _fail(f"cannot read '{exc.filename}' ({exc.strerror}): check the path and its permissions")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return _fail(f"no space left on the device writing '{exc.filename or 'the output'}': free some space or "
                         "write elsewhere; completed checkpoints are intact (continue with --resume)")
        if exc.errno == errno.EDQUOT:
            return _fail(f"disk quota exceeded writing '{exc.filename or 'the output'}': free some space or write "
                         "elsewhere")
        raise
    except UnicodeDecodeError as exc:
        return _fail(f"an input is not UTF-8 text ({exc.reason} at byte {exc.start}): convert it to UTF-8")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _fail(message: str) -> int:
    print("error: " + " ".join(line.strip() for line in message.strip().splitlines()), file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
