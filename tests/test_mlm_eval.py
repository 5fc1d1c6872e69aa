"""The held-out MLM protocol (bertforge.data.mlm_eval): fixed masks, no 80/10/10, the same numbers for our
model and its Hugging Face export, the `bertforge evaluate --task mlm` command, and the plateau warning.
Everything runs on text the tests write themselves (no ../shared needed)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bertforge.cli import main as cli_main
from bertforge.data.mlm_eval import evaluate_mlm, pack_texts, unigram_loss

NOUNS = ["cat", "dog", "bird", "horse", "child", "teacher", "farmer", "river", "city", "garden"]
VERBS = ["sees", "likes", "follows", "finds", "helps", "paints", "visits", "calls"]
ADJS = ["small", "old", "green", "quiet", "happy", "tall"]


def synthetic_corpus(path: Path, documents: int, seed: int = 0) -> Path:
    """Documents of simple sentences ('the old cat sees a green river .') separated by blank lines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        sents = [f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} a {rng.choice(ADJS)} "
                 f"{rng.choice(NOUNS)} ." for _ in range(rng.randint(8, 20))]
        docs.append(" ".join(sents))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A WordPiece, 32-token shards and a random tiny BertForMaskedLM saved with its tokenizer."""
    from bertforge.data.corpus import CorpusLines
    from bertforge.data.shards import PrepareConfig, prepare
    from bertforge.model.bert import BertConfig, pad_vocab_size
    from bertforge.model.heads import BertForMaskedLM
    from bertforge.model.loading import save_model
    from bertforge.wordpiece import train_wordpiece

    root = tmp_path_factory.mktemp("mlm_eval")
    corpus = synthetic_corpus(root / "corpus.txt", 300)
    held_out = synthetic_corpus(root / "held_out.txt", 20, seed=1)
    tok = train_wordpiece(CorpusLines([corpus]), vocab_size=200, show_progress=False)
    tok.save(root / "tok")
    prepare(PrepareConfig(sources=[str(corpus)], output=str(root / "data"), tokenizer=str(root / "tok"), seq_len=32,
                          val_fraction=0.1, num_workers=0, show_progress=False))
    torch.manual_seed(0)
    cfg = BertConfig.from_preset("tiny", vocab_size=pad_vocab_size(tok.vocab_size), max_position_embeddings=64,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(cfg).eval()
    save_model(model, root / "model", tokenizer=tok)
    return {"root": root, "tok": tok, "model": model, "held_out": held_out, "data": root / "data"}


class EchoModel(nn.Module):
    """Predicts the token it is shown at every position: right only where a target was left unchanged."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        return type("Out", (), {"logits": nn.functional.one_hot(input_ids, self.vocab).float() * 10 + self.p})()


def rows_of(setup) -> np.ndarray:
    docs = setup["held_out"].read_text().split("\n\n")
    return pack_texts(docs, setup["tok"], 32)


def test_masks_are_fixed_whatever_the_batch_size(tiny_setup):
    rows = rows_of(tiny_setup)
    a = evaluate_mlm(tiny_setup["model"], rows, tiny_setup["tok"], batch_size=7)
    b = evaluate_mlm(tiny_setup["model"], rows, tiny_setup["tok"], batch_size=64)
    assert a["eval_masked_tokens"] == b["eval_masked_tokens"] > 0
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5)
    assert a["eval_accuracy"] == b["eval_accuracy"] and a["eval_top5_accuracy"] == b["eval_top5_accuracy"]
    c = evaluate_mlm(tiny_setup["model"], rows, tiny_setup["tok"], seed=7)
    assert c["eval_loss"] != pytest.approx(a["eval_loss"], abs=1e-6)  # another seed, other masks
    # 15% of each row's maskable tokens, exactly (round half to even per row)
    specials = set(tiny_setup["tok"].special_ids) | {tiny_setup["tok"].pad_token_id}
    expected = sum(round(0.15 * sum(int(t) not in specials for t in r)) for r in rows)
    assert a["eval_masked_tokens"] == expected


def test_every_target_is_shown_as_mask_not_80_10_10(tiny_setup):
    rows = rows_of(tiny_setup)
    echo = EchoModel(tiny_setup["tok"].vocab_size)
    strict = evaluate_mlm(echo, rows, tiny_setup["tok"])
    bert = evaluate_mlm(echo, rows, tiny_setup["tok"], bert_replacement=True)
    assert strict["eval_accuracy"] == 0.0  # the input never shows the answer
    assert 0.05 < bert["eval_accuracy"] < 0.2  # 80/10/10 leaves ~10% of the answers in the input: free points
    assert strict["eval_top_prediction"] == "[MASK]" and strict["eval_top_prediction_share"] == 1.0


