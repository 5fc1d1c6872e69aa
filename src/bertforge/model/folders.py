"""Opening a model folder for use: the folder checks every command makes first (missing, a file, no
config), a tokenizer that fits the model, `load_checked` (any head, as `bertforge info` and the API load)
and `load_encoder` (a `SentenceEncoder` with its tokenizer, for embedding and sentence training)."""

from __future__ import annotations

import os
from pathlib import Path

from bertforge.errors import BertforgeError
from bertforge.model.loading import load_model
from bertforge.model.pooling import SentenceEncoder
from bertforge.wordpiece import WordPieceTokenizer

MODEL_HINT = "pass a folder written by `bertforge quickstart`/`bertforge convert` or a Hugging Face BERT folder"


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """The model folder as a Path; raises when it is missing, a file, or holds no model config
    (config.json, or modules.json for sentence-transformers)."""
    path = Path(model_dir)
    if not path.exists():
        raise BertforgeError(f"model path '{model_dir}' does not exist: {MODEL_HINT}")
    if not path.is_dir():
        raise BertforgeError(f"model path '{model_dir}' is a file, not a model folder: {MODEL_HINT}")
    if not ((path / "config.json").is_file() or (path / "modules.json").is_file()):
        raise BertforgeError(f"'{model_dir}' is not a model folder (it has no config.json or modules.json): "
                             f"{MODEL_HINT}")
    return path


def check_tokenizer_fits(tokenizer, config, model_dir) -> None:
    """A tokenizer with more ids than the model's embedding rows belongs to another model."""
    if tokenizer is None:
        raise BertforgeError(f"model '{model_dir}' has no tokenizer (vocab.txt or tokenizer.json): copy the "
                             "tokenizer files saved with this model into the folder")
    if tokenizer.vocab_size > config.vocab_size:
        raise BertforgeError(
            f"the tokenizer in '{model_dir}' has {tokenizer.vocab_size:,} tokens but the model config has "
            f"vocab_size {config.vocab_size:,}: the vocabulary belongs to another model; put back the "
            "tokenizer files saved with this model")


def load_checked(model_dir, head: str | None = None):
    """`load_model` after the folder checks, with a tokenizer that fits the model (a `LoadedModel`)."""
    check_model_dir(model_dir)
    loaded = load_model(model_dir, head)
    check_tokenizer_fits(loaded.tokenizer, loaded.config, model_dir)
    return loaded


def load_encoder(model_dir):
    """(SentenceEncoder, tokenizer) for a model folder of any supported format."""
    check_model_dir(model_dir)
    encoder = SentenceEncoder.from_pretrained(model_dir).eval()
    tokenizer = WordPieceTokenizer.from_pretrained(model_dir)
    check_tokenizer_fits(tokenizer, encoder.bert.config, model_dir)
    return encoder, tokenizer
