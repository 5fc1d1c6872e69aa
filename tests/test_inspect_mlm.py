"""Masked-prediction view: records agree with the model's arg-max, renderers agree with the records,
an oracle head scores 100%, and the `inspect` command runs on a text and on prepared validation rows."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bertforge.commands.analysis import add_inspect_arguments, run_inspect
from bertforge.errors import BertforgeError
from bertforge.inspect_mlm import (
    masked_predictions,
    render_html,
    render_terminal,
)
from bertforge.model.bert import BertConfig, pad_vocab_size
from bertforge.model.heads import BertForMaskedLM, BertForSequenceClassification, PreTrainingOutput

CORPUS = [
    "The river flows through the old town and past the stone bridge near the market square.",
    "Every morning the baker opens his shop and sells fresh bread to the people of the town.",
    "A small boat carried the travellers across the lake before the storm reached the hills.",
    "The children played near the bridge while their parents talked about the harvest and the weather.",
    "In the evening the market closes, the lamps are lit, and the square becomes quiet again.",
] * 4
PASSAGE = ("The baker carried fresh bread across the old stone bridge to the market square, where the "
           "children played and their parents talked about the weather and the coming harvest.")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from bertforge.data.corpus import CorpusLines
    from bertforge.wordpiece import train_wordpiece

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    return train_wordpiece(CorpusLines(path), vocab_size=300, min_frequency=1, show_progress=False)


def tiny_mlm(tokenizer, seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig.from_preset("tiny", vocab_size=pad_vocab_size(tokenizer.vocab_size))).eval()


class OracleMLM(nn.Module):
    """Returns one-hot logits of fixed gold ids (B, T, V): an MLM head that always predicts the original."""

    def __init__(self, gold: list[int], vocab_size: int):
        super().__init__()
        self.register_buffer("gold", torch.tensor([gold]))
        self.vocab_size = vocab_size

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        assert labels is None and input_ids.shape == self.gold.shape
        return PreTrainingOutput(logits=F.one_hot(self.gold, self.vocab_size).float() * 20.0)


def test_records_follow_the_models_argmax(tokenizer):
    model = tiny_mlm(tokenizer)
    records = masked_predictions(model, tokenizer, PASSAGE, mask_rate=0.3, seed=3, top_k=4)
    gold_ids = tokenizer.encode(PASSAGE).input_ids
    assert [r.token for r in records] == tokenizer.convert_ids_to_tokens(gold_ids)
    masked = [r for r in records if r.masked]
    assert len(masked) == round(0.3 * sum(not r.special for r in records))
    assert not any(r.masked and r.special for r in records)
    # recompute the logits on exactly what the model saw
    shown = torch.tensor([tokenizer.convert_tokens_to_ids([r.shown for r in records])])
    assert all(r.shown == "[MASK]" for r in masked)
    assert all(r.shown == r.token for r in records if not r.masked)
    with torch.no_grad():
        logits = model(shown, torch.ones_like(shown), torch.zeros_like(shown)).logits[0, :, :tokenizer.vocab_size]
    probs = logits.softmax(-1)
    for r in masked:
        best = int(logits[r.position].argmax())
        assert r.correct == (best == gold_ids[r.position])
        assert r.predicted == tokenizer.convert_ids_to_tokens([best])[0]
        assert r.prob == pytest.approx(float(probs[r.position, best]), rel=1e-5)
        assert r.gold == r.token and len(r.top_k) == 4 and r.top_k[0] == (r.predicted, r.prob)
        assert r.gold_prob == pytest.approx(float(probs[r.position, gold_ids[r.position]]), rel=1e-5)


def test_same_seed_same_masks_other_seed_other_masks(tokenizer):
    model = tiny_mlm(tokenizer)
    a = [r.position for r in masked_predictions(model, tokenizer, PASSAGE, 0.3, 1, 3) if r.masked]
    b = [r.position for r in masked_predictions(model, tokenizer, PASSAGE, 0.3, 1, 3) if r.masked]
    c = [r.position for r in masked_predictions(model, tokenizer, PASSAGE, 0.3, 2, 3) if r.masked]
    assert a == b and a != c


def test_html_and_terminal_agree_with_records(tokenizer):
    model = tiny_mlm(tokenizer, seed=1)
    records = masked_predictions(model, tokenizer, PASSAGE, mask_rate=0.4, seed=0, top_k=3)
    correct = sum(bool(r.correct) for r in records if r.masked)
    masked = sum(r.masked for r in records)
    page = render_html(records, "tiny <model>")
    assert page.startswith("<!doctype html>") and "<style>" in page and "tiny &lt;model&gt;" in page
    summary = re.search(r'data-correct="(\d+)" data-masked="(\d+)">Accuracy <b>([\d.]+)%</b>', page)
    assert summary and (int(summary[1]), int(summary[2])) == (correct, masked)
    assert float(summary[3]) == pytest.approx(round(100 * correct / masked, 1))
    assert page.count('class="tok ok"') - 1 == correct  # minus the legend's sample
    assert page.count('class="tok bad"') - 1 == masked - correct
    assert page.count('class="tip"') == masked

    plain = render_terminal(records, color=False)
    coloured = render_terminal(records, color=True)
    assert "\x1b[" not in plain and "\x1b[" in coloured
    assert plain.count("✓]") == correct and plain.count("✗ ") == masked - correct
    assert plain.endswith(f"{correct}/{masked} masked tokens predicted correctly ({correct / masked:.1%})")
    wrong = next(r for r in records if r.masked and not r.correct)
    assert f"{wrong.predicted}✗ {wrong.gold}]".replace("##", "") in plain.replace("##", "")


def test_oracle_head_scores_100_percent(tokenizer):
    gold = tokenizer.encode(PASSAGE).input_ids
    oracle = OracleMLM(gold, pad_vocab_size(tokenizer.vocab_size))
    records = masked_predictions(oracle, tokenizer, PASSAGE, mask_rate=0.5, seed=0, top_k=2,
                                 bert_replacement=True)
    masked = [r for r in records if r.masked]
    assert len(masked) > 10 and all(r.correct for r in masked)
    assert {r.shown for r in masked} - {"[MASK]"}, "80/10/10 keeps or randomises some targets"
    assert "Accuracy <b>100.0%</b>" in render_html(records)
    assert render_terminal(records, color=False).endswith(f"{len(masked)}/{len(masked)} masked tokens "
                                                          "predicted correctly (100.0%)")


def test_real_vocabulary_from_shared_model(shared_data):
    from bertforge.wordpiece import WordPieceTokenizer

    tok = WordPieceTokenizer.from_pretrained(shared_data / "all-MiniLM-L6-v2")
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.from_preset("tiny", vocab_size=pad_vocab_size(tok.vocab_size)))
    text = "The quick brown fox jumps over the lazy dog while the farmer sleeps in the afternoon sun."
    records = masked_predictions(model, tok, text, mask_rate=0.25, seed=0, top_k=5)
    ids = torch.tensor([tok.encode(text).input_ids])
    masked_ids = ids.clone()
    for r in records:
        if r.masked:
            masked_ids[0, r.position] = tok.mask_token_id
    with torch.no_grad():
        argmax = model(masked_ids).logits[0, :, :tok.vocab_size].argmax(-1)
    assert all(r.correct == (int(argmax[r.position]) == int(ids[0, r.position])) for r in records if r.masked)
    assert all(r.predicted in tok.convert_ids_to_tokens(range(tok.vocab_size)) for r in records if r.masked)


def test_bad_inputs_raise_clear_errors(tokenizer):
    model = tiny_mlm(tokenizer)
    with pytest.raises(BertforgeError, match="selects no token"):
        masked_predictions(model, tokenizer, "bread", mask_rate=0.15)
    with pytest.raises(BertforgeError, match="empty"):
        masked_predictions(model, tokenizer, "   ")
    with pytest.raises(BertforgeError, match="top_k"):
        masked_predictions(model, tokenizer, PASSAGE, top_k=0)
    with pytest.raises(BertforgeError, match="max_length"):
        masked_predictions(model, tokenizer, " ".join(["bread"] * 600))
    classifier = BertForSequenceClassification(model.config, 2)
    with pytest.raises(BertforgeError, match="masked-LM head"):
        masked_predictions(classifier, tokenizer, PASSAGE, mask_rate=0.3)


# ----------------------------------------------------------------------------- the inspect command


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_inspect_arguments(p)
    return p.parse_args(list(argv))


def _prepared_dir(path, tokenizer, seq_len: int = 32):
    """A folder in the `bertforge prepare` layout holding two validation rows (the second padded)."""
    ids = tokenizer.encode(PASSAGE, add_special_tokens=False).input_ids
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    rows = np.full((2, seq_len), pad, dtype=np.uint16)
    rows[0] = [cls, *ids[:seq_len - 2], sep]
    rows[1, :12] = [cls, *ids[:10], sep]
    path.mkdir()
    rows.tofile(path / "val_00000.bin")
    manifest = {"format": "bertforge-shards/1", "dtype": "uint16", "seq_len": seq_len, "mode": "packed",
                "tokenizer": {"fingerprint": tokenizer.fingerprint()},
                "shards": [{"file": "val_00000.bin", "split": "val", "rows": 2}]}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return rows


def test_inspect_command_on_text_and_prepared_rows(tokenizer, tmp_path, capsys):
    from bertforge.model.loading import save_model

    save_model(tiny_mlm(tokenizer), tmp_path / "model", tokenizer=tokenizer)
    html_file = tmp_path / "view" / "inspect.html"
    assert run_inspect(_args(str(tmp_path / "model"), "--text", PASSAGE, "--mask-rate", "0.3",
                             "--html", str(html_file), "--color", "always")) == 0
    out = capsys.readouterr().out
    assert "\x1b[" in out and "masked tokens predicted correctly" in out and html_file.is_file()
    assert "Accuracy <b>" in html_file.read_text()

    (tmp_path / "metrics.jsonl").write_text("")  # tmp_path is now a run folder holding model/
    rows = _prepared_dir(tmp_path / "data", tokenizer)
    assert run_inspect(_args(str(tmp_path), "--data", str(tmp_path / "data"), "--index", "1",
                             "--mask-rate", "0.2", "--color", "never")) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    assert re.search(r"\d/2 masked tokens predicted correctly", out)  # 10 real tokens at 20%: exactly 2 targets
    words = tokenizer.convert_ids_to_tokens(rows[1, 1:11].tolist())
    assert sum(w in out.split("\n")[0] for w in words) >= 8

    with pytest.raises(BertforgeError, match="out of range"):
        run_inspect(_args(str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--index", "2"))
    with pytest.raises(BertforgeError, match="not a prepared data folder"):
        run_inspect(_args(str(tmp_path / "model"), "--data", str(tmp_path)))


def test_validation_row_gives_nsp_token_types(tokenizer, tmp_path):
    from bertforge.inspect_mlm import validation_row

    rows = _prepared_dir(tmp_path / "data", tokenizer)
    ids, types = validation_row(tmp_path / "data", 0, tokenizer)
    assert ids.tolist() == rows[0].tolist() and types is None
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    manifest["mode"] = "nsp"
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    np.array([[20, 1], [5, 0]], dtype=np.int32).tofile(tmp_path / "data" / "val_00000.pairs.bin")
    ids, types = validation_row(tmp_path / "data", 1, tokenizer)
    assert ids.tolist() == rows[1].tolist()
    assert types.tolist() == [0] * 5 + [1] * 7 + [0] * 20  # segment B from 5 through the [SEP] at 11
    manifest["tokenizer"]["fingerprint"] = "0" * 64
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BertforgeError, match="another tokenizer"):
        validation_row(tmp_path / "data", 0, tokenizer)


def test_inspect_command_rejects_a_model_without_mlm_head(tokenizer, tmp_path):
    from bertforge.model.loading import save_model

    classifier = BertForSequenceClassification(tiny_mlm(tokenizer).config, 3)
    save_model(classifier, tmp_path / "clf", tokenizer=tokenizer)
    with pytest.raises(BertforgeError, match="not a masked-LM head"):
        run_inspect(_args(str(tmp_path / "clf"), "--text", PASSAGE))
