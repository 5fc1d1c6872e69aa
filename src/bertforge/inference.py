"""The work behind the inference CLI commands: fill-mask, similarity, embed, info, convert, tokenizer train.

Each function takes paths and plain values, checks its inputs up front and raises `BertforgeError`
with one line naming the bad input and the fix (missing path, not a model folder, a tokenizer that
does not fit the model, empty or binary input files). Models load through `model.loading` (our
format, Hugging Face BERT, sentence-transformers); sentence embeddings through `SentenceEncoder`.
Output files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bertforge.atomic import atomic_open
from bertforge.errors import BertforgeError
from bertforge.model.export import uses_remote_code, write_transformers_folder
from bertforge.model.folders import (
    check_model_dir,
    load_checked,
    load_encoder,
)
from bertforge.model.loading import export_hf, save_model, write_atomic
from bertforge.model.onnx_export import ONNX_NAME, export_onnx

MLM_HEADS = ("masked_lm", "pretraining")
EMBEDDING_FORMATS = (".npy", ".jsonl", ".csv")
CONVERT_TARGETS = ("hf", "sentence-transformers", "onnx", "bertforge")
HIDDEN_META = ("modules", "pooling_config", "pooling", "normalize", "max_seq_length", "discarded")


# ----------------------------------------------------------------------------- fill-mask


def fill_mask(model_dir, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] in `text`, left to right, the `top_k` (token, probability) pairs, most likely first."""
    if top_k < 1:
        raise BertforgeError(f"top_k {top_k} must be at least 1: pass --top-k 1 or more")
    loaded = load_checked(model_dir)
    tok = loaded.tokenizer
    if loaded.head not in MLM_HEADS:
        kind = "a bare encoder (BertModel)" if loaded.head == "base" else f"a '{loaded.head}' model"
        raise BertforgeError(
            f"model '{model_dir}' has no masked-LM head (it is {kind}): fill-mask needs a model with an MLM "
            "head, e.g. the one `bertforge quickstart` writes or a Hugging Face BertForMaskedLM such as "
            "bert-base-uncased")
    mask_token = tok.convert_ids_to_tokens([tok.mask_token_id])[0]
    limit = loaded.config.max_position_embeddings
    try:
        enc = tok.encode(text, max_length=limit, truncation=False)
    except BertforgeError:
        raise BertforgeError(f"the text is longer than the model's {limit} positions: shorten it") from None
    positions = [i for i, t in enumerate(enc.input_ids) if t == tok.mask_token_id]
    if not positions:
        raise BertforgeError(f"text {text!r} has no {mask_token} token: put {mask_token} where a word "
                             f"should be predicted, e.g. \"the {mask_token} of the module\"")
    ids = torch.tensor([enc.input_ids])  # (1, T)
    with torch.inference_mode():
        out = loaded.model(ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    logits = out.logits[0, positions, : tok.vocab_size].float()  # (M, V): padded vocab rows are no tokens
    probs, idx = logits.softmax(-1).topk(min(top_k, tok.vocab_size), dim=-1)  # (M, k)
    return [list(zip(tok.convert_ids_to_tokens(row_ids), row_probs))
            for row_ids, row_probs in zip(idx.tolist(), probs.tolist())]


# ----------------------------------------------------------------------------- similarity / embed


def similarity(model_dir, a: str, b: str) -> float:
    """Cosine similarity of the sentence embeddings of `a` and `b`."""
    encoder, tokenizer = load_encoder(model_dir)
    emb = encoder.encode([a, b], tokenizer).float()  # (2, H)
    return float(torch.nn.functional.cosine_similarity(emb[0:1], emb[1:2]).item())


def read_texts(path, text_field: str = "text") -> list[str]:
    """One text per line of a UTF-8 file, or the `text_field` of each record of a .jsonl file."""
    raw = _read_input_bytes(path)
    if b"\x00" in raw[:65536]:
        raise BertforgeError(f"input '{path}' looks binary (it contains NUL bytes): pass a UTF-8 text file "
                             "with one text per line, or .jsonl")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BertforgeError(f"input '{path}' is not UTF-8 text (invalid byte at offset {exc.start}): "
                             "convert it to UTF-8") from None
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise BertforgeError(f"input '{path}' is empty: write one text per line")
    if str(path).endswith(".jsonl"):
        return [_record_text(line, path, n, text_field) for n, line in enumerate(lines, 1) if line.strip()]
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise BertforgeError(f"input '{path}' line {n} is blank: remove blank lines (row i of the output "
                                 "is line i of the input)")
    return lines


def _read_input_bytes(path) -> bytes:
    p = Path(path)
    if not p.exists():
        raise BertforgeError(f"input '{path}' does not exist: pass an existing text or .jsonl file")
    if p.is_dir():
        raise BertforgeError(f"input '{path}' is a folder: pass a text or .jsonl file")
    try:
        return p.read_bytes()
    except PermissionError:
        raise BertforgeError(f"input '{path}' is not readable (permission denied): fix its permissions") from None


def _record_text(line: str, path, lineno: int, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BertforgeError(f"input '{path}' line {lineno} is not valid JSON ({exc.msg}): write one JSON "
                             "object per line") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise BertforgeError(f"input '{path}' line {lineno} has no text field {field!r}: pass --text-field "
                             "naming the field that holds the text")
    return record[field]


def embed(model_dir, input_file, output_file, batch_size: int = 64, *, text_field: str = "text",
          max_seq_length: int | None = None) -> dict:
    """Embed every text of `input_file` and write an N x H matrix to `output_file` (.npy/.jsonl/.csv)."""
    suffix = Path(output_file).suffix.lower()
    if suffix not in EMBEDDING_FORMATS:
        raise BertforgeError(f"output '{output_file}' has an unknown extension: use one of "
                             f"{', '.join(EMBEDDING_FORMATS)}")
    if not Path(output_file).resolve().parent.is_dir():
        raise BertforgeError(f"the folder of output '{output_file}' does not exist: create it first")
    if batch_size < 1:
        raise BertforgeError(f"batch size {batch_size} must be at least 1: pass --batch-size 1 or more")
    texts = read_texts(input_file, text_field)
    encoder, tokenizer = load_encoder(model_dir)
    limit = max_seq_length or encoder.max_seq_length
    start = time.perf_counter()
    emb = encoder.encode(texts, tokenizer, batch_size=batch_size, max_seq_length=max_seq_length)
    seconds = time.perf_counter() - start
    lengths = [len(e.ids) for e in tokenizer.backend.encode_batch_fast(texts)]  # untruncated, with specials
    array = emb.float().cpu().numpy()  # (N, H)
    write_embeddings(array, texts, output_file)
    return {"count": len(texts), "dim": array.shape[1], "output": str(output_file), "seconds": seconds,
            "max_seq_length": limit, "truncated": sum(n > limit for n in lengths)}


def write_embeddings(array: np.ndarray, texts: list[str], output_file) -> None:
    """Write (N, H) embeddings atomically; the format follows the extension."""
    suffix = Path(output_file).suffix.lower()
    with atomic_open(output_file) as fh:
        if suffix == ".npy":
            np.save(fh, array.astype(np.float32))
            return
        with open(fh.fileno(), "w", encoding="utf-8", newline="", closefd=False) as out:
            if suffix == ".jsonl":
                for text, row in zip(texts, array.tolist()):
                    out.write(json.dumps({"text": text, "embedding": row}) + "\n")
            else:
                csv.writer(out).writerows([format(x, ".9g") for x in row] for row in array.tolist())


# ----------------------------------------------------------------------------- info / convert


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, non-embedding) parameter counts; tied weights count once."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    return total, total - embedding


def model_info(model_dir) -> dict:
    """Format, head, parameter counts, config and tokenizer of a model folder."""
    return describe(load_checked(model_dir), model_dir)


def describe(loaded, model_dir) -> dict:
    """`model_info` of an already loaded model (a `LoadedModel`)."""
    total, non_embedding = count_parameters(loaded.model)
    tok = loaded.tokenizer
    return {
        "path": str(model_dir), "source": loaded.source, "head": loaded.head,
        "parameters": {"total": total, "non_embedding": non_embedding},
        "config": loaded.config.to_dict(),
        "tokenizer": {"vocab_size": tok.vocab_size, "do_lower_case": tok.do_lower_case,
                      "strip_accents": tok.strip_accents, "fingerprint": tok.fingerprint()},
        "meta": _jsonable(loaded.meta),
    }


def format_model_info(info: dict) -> str:
    """A short human-readable table of `model_info`."""
    c, p, t = info["config"], info["parameters"], info["tokenizer"]
    switches = f"{c['norm_position']}-LN, {c['ffn']} feed-forward, bias {'on' if c['bias'] else 'off'}"
    rows = [
        ("model", info["path"]),
        ("format", f"{info['source']}, head {info['head']}"),
        ("parameters", f"{p['total']:,} total, {p['non_embedding']:,} non-embedding"),
        ("shape", f"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
                  f"{c['num_attention_heads']} heads, intermediate {c['intermediate_size']}"),
        ("switches", switches),
        ("vocabulary", f"{t['vocab_size']:,} tokens in the tokenizer, {c['vocab_size']:,} embedding rows"),
        ("tokenizer", f"lowercase {t['do_lower_case']}, fingerprint {t['fingerprint'][:12]}"),
        ("positions", f"{c['max_position_embeddings']}"),
    ]
    meta = info["meta"]
    if "pooling" in meta:
        rows.append(("embeddings", f"{meta['pooling']} pooling, normalize {meta.get('normalize')}, "
                                   f"max_seq_length {meta.get('max_seq_length')}"))
    notes = {k: v for k, v in meta.items() if k not in HIDDEN_META and v not in (None, [], {})}
    if notes:
        rows.append(("meta", ", ".join(f"{k}={v}" for k, v in notes.items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def convert(source, dest, *, to: str, overwrite: bool = False) -> dict:
    """Write the model in `source` to the new folder `dest` in format `to` (see CONVERT_TARGETS).

    hf / bertforge: a transformers folder (plain HF BERT for BERT architectures, our modeling file for
    the others; bertforge also keeps the run metadata). sentence-transformers: the encoder with its
    pooling. onnx: model.onnx (dynamic batch and sequence axes) beside config.json and the tokenizer;
    a sentence model (sentence-transformers folder, or pooling in its metadata) also outputs
    `sentence_embedding`.
    """

    if to not in CONVERT_TARGETS:
        raise BertforgeError(f"conversion target '{to}' is unknown: use one of {', '.join(CONVERT_TARGETS)}")
    check_model_dir(source)
    dest_path = Path(dest)
    if dest_path.resolve() == Path(source).resolve():
        raise BertforgeError(f"destination '{dest}' is the source folder: pass a new folder")
    if dest_path.exists() and (not dest_path.is_dir() or any(dest_path.iterdir())) and not overwrite:
        raise BertforgeError(f"destination '{dest}' already exists and is not empty: pass a new folder or "
                             "--overwrite")
    loaded = load_checked(source)
    info = {"source_format": loaded.source, "head": loaded.head, "to": to, "dest": str(dest),
            "remote_code": uses_remote_code(loaded.config) and to != "onnx"}
    if to == "bertforge":
        save_model(loaded.model, dest, tokenizer=loaded.tokenizer, meta=loaded.meta)
    elif to == "hf":
        export_hf(loaded.model, dest, tokenizer=loaded.tokenizer, id2label=loaded.meta.get("id2label"),
                  remote_code=True)
    elif to == "sentence-transformers":
        encoder, tokenizer = load_encoder(source)
        encoder.save_sentence_transformers(dest, tokenizer)
    else:
        info.update(_convert_onnx(source, loaded, dest_path))
    return info


def _convert_onnx(source, loaded, dest: Path) -> dict:
    """model.onnx + config.json (+ modeling file) + tokenizer; a sentence model exports its pooling."""

    sentence = loaded.head == "base" and "pooling" in loaded.meta
    encoder = load_encoder(source)[0] if sentence else None
    model = encoder.bert if sentence else loaded.model
    head = "sentence" if sentence else loaded.head
    result: dict = {}
    meta = {k: v for k, v in _jsonable(loaded.meta).items() if k not in ("num_labels", "id2label", "discarded")}

    def write(tmp: Path) -> None:
        result.update(export_onnx(model, head, tmp, pooling=encoder.pooling if sentence else None,
                                  normalize=bool(encoder.normalize) if sentence else False))
        extra = {"pooling": encoder.pooling, "normalize": encoder.normalize,
                 "max_seq_length": encoder.max_seq_length} if sentence else {}
        write_transformers_folder(model, "base" if sentence else head, tmp, tokenizer=loaded.tokenizer,
                                  num_labels=loaded.meta.get("num_labels"), id2label=loaded.meta.get("id2label"),
                                  meta={**meta, **extra, "onnx": dict(result)}, weights=False)

    write_atomic(dest, write)
    return {"onnx": str(dest / ONNX_NAME), "outputs": result["outputs"]}


# ----------------------------------------------------------------------------- tokenizer train
