"""The `bertforge` command line: the table of commands and `main`. Nothing else lives here.

`COMMANDS` maps a command name to `Command(help, add_arguments, run, examples)`, where `add_arguments`
and `run` name functions in `bertforge.commands.*` ("module:function"), imported only for the command
being run. A name with a space (`"tokenizer train"`) is a subcommand of a group (`GROUPS` holds the
group's help). To add a command, write its two small functions in a `commands/` module and add one row;
`build_parser` does the rest.

Every runner imports the module that does the work inside the function (so `bertforge --help` starts
without importing torch) and prints its result. `main` turns user errors
(`BertforgeError`, and unreadable files) into one `error: ...` line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import NamedTuple

from bertforge import __version__
from bertforge.errors import BertforgeError
from bertforge.launch import launched_by_torchrun

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


def command(help: str, ref: str, examples: str = "") -> Command:
    """A row whose functions are `add_NAME_arguments` and `run_NAME` in `bertforge.commands.MODULE`,
    given as "MODULE:NAME" (e.g. "models:fill_mask")."""
    module, _, name = ref.partition(":")
    where = f"bertforge.commands.{module}"
    return Command(help, f"{where}:add_{name}_arguments", f"{where}:run_{name}", examples)


def resolve(ref):
    """A callable, or "package.module:function" imported now."""
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------- the table

FINETUNE_HELP = "fine-tune a model on a GLUE / NLI, SQuAD or multiple-choice task"

FINETUNE_EXAMPLES = """\
  bertforge finetune --task rte --model path/to/all-MiniLM-L6-v2 --data glue/RTE --output runs/rte
  bertforge finetune --task sst2 --model runs/pretrain/model --data hub:glue/sst2 --protocol glue-sane --seeds 5
  bertforge finetune --task squad --model MODEL --data squad/ --output runs/squad --batch-size 16
  bertforge finetune --task winogrande --model MODEL --data winogrande/ data.dev_from_train=1000 --epochs 2"""

EVALUATE_HELP = ("score a fine-tuned model on labelled data with the task's official metrics, or a masked-LM "
                 "model on held-out text (--task mlm)")

EVALUATE_EXAMPLES = """\
  bertforge evaluate --task mlm --model runs/cpu-budget/model --data heldout/ wiki.txt.gz
  bertforge evaluate --task mlm --model runs/cpu-budget/model --data data/shards        # its val split
  bertforge evaluate --model runs/rte/model --data glue/RTE
  bertforge evaluate --model runs/mnli/model --data glue/MNLI --output eval/mnli
  bertforge evaluate --model runs/squad/model --data squad/dev-v1.1.json"""

PREDICT_HELP = "write a fine-tuned model's predictions for a file (labelled or not)"

PREDICT_EXAMPLES = """\
  bertforge predict --model runs/rte/model --data glue/RTE/test.tsv --output preds/rte
  bertforge predict --model runs/squad/model --data squad/dev-v1.1.json --output preds/squad"""

SENTENCE_HELP = "train a sentence-embedding model (Sentence-BERT) on NLI or scored pairs"

SENTENCE_EXAMPLES = """\
  bertforge sentence-train --model path/to/bert --train snli/dev_full.tsv --loss mnrl --dev stsb/dev.tsv
  bertforge sentence-train --model MODEL --train sick/SICK_train.txt --loss softmax --epochs 2
  bertforge sentence-train --model MODEL --train stsb/train.tsv --loss cosent --dev stsb/dev.tsv \\
      --calibrate mrpc/dev.tsv --calibrate-task mrpc --output runs/sbert"""

STS_HELP = "zero-shot STS: Spearman / Pearson (x100) of cosine similarity vs gold scores"

STS_EXAMPLES = """\
  bertforge sts-eval --model path/to/all-MiniLM-L6-v2 --data stsb/dev.tsv
  bertforge sts-eval --model runs/sbert/model --data sick/SICK_trial.txt --json"""

DISTILL_HELP = "distil a fine-tuned (or MLM) teacher into a smaller student: score kept and speed-up"

DISTILL_EXAMPLES = """\
  bertforge distill --teacher runs/sst2/model --data glue/SST-2 --task sst2 --output runs/distill
  bertforge distill --teacher runs/sst2/model --data glue/SST-2 --student-preset mini --no-init-from-teacher
  bertforge distill --teacher runs/pretrain/model --data data/shards --mlm --max-steps 2000 loss.hidden_weight=1"""


GROUPS: dict[str, str] = {
    "tokenizer": "WordPiece vocabularies: train",
}

COMMANDS: dict[str, Command] = {
    "quickstart": command(
        "train a vocabulary, build a BERT and run it end to end (no network, no data needed)", "quickstart:quickstart",
        "  bertforge quickstart\n"
        "  bertforge quickstart --out qs --max-mb 4 --vocab-size 16384\n"
        "  bertforge quickstart --corpus my_texts/ notes.txt.gz --preset tiny"),
    "tokenizer train": command(
        "train a WordPiece vocabulary on text files, folders or .gz", "tokenizer:tokenizer_train",
        "  bertforge tokenizer train corpus.txt --out tok --vocab-size 8192\n"
        "  bertforge tokenizer train data/ wiki.txt.gz --out tok --no-lowercase"),
    "fill-mask": command(
        "predict the tokens behind [MASK] with a masked-LM model", "models:fill_mask",
        '  bertforge fill-mask bertforge-quickstart/model "the [MASK] of the module"\n'
        '  bertforge fill-mask path/to/bert-base-uncased "paris is the [MASK] of france." --top-k 3'),
    "embed": command(
        "write sentence embeddings of a file of texts (.npy, .jsonl or .csv)", "models:embed",
        "  bertforge embed path/to/all-MiniLM-L6-v2 --input sentences.txt --output emb.npy\n"
        "  bertforge embed MODEL --input docs.jsonl --text-field body --output emb.jsonl"),
    "similarity": command(
        "cosine similarity of two texts' sentence embeddings", "models:similarity",
        '  bertforge similarity path/to/all-MiniLM-L6-v2 "A man is eating." "Someone eats food."'),
    "convert": command(
        "export a model to transformers, sentence-transformers or ONNX (every architecture)", "models:convert",
        "  bertforge convert bertforge-quickstart/model hf-out --to hf\n"
        "  bertforge convert runs/cpu-budget/model st-out --to sentence-transformers\n"
        "  bertforge convert runs/cpu-budget/model onnx-out --to onnx\n"
        "  bertforge convert path/to/hf-bert ours --to bertforge"),
    "info": command(
        "show a model's format, head, parameter counts, config and tokenizer", "models:info",
        "  bertforge info bertforge-quickstart/model\n"
        "  bertforge info path/to/all-MiniLM-L6-v2 --json"),
    "prepare": command(
        "tokenize a corpus into packed (or NSP pair) memmap shards with a manifest", "prepare:prepare",
        "  bertforge prepare corpus/ --tokenizer tok/ --output data/shards\n"
        "  bertforge prepare wiki.txt.gz books.jsonl --text-field body --tokenizer tok/ --output data/nsp --mode nsp"),
    "pretrain": command(
        "pretrain a BERT with MLM (NSP optional) on prepared shards; resumable, DDP via torchrun", "pretrain:pretrain",
        "  bertforge pretrain --config configs/tiny-smoke.yaml --data data/shards --output runs/smoke\n"
        "  bertforge pretrain --config configs/cpu-budget.yaml --data data/shards --output runs/cpu --time-budget 1h\n"
        "  bertforge pretrain --config configs/cpu-budget.yaml --data data/shards --output runs/cpu --resume\n"
        "  bertforge pretrain --data data/shards --output runs/lamb optim.optimizer=lamb optim.lr=2e-3 train.max_steps=2000\n"
        "  torchrun --nproc_per_node 2 -m bertforge pretrain --config configs/gpu-budget.yaml --data d --output runs/gpu"),
    "sanity": command(
        "can this setup overfit one batch? pass/fail with hints (learning rate, masking, labels)", "pretrain:sanity",
        "  bertforge sanity --data data/shards\n"
        "  bertforge sanity --config configs/cpu-budget.yaml --data data/shards optim.lr=1.0   # fails, says why"),
    "plan": command(
        "estimate training memory (weights, gradients, optimizer, activations) and which devices it fits", "analysis:plan",
        "  bertforge plan --preset base --batch 32 --seq 128 --precision bf16\n"
        "  bertforge plan --preset large --batch 8 --seq 512 --gradient-checkpointing --offload --device-gb 24"),
    "inspect": command(
        "a model's predictions at masked positions, right/wrong, in the terminal or as HTML", "analysis:inspect",
        "  bertforge inspect runs/cpu-budget --data data/shards --html view.html\n"
        '  bertforge inspect runs/cpu-budget/model --text "The cat sat on the mat."'),
    "report": command(
        "plot and compare runs: loss, accuracy and LR curves (PNG), markdown/CSV tables", "analysis:report",
        "  bertforge report runs/adamw runs/lamb runs/adafactor --out report"),
    "finetune": command(FINETUNE_HELP, "finetune:finetune", FINETUNE_EXAMPLES),
    "evaluate": command(EVALUATE_HELP, "finetune:evaluate", EVALUATE_EXAMPLES),
    "predict": command(PREDICT_HELP, "finetune:predict", PREDICT_EXAMPLES),
    "sentence-train": command(SENTENCE_HELP, "sentence:sentence_train", SENTENCE_EXAMPLES),
    "sts-eval": command(STS_HELP, "sentence:sts_eval", STS_EXAMPLES),
    "distill": command(DISTILL_HELP, "sentence:distill", DISTILL_EXAMPLES),
    "serve": command(
        "serve models over HTTP: OpenAI-compatible embeddings, similarity, fill-mask, classify, QA, a web page", "serve:serve",
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


def main(argv: list[str | os.PathLike] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 usage or input error, 130 interrupted).

    Under torchrun the process ends here with os._exit once its output is flushed: the run's files are
    written and closed, and skipping interpreter teardown avoids the gloo/NCCL threads' exit-time aborts."""
    code = _main(argv)
    if launched_by_torchrun():
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
    if launched_by_torchrun() and name not in TORCHRUN_COMMANDS:
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
