"""Knowledge distillation: the KD loss by hand, layer-subset initialisation, the combined loss, and
end-to-end runs (task distillation on a real SST-2 slice lowers the student's KL to the teacher;
MLM distillation at masked positions) with tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny import step_losses

from bertforge.data.masking import MaskingConfig, MLMCollator
from bertforge.errors import BertforgeError
from bertforge.model.bert import BertConfig, pad_vocab_size
from bertforge.model.heads import BertForMaskedLM, BertForSequenceClassification
from bertforge.train.settings import TrainConfig
from bertforge.workflows.distill import DistillRunConfig, evaluate_distill, main
from bertforge.workflows.distill_model import (
    DistillationModel,
    DistillLossConfig,
    default_teacher_layers,
    hidden_pairs,
    init_student_from_teacher,
    kd_loss,
)


def tiny(**overrides) -> BertConfig:
    return BertConfig.from_preset("tiny", **overrides)


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p_t, p_s = softmax(t.numpy() / T), softmax(s.numpy() / T)
    expected = T * T * np.sum(p_t * (np.log(p_t) - np.log(p_s))) / 2  # mean over the 2 rows
    assert float(kd_loss(s, t, T)) == pytest.approx(expected, rel=1e-6)
    assert float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-7)


def test_layer_maps():
    assert default_teacher_layers(6, 3) == [0, 2, 4]  # every other layer
    assert default_teacher_layers(12, 4) == [0, 3, 6, 9]
    assert default_teacher_layers(4, 4) == [0, 1, 2, 3]
    assert hidden_pairs(3, 6) == [(0, 0), (1, 2), (2, 4), (3, 6)]  # last student layer <-> last teacher layer
    with pytest.raises(BertforgeError):
        default_teacher_layers(2, 3)


def test_init_student_copies_every_other_teacher_layer():
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny(num_hidden_layers=4), num_labels=3)
    student = BertForSequenceClassification(tiny(num_hidden_layers=2), num_labels=3)
    assert init_student_from_teacher(student, teacher) == [0, 2]
    for s_index, t_index in ((0, 0), (1, 2)):
        for (name, p), (_, q) in zip(student.bert.layers[s_index].named_parameters(),
                                     teacher.bert.layers[t_index].named_parameters()):
            assert torch.equal(p, q), name
    assert not torch.equal(student.bert.layers[1].attention.qkv.weight, teacher.bert.layers[1].attention.qkv.weight)
    for name in ("embeddings.word_embeddings.weight", "embeddings.norm.weight", "pooler.weight"):
        assert torch.equal(student.bert.state_dict()[name], teacher.bert.state_dict()[name])
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    init_student_from_teacher(student, teacher, [3, 1])  # an explicit subset, in any order
    assert torch.equal(student.bert.layers[0].ffn.up.weight, teacher.bert.layers[3].ffn.up.weight)
    assert torch.equal(student.bert.layers[1].ffn.up.weight, teacher.bert.layers[1].ffn.up.weight)
    with pytest.raises(BertforgeError, match="hidden_size"):
        init_student_from_teacher(BertForSequenceClassification(tiny(hidden_size=16, num_attention_heads=2)), teacher)
    with pytest.raises(BertforgeError, match="teacher_layers"):
        init_student_from_teacher(student, teacher, [0, 4])


def test_distillation_loss_combines_soft_hard_and_hidden_terms():
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny(), num_labels=3)
    student = BertForSequenceClassification(tiny(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                                 intermediate_size=20), num_labels=3)
    ids = torch.randint(5, 99, (4, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        soft_only = DistillationModel(student, teacher, DistillLossConfig(temperature=3.0, alpha=1.0)).eval()
        out = soft_only(ids, mask, None, labels)
        assert float(out.loss) == pytest.approx(float(kd_loss(out.logits, out.teacher_logits, 3.0)), rel=1e-6)
        hard_only = DistillationModel(student, teacher, DistillLossConfig(alpha=0.0)).eval()
        out = hard_only(ids, mask, None, labels)
        assert float(out.loss) == pytest.approx(float(F.cross_entropy(out.logits, labels)), rel=1e-6)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for kind in ("mse", "cosine"):
        model = DistillationModel(student, teacher, DistillLossConfig(alpha=0.5, hidden_weight=2.0, hidden_loss=kind))
        assert model.proj is not None and model.proj.in_features == 16 and model.proj.out_features == 32
        out = model(ids, mask, None, labels)
        expected = 0.5 * out.soft_loss + 0.5 * out.hard_loss + 2.0 * out.hidden_loss
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6) and out.hidden_loss.item() > 0
        out.loss.backward()
        assert model.proj.weight.grad is not None and float(model.proj.weight.grad.abs().sum()) > 0
    assert set(k.split(".")[0] for k in model.state_dict()) == {"student", "proj"}  # teacher not saved


def test_regression_distillation_uses_mse_to_the_teacher():
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny(), num_labels=1)
    student = BertForSequenceClassification(tiny(num_hidden_layers=1), num_labels=1)
    batch = {"input_ids": torch.randint(5, 99, (6, 8)), "attention_mask": torch.ones(6, 8, dtype=torch.long),
             "labels": torch.linspace(0.0, 5.0, 6)}
    model = DistillationModel(student, teacher, DistillLossConfig(alpha=0.25), regression=True).eval()
    with torch.no_grad():
        out = model(**batch)
    expected = 0.25 * F.mse_loss(out.logits, out.teacher_logits) + 0.75 * F.mse_loss(out.logits.squeeze(-1),
                                                                                    batch["labels"])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    metrics = evaluate_distill(model, [batch], "stsb")
    assert metrics["eval_teacher_mse"] == pytest.approx(F.mse_loss(out.logits, out.teacher_logits).item(), rel=1e-5)
    assert {"eval_pearson", "eval_spearmanr", "teacher_pearson", "teacher_spearmanr"} <= set(metrics)


SST2_LINES: list[str] = []


def sst2_tokenizer_corpus(folder: Path) -> Path:
    """The 2,000 SST-2 training sentences the tokenizer is trained on, one per line."""
    corpus = folder / "sst2.txt"
    corpus.write_text("\n".join(SST2_LINES) + "\n", encoding="utf-8")
    return corpus


@pytest.fixture(scope="module")
def sst2_tokenizer(shared_data, tmp_path_factory):
    from bertforge.data.corpus import CorpusLines
    from bertforge.wordpiece import train_wordpiece

    lines = (shared_data / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:2001]
    SST2_LINES[:] = [line.split("\t")[0] for line in lines]
    return train_wordpiece(CorpusLines(sst2_tokenizer_corpus(tmp_path_factory.mktemp("corpus"))), vocab_size=800,
                           min_frequency=1, show_progress=False)


@pytest.mark.slow
def test_task_distillation_lowers_kl_to_the_teacher(shared_data, sst2_tokenizer, tmp_path):
    from bertforge.model.loading import save_model

    torch.manual_seed(0)
    # initializer_range 0.2: a random teacher whose predictions vary with the input (0.02 gives ~one output)
    teacher = BertForSequenceClassification(tiny(vocab_size=pad_vocab_size(sst2_tokenizer.vocab_size),
                                                 num_hidden_layers=4, initializer_range=0.2), num_labels=2)
    save_model(teacher, tmp_path / "teacher", tokenizer=sst2_tokenizer)
    cfg = DistillRunConfig(teacher=str(tmp_path / "teacher"))
    cfg.student.init_from_teacher = False
    cfg.data.path, cfg.data.limit, cfg.data.eval_limit, cfg.data.max_seq_length = str(shared_data / "sst2"), 512, 128, 48
    cfg.loss = DistillLossConfig(temperature=2.0, alpha=0.9, hidden_weight=0.1)
    cfg.optim.lr, cfg.optim.warmup_ratio = 3e-3, 0.0
    cfg.train = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=32, max_steps=60, progress=False,
                            log_every=20, device="cpu")
    metrics = main(cfg)
    assert metrics["student_layers"] == 2 and metrics["teacher_layers"] == 4
    assert metrics["eval_kl"] < 0.5 * metrics["initial_eval_kl"], metrics
    assert metrics["speed_up"] > 1.0 and metrics["student_parameters"] < metrics["teacher_parameters"]
    assert metrics["score_kept"] == pytest.approx(100 * metrics["eval_accuracy"] / metrics["teacher_accuracy"])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["eval_kl"] == pytest.approx(metrics["eval_kl"])
    from bertforge.model.loading import load_model

    student = load_model(tmp_path / "run" / "model")
    assert student.head == "sequence_classification" and student.config.num_hidden_layers == 2


def test_teacher_without_trained_head_is_rejected(shared_data, sst2_tokenizer, tmp_path):
    from bertforge.model.bert import BertModel
    from bertforge.model.loading import save_model

    save_model(BertModel(tiny(vocab_size=pad_vocab_size(sst2_tokenizer.vocab_size))), tmp_path / "bare",
               tokenizer=sst2_tokenizer)
    cfg = DistillRunConfig(teacher=str(tmp_path / "bare"))
    cfg.data.path = str(shared_data / "sst2")
    with pytest.raises(BertforgeError, match="fine-tuned on sst2"):
        main(cfg)


def test_mlm_distillation_loss_at_masked_positions(sst2_tokenizer):
    torch.manual_seed(0)
    V = pad_vocab_size(sst2_tokenizer.vocab_size)
    teacher = BertForMaskedLM(tiny(vocab_size=V, num_hidden_layers=2))
    student = BertForMaskedLM(tiny(vocab_size=V, num_hidden_layers=1))
    rng = np.random.default_rng(0)
    rows = rng.integers(5, sst2_tokenizer.vocab_size, size=(16, 24)).astype(np.uint16)  # packed rows
    rows[:, 0], rows[:, -1] = sst2_tokenizer.cls_token_id, sst2_tokenizer.sep_token_id
    batch = MLMCollator.from_tokenizer(sst2_tokenizer, MaskingConfig(mlm_probability=0.3), seed=0)(rows)
    masked = batch["labels"] != -100
    model = DistillationModel(student, teacher, DistillLossConfig(temperature=2.0, alpha=0.5)).eval()
    with torch.no_grad():
        out = model(**batch)
        full = teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits  # (B, T, V)
    assert out.logits.shape == out.teacher_logits.shape == (int(masked.sum()), V)  # masked positions only
    assert torch.allclose(out.teacher_logits, full[masked], atol=1e-5)
    expected = 0.5 * kd_loss(out.logits, full[masked], 2.0) + 0.5 * F.cross_entropy(out.logits, batch["labels"][masked])
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
def test_mlm_distillation_on_prepared_shards(sst2_tokenizer, tmp_path):
    from bertforge.data.shards import PrepareConfig, prepare
    from bertforge.model.loading import save_model

    corpus = Path(sst2_tokenizer_corpus(tmp_path))
    sst2_tokenizer.save(tmp_path / "tok")
    prepare(PrepareConfig(sources=[str(corpus)], output=str(tmp_path / "data"), tokenizer=str(tmp_path / "tok"),
                          seq_len=32, val_fraction=0.1, num_workers=0, boundary="line", show_progress=False))
    torch.manual_seed(0)
    teacher = BertForMaskedLM(tiny(vocab_size=pad_vocab_size(sst2_tokenizer.vocab_size)))
    with torch.no_grad():  # a peaked teacher distribution (a random MLM head is near uniform)
        teacher.cls.bias.normal_(0.0, 2.0)
    save_model(teacher, tmp_path / "teacher", tokenizer=sst2_tokenizer)
    cfg = DistillRunConfig(teacher=str(tmp_path / "teacher"))
    cfg.student.init_from_teacher = False  # (with it, the copied MLM head starts at KL ~ 0)
    cfg.data.mode, cfg.data.path, cfg.data.eval_batches, cfg.data.eval_batch_size = "mlm", str(tmp_path / "data"), 4, 32
    cfg.loss = DistillLossConfig(alpha=1.0)
    cfg.optim.lr, cfg.optim.warmup_ratio = 3e-3, 0.0
    cfg.train = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=16, max_steps=30, progress=False,
                            log_every=10, device="cpu")
    metrics = main(cfg)
    assert metrics["student_layers"] == 1 and metrics["teacher_layers"] == 2
    assert metrics["eval_kl"] < 0.5 * metrics["initial_eval_kl"], metrics
    assert 0 <= metrics["eval_accuracy"] <= 1 and 0 <= metrics["teacher_accuracy"] <= 1
    assert "score_kept" in metrics and metrics["speed_up"] > 0
    from bertforge.model.loading import load_model

    assert load_model(tmp_path / "run" / "model").head == "masked_lm"


def test_cli_distill_runs_and_reports(shared_data, sst2_tokenizer, tmp_path, capsys):
    import argparse

    from bertforge.commands.sentence import add_distill_arguments, run_distill
    from bertforge.model.loading import save_model

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny(vocab_size=pad_vocab_size(sst2_tokenizer.vocab_size)), num_labels=2)
    save_model(teacher, tmp_path / "teacher", tokenizer=sst2_tokenizer)
    parser = argparse.ArgumentParser()
    add_distill_arguments(parser)
    args = parser.parse_args(["--teacher", str(tmp_path / "teacher"), "--data", str(shared_data / "sst2"),
                              "--task", "sst2", "--student-layers", "1", "--output", str(tmp_path / "run"),
                              "--max-steps", "2", "--batch-size", "8", "--max-seq-length", "32", "--no-progress",
                              "data.limit=32", "data.eval_limit=32", "student.teacher_layers=[1]"])
    assert run_distill(args) == 0
    out = capsys.readouterr().out
    assert "score_kept" in out and "speed_up" in out and "teacher_accuracy" in out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["student"]["teacher_layers"] == [1] and saved["student"]["num_hidden_layers"] == 1
    from bertforge.model.loading import load_model

    assert load_model(tmp_path / "run" / "model").meta["teacher_layers"] == [1]


def test_distill_resumes_bit_for_bit_with_the_student_stored_once(shared_data, sst2_tokenizer, tmp_path, capsys):
    import argparse

    from bertforge.commands.sentence import add_distill_arguments, run_distill
    from bertforge.model.loading import save_model

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny(vocab_size=pad_vocab_size(sst2_tokenizer.vocab_size),
                                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                                            num_labels=2)
    save_model(teacher, tmp_path / "teacher", tokenizer=sst2_tokenizer)

    def run(out: str, steps: int, *extra: str) -> None:
        parser = argparse.ArgumentParser()
        add_distill_arguments(parser)
        args = parser.parse_args(["--teacher", str(tmp_path / "teacher"), "--data", str(shared_data / "sst2"),
                                  "--task", "sst2", "--student-layers", "1", "--output", str(tmp_path / out),
                                  "--max-steps", str(steps), "--batch-size", "8", "--max-seq-length", "32",
                                  "--no-progress", "data.limit=64", "data.eval_limit=16", "student.teacher_layers=[1]",
                                  "train.save_every=2", "train.log_every=1", "optim.schedule=constant",
                                  "optim.warmup_ratio=0", *extra])
        assert run_distill(args) == 0

    run("straight", 4)
    run("cut", 2)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step_00000002" / "state.pt", weights_only=True)
    assert state["weights_in_folder"] and not any(k.startswith("student.") for k in state["model"])
    run("cut", 4, "--resume")

    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "straight") and len(step_losses(tmp_path / "cut")) == 4
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
