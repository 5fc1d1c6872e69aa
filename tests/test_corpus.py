"""bertforge.data.corpus: boundary modes, file kinds, streaming, bad inputs, the stdlib docs corpus."""

from __future__ import annotations

import gzip
import json
import sys
import types

import pytest

from bertforge.data import corpus
from bertforge.data.corpus import iter_documents, iter_lines, python_docs_corpus, write_python_docs_corpus
from bertforge.errors import BertforgeError

TEXT = (
    " = First = \n\n Para one line one.\nPara one line two.\n\n = = Section = = \n\nPara two.\n\n\n"
    " = Second = \nOnly para.\n"
)


@pytest.fixture
def wikifile(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_blank_boundary_joins_paragraph_lines(wikifile):
    assert list(iter_documents(wikifile)) == [
        "= First =",
        "Para one line one.\nPara one line two.",
        "= = Section = =",
        "Para two.",
        "= Second =\nOnly para.",
    ]


def test_line_boundary_one_document_per_line(wikifile):
    docs = list(iter_documents(wikifile, boundary="line"))
    assert docs == [line.strip() for line in TEXT.splitlines() if line.strip()]


def test_heading_boundary_splits_at_titles_and_strips_markup(wikifile):
    assert list(iter_documents(wikifile, boundary="heading")) == [
        "First\nPara one line one.\nPara one line two.\nSection\nPara two.",
        "Second\nOnly para.",
    ]


def test_min_chars_drops_short_documents(wikifile):
    docs = list(iter_documents(wikifile, min_chars=12))
    assert docs == ["Para one line one.\nPara one line two.", "= = Section = =", "= Second =\nOnly para."]


def test_gzip_crlf_and_bom_read_like_plain_text(tmp_path, wikifile):
    gz = tmp_path / "wiki.txt.gz"
    gz.write_bytes(gzip.compress(b"\xef\xbb\xbf" + TEXT.replace("\n", "\r\n").encode()))
    for boundary in corpus.BOUNDARIES:
        assert list(iter_documents(gz, boundary=boundary)) == list(
            iter_documents(wikifile, boundary=boundary)
        )


def test_jsonl_records_are_documents(tmp_path):
    rows = [{"text": "Doc one.\n\nStill doc one.", "id": 1}, {"text": "  "}, {"text": "Doc two."}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    for src in (path, gz):
        assert list(iter_documents(src)) == ["Doc one.\nStill doc one.", "Doc two."]
        assert list(iter_documents(src, boundary="line")) == ["Doc one.", "Still doc one.", "Doc two."]
        assert list(iter_lines(src)) == ["Doc one.", "Still doc one.", "Doc two."]
    other = tmp_path / "o.jsonl"
    other.write_text(json.dumps({"body": "Body text."}) + "\n", encoding="utf-8")
    assert list(iter_documents(other, text_field="body")) == ["Body text."]


def test_jsonl_heading_mode_spans_records(tmp_path):
    lines = [" = A = ", "", " a1 ", " = = Sub = = ", " a2 ", " = B = ", " b1 "]
    path = tmp_path / "wikitext.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    assert list(iter_documents(path, boundary="heading")) == ["A\na1\nSub\na2", "B\nb1"]


def test_folder_is_recursive_sorted_and_skips_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from b/z\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("from a\n\nsecond of a\n", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "from c"}) + "\n", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("hidden\n", encoding="utf-8")
    (tmp_path / ".git" / "HEAD").write_text("ref\n", encoding="utf-8")
    assert list(iter_documents(tmp_path)) == ["from a", "second of a", "from b/z", "from c"]
    assert list(iter_documents([tmp_path / "c.jsonl", str(tmp_path / "a.txt")])) == [
        "from c",
        "from a",
        "second of a",
    ]


def test_reading_is_streamed(tmp_path):
    """Documents come out before a bad byte far into the file is read: the file is never read whole."""
    path = tmp_path / "late_error.txt"
    path.write_bytes(b"first doc\n\n" + b"filler line\n" * 20_000 + b"\xff\xfe broken\n")
    docs = iter_documents(path, boundary="line")
    assert next(docs) == "first doc"
    with pytest.raises(BertforgeError, match="late_error.txt.*not valid UTF-8"):
        list(docs)


def test_iter_lines_on_shared_pretraining_file(shared_data):
    path = shared_data / "pretrain" / "squad_train_contexts.txt.gz"
    # SOURCES.md: 420 articles, 18,102 paragraphs, one title line per article
    assert sum(1 for _ in iter_lines(path)) == 18_102 + 420
    heading = list(iter_documents(path, boundary="heading"))
    blank = list(iter_documents(path, boundary="blank"))
    assert len(heading) == len(blank) == 420
    assert heading[0] == blank[0].replace("= 2008 Sichuan earthquake =", "2008 Sichuan earthquake", 1)


def test_wikitext_heading_mode_gives_articles(shared_data):
    docs = list(iter_documents(shared_data / "wikitext-2-raw" / "wiki.valid.raw", boundary="heading"))
    assert len(docs) == 60  # SOURCES.md: 60 articles
    assert docs[0].startswith("Homarus gammarus\nHomarus gammarus , known as the European lobster")
    assert not any(line.startswith("=") for doc in docs for line in doc.split("\n"))


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", "has no documents"),
        (b"  \n\n \t\n", "has no documents"),
        (b"text\x00with nul", "looks binary"),
        (b"\x89PNG\r\n\x1a\n\xff\xd8\xff", "looks binary"),
    ],
)
def test_bad_files_are_rejected(tmp_path, content, pattern):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(BertforgeError, match=f"bad.txt.*{pattern}"):
        list(iter_documents(path))


