"""The commands that use a model folder directly: `fill-mask`, `similarity`, `embed`, `convert`, `info`."""

from __future__ import annotations

import argparse
import json
import sys

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