def test_same_numbers_for_ours_and_the_hf_export(tiny_setup, tmp_path):
    from transformers import BertForMaskedLM as HFMaskedLM

    from bertforge.model.loading import export_hf

    export_hf(tiny_setup["model"], tmp_path / "hf", tokenizer=tiny_setup["tok"])
    hf = HFMaskedLM.from_pretrained(tmp_path / "hf").eval()
    rows = rows_of(tiny_setup)
    ours = evaluate_mlm(tiny_setup["model"], rows, tiny_setup["tok"])
    theirs = evaluate_mlm(hf, rows, tiny_setup["tok"])
    assert ours["eval_masked_tokens"] == theirs["eval_masked_tokens"]
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], abs=1e-5)
    assert ours["eval_accuracy"] == theirs["eval_accuracy"]
    assert ours["eval_top5_accuracy"] == theirs["eval_top5_accuracy"]


def test_unigram_loss_is_the_entropy_of_the_tokens(tiny_setup):
    from bertforge.data.dataset import PackedDataset

    rows = PackedDataset(tiny_setup["data"], "train")
    tok = tiny_setup["tok"]
    ids = rows.rows(np.arange(len(rows))).reshape(-1)
    ids = ids[~np.isin(ids, list(tok.special_ids) + [tok.pad_token_id])]
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    assert unigram_loss(rows, tok) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)


def test_evaluate_mlm_command_on_text_and_shards(tiny_setup, capsys):
    model = str(tiny_setup["root"] / "model")
    assert cli_main(["evaluate", "--task", "mlm", "--model", model, "--data", str(tiny_setup["held_out"]),
                     "--seq-len", "32", "--json"]) == 0
    text = json.loads(capsys.readouterr().out)
    direct = evaluate_mlm(tiny_setup["model"], rows_of(tiny_setup), tiny_setup["tok"])
    assert text["eval_loss"] == pytest.approx(direct["eval_loss"], abs=1e-5)
    assert text["protocol"] == "every target [MASK]"
    assert cli_main(["evaluate", "--task", "mlm", "--model", model, "--data", str(tiny_setup["data"])]) == 0
    out = capsys.readouterr().out
    assert "val split" in out and "top-5 accuracy" in out and "pseudo-perplexity" in out


def test_evaluate_mlm_command_refuses_bad_inputs(tiny_setup, tmp_path, capsys):
    from bertforge.model.bert import BertConfig
    from bertforge.model.heads import BertForSequenceClassification
    from bertforge.model.loading import save_model

    save_model(BertForSequenceClassification(BertConfig.from_preset("tiny", vocab_size=256)), tmp_path / "clf",
               tokenizer=tiny_setup["tok"])
    cases = [
        (["--model", str(tmp_path / "clf"), "--data", str(tiny_setup["held_out"])], "masked-LM head"),
        (["--model", str(tiny_setup["root"] / "model"), "--data", str(tiny_setup["held_out"]), "--seq-len", "500"],
         "positions"),
        (["--model", str(tiny_setup["root"] / "model"), "--data", str(tmp_path / "missing.txt"),
          "--seq-len", "32"], "missing.txt"),
    ]
    for args, needle in cases:
        assert cli_main(["evaluate", "--task", "mlm", *args]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_plateau_warning_on_a_deliberately_bad_config(tiny_setup, tmp_path, capsys):
    from bertforge.config import load_run_config
    from bertforge.workflows.pretrain import PretrainRunConfig, main

    cfg = load_run_config(PretrainRunConfig, overrides=[
        "model.preset=tiny", "model.max_position_embeddings=64", f"data.path={tiny_setup['data']}",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=20", "train.batch_size=8", "train.log_every=2",
        "train.progress=false", "optim.lr=1e-7", "optim.warmup_ratio=0.5", "data.eval_rows=16"])
    main(cfg)
    out = capsys.readouterr().out
    assert "still on the unigram plateau" in out and "optim.lr" in out
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    warnings = [r for r in records if r.get("warning") == "plateau"]
    assert len(warnings) == 1 and warnings[0]["step"] >= 6  # once, after 30% of the 20 steps
    assert warnings[0]["train_loss"] > warnings[0]["plateau_level"] - 0.25


def test_masking_schedule_moves_the_rate_over_the_budget(tiny_setup):
    from bertforge.data.dataset import PackedDataset
    from bertforge.data.masking import MaskingConfig, MLMCollator
    from bertforge.workflows.pretrain import PretrainBatches

    rows = PackedDataset(tiny_setup["data"], "train")
    cfg = MaskingConfig(mlm_probability=0.4, mlm_probability_final=0.1)
    batches = PretrainBatches(rows, MLMCollator.from_tokenizer(tiny_setup["tok"], cfg), batch_size=32, seed=0)

    def share(progress: float) -> float:
        batches.set_progress(progress)
        b = batches.next_batch()
        maskable = (b["attention_mask"].bool() & (b["labels"] != -100)).sum() / (b["attention_mask"].sum() - 64)
        return float(maskable)  # labelled share of the non-[CLS]/[SEP] tokens

    assert share(0.0) == pytest.approx(0.4, abs=0.02)
    assert share(0.5) == pytest.approx(0.25, abs=0.02)
    assert share(1.0) == pytest.approx(0.1, abs=0.02)