def test_missing_empty_and_malformed_sources(tmp_path):
    with pytest.raises(BertforgeError, match="'nope.txt' does not exist: pass an existing file or folder"):
        iter_documents("nope.txt")
    with pytest.raises(BertforgeError, match="has no \\(non-hidden\\) files"):
        iter_documents(tmp_path)
    with pytest.raises(BertforgeError, match="sources are empty"):
        iter_lines([])
    with pytest.raises(BertforgeError, match="boundary 'para' is unknown"):
        iter_documents(tmp_path, boundary="para")
    (tmp_path / "e.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(BertforgeError, match="e.txt' has no text"):
        list(iter_lines(tmp_path / "e.txt"))
    (tmp_path / "x.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(BertforgeError, match="x.txt.gz' is not a valid gzip file"):
        list(iter_documents(tmp_path / "x.txt.gz"))


def test_bad_jsonl_records(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(BertforgeError, match="r.jsonl' line 2 is not valid JSON"):
        list(iter_documents(path))
    path.write_text('{"body": "ok"}\n', encoding="utf-8")
    with pytest.raises(BertforgeError, match="r.jsonl:1' has no field 'text' \\(has \\['body'\\]\\)"):
        list(iter_documents(path))
    path.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(BertforgeError, match="field 'text' is int, not text"):
        list(iter_lines(path))


def test_document_size_guard(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MAX_DOCUMENT_CHARS", 100)
    path = tmp_path / "nobreaks.txt"
    path.write_text("a line of text\n" * 20, encoding="utf-8")
    with pytest.raises(BertforgeError, match="exceeds 100 characters.*boundary='line'"):
        list(iter_documents(path))
    assert len(list(iter_documents(path, boundary="line"))) == 20


def test_hub_errors_without_network(monkeypatch):
    with pytest.raises(BertforgeError, match="hub source 'hub:' is malformed"):
        iter_documents("hub:")
    with pytest.raises(BertforgeError, match="is malformed"):
        iter_documents("hub:a:b:c:d")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as when not installed
    with pytest.raises(BertforgeError, match="pip install bertforge\\[hub\\]"):
        list(iter_documents("hub:wikitext:wikitext-2-raw-v1:train"))


def test_hub_records_through_a_stand_in_datasets_module(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "missing/set":
            raise FileNotFoundError("Dataset 'missing/set' doesn't exist on the Hub\nmore detail")
        return iter([{"text": " = T = "}, {"text": "t1"}, {"text": ""}, {"text": "t2"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(iter_documents("hub:org/set:cfg:validation", boundary="heading")) == ["T\nt1\nt2"]
    assert list(iter_documents("hub:org/set")) == ["= T =", "t1", "t2"]
    assert calls == [("org/set", "cfg", "validation", True), ("org/set", None, "train", True)]
    with pytest.raises(BertforgeError, match="hub:org/set#0' has no field 'body'"):
        list(iter_documents("hub:org/set", text_field="body"))
    with pytest.raises(BertforgeError, match="could not be opened \\(Dataset 'missing/set' doesn't exist"):
        list(iter_documents("hub:missing/set"))


def test_python_docs_corpus_is_deterministic_english(tmp_path):
    docs = list(python_docs_corpus(max_bytes=120_000))
    total = sum(len(d.encode()) + 1 for d in docs)
    assert 110_000 <= total <= 120_000
    assert docs == list(python_docs_corpus(max_bytes=120_000))
    assert all(d and "\n\n" not in d for d in docs)
    words = " ".join(docs).lower().split()
    assert words.count("the") > 0.02 * len(words)  # English prose, not code
    path = write_python_docs_corpus(tmp_path / "sub" / "docs.txt", max_bytes=120_000)
    assert list(iter_documents(path, boundary="blank")) == docs


@pytest.mark.slow
def test_python_docs_corpus_full_size():
    total = sum(len(d.encode()) + 1 for d in python_docs_corpus())
    assert total >= 2_900_000, total
