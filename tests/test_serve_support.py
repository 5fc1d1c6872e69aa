"""Tiny models for the API and server tests, built in-process (no ../shared needed); the `paths` and
`models` fixtures in conftest.py hold them.

`tiny_models(root)` trains a WordPiece vocabulary on a few sentences and saves random tiny models of
every head the server uses: an MLM ("mlm"), a sentence model in the sentence-transformers layout
("st"), a 3-label classifier ("cls"), a regression model ("reg") and a SQuAD model ("qa").
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXTS = ["A man is playing a guitar.", "The cat sat on the mat.", "the children played near the bridge " * 12,
         "A woman is slicing an onion."]

CORPUS = [
    "The baker carried fresh bread across the old stone bridge to the market square.",
    "A small boat carried the travellers across the lake before the storm reached the hills.",
    "The children played near the bridge while their parents talked about the harvest and the weather.",
    "In the evening the market closes, the lamps are lit, and the square becomes quiet again.",
    "A man is playing a guitar. A woman is slicing an onion. The cat sat on the mat.",
] * 4
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def tiny_models(root: Path) -> dict[str, Path]:
    from bertforge.data.corpus import CorpusLines
    from bertforge.model.bert import BertConfig, BertModel, pad_vocab_size
    from bertforge.model.heads import build_model
    from bertforge.model.loading import save_model
    from bertforge.model.pooling import SentenceEncoder
    from bertforge.wordpiece import train_wordpiece

    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    tok = train_wordpiece(CorpusLines(corpus), vocab_size=300, min_frequency=1, show_progress=False)
    config = BertConfig.from_preset("tiny", vocab_size=pad_vocab_size(tok.vocab_size), max_position_embeddings=64)
    paths = {}
    for name, head, labels in (("mlm", "masked_lm", None), ("cls", "sequence_classification", 3),
                               ("reg", "sequence_classification", 1), ("qa", "question_answering", None)):
        torch.manual_seed(len(paths))
        meta = {"id2label": LABELS} if labels == 3 else {}
        if name == "qa":
            meta["settings"] = {"max_seq_length": 32, "doc_stride": 8, "max_query_length": 8}
        save_model(build_model(head, config, labels).eval(), root / name, tokenizer=tok, meta=meta)
        paths[name] = root / name
    torch.manual_seed(9)
    SentenceEncoder(BertModel(config).eval(), "mean", True, 48).save_sentence_transformers(root / "st", tok)
    paths["st"] = root / "st"
    return paths

