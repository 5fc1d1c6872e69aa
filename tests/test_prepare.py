"""bertforge prepare + shard reading: real text in, rows/manifest checked token by token, resume, errors,
and the stateful loader (determinism, exact resume, DDP slices)."""

from __future__ import annotations

import argparse
import gzip
import json
import os

import numpy as np
import pytest

import bertforge.data.shard_output as shard_output
from bertforge.commands.prepare import add_prepare_arguments, run_prepare
from bertforge.data.corpus import CorpusLines, iter_documents
from bertforge.data.dataset import PackedDataset, ShardLoader
from bertforge.data.shards import PrepareConfig, is_val_document, prepare
from bertforge.errors import BertforgeError
from bertforge.wordpiece import WordPieceTokenizer, train_wordpiece

SEQ = 64


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    """~300 KB of WikiText-2 valid and ~150 KB of the gzipped SQuAD-context pretraining file."""
    root = tmp_path_factory.mktemp("corpus")
    raw = (shared_data / "wikitext-2-raw" / "wiki.valid.raw").read_bytes()[:300_000]
    wiki = root / "wiki.txt"
    wiki.write_bytes(raw[: raw.rindex(b"\n") + 1])
    with gzip.open(shared_data / "pretrain" / "squad_train_contexts.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read(150_000)
    squad = root / "squad.txt.gz"
    with gzip.open(squad, "wt", encoding="utf-8") as f:
        f.write(text[: text.rindex("\n") + 1])
    return [str(wiki), str(squad)]


@pytest.fixture(scope="module")
def minilm(shared_data):
    return str(shared_data / "all-MiniLM-L6-v2")


def make_cfg(corpus, tok, out, **kw) -> PrepareConfig:
    base = dict(sources=corpus, output=str(out), tokenizer=tok, seq_len=SEQ, boundary="heading", val_fraction=0.2,
                shard_size=300, num_workers=0, batch_bytes=32_000, show_progress=False)
    return PrepareConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def packed(corpus, minilm, tmp_path_factory):
    """A packed output made with 2 worker processes."""
    out = tmp_path_factory.mktemp("packed")
    summary = prepare(make_cfg(corpus, minilm, out, num_workers=2))
    return out, summary


def read_split(out, split):
    m = json.loads((out / "manifest.json").read_text())
    files = [s["file"] for s in m["shards"] if s["split"] == split]
    return np.concatenate([np.fromfile(out / f, dtype=m["dtype"]).reshape(-1, m["seq_len"]) for f in files])


def output_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".bin"}


def test_packed_rows_reproduce_documents_split_by_document(packed, corpus, minilm):
    out, summary = packed
    tok = WordPieceTokenizer.from_pretrained(minilm)
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["dtype"] == "uint16" and m["tokenizer"]["fingerprint"] == tok.fingerprint()
    docs = list(iter_documents(corpus, boundary="heading"))
    val = is_val_document(np.arange(len(docs)), 0, 0.2)
    assert 0 < val.sum() < len(docs) and summary["documents"] == len(docs)
    cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    for split, take in (("train", ~val), ("val", val)):
        rows = read_split(out, split)
        assert len(rows) == m["splits"][split]["sequences"] == sum(s["rows"] for s in m["shards"] if s["split"] == split)
        assert (rows[:, 0] == cls).all() and (rows[:-1, -1] == sep).all() and (rows[:-1] != pad).all()
        last = rows[-1][rows[-1] != pad]  # the final partial row: [CLS] ... [SEP] then only padding
        assert last[-1] == sep and (rows[-1][len(last):] == pad).all()
        stream = np.concatenate([rows[:-1, 1:-1].ravel(), last[1:-1]])
        cuts = np.flatnonzero(stream == sep)
        got = [p.tolist() for p in np.split(stream, cuts)]
        got = [g[1:] if i else g for i, g in enumerate(got)]  # drop the separator that starts each piece
        want = [e.input_ids for e in tok.encode_batch([d for d, t in zip(docs, take) if t],
                                                      add_special_tokens=False, truncation=False,
                                                      max_length=10**7)]
        assert got == want  # every document of this split, in order, token for token; none from the other
        assert m["splits"][split]["tokens"] == sum(map(len, want))
        first = next(d for d, t in zip(docs, take) if t)
        squeeze = "".join(tok.decode(rows[0]).split())[:60]  # decoded text, whitespace aside
        assert squeeze == "".join(first.lower().split())[:60]
    assert m["sequences"] == summary["sequences"] == sum(s["rows"] for s in m["shards"])
    pads = sum(s["pad_tokens"] for s in m["shards"])
    assert m["fill_rate"] == pytest.approx(1 - pads / (m["sequences"] * SEQ))
    for s in m["shards"]:
        assert (out / s["file"]).stat().st_size == s["rows"] * SEQ * 2


def test_deterministic_across_workers_and_seeded(packed, corpus, minilm, tmp_path):
    out, _ = packed
    prepare(make_cfg(corpus, minilm, tmp_path / "a", batch_bytes=5_000))  # in-process, other batching
    assert output_bytes(tmp_path / "a") == output_bytes(out)
    prepare(make_cfg(corpus, minilm, tmp_path / "b", seed=1))
    assert output_bytes(tmp_path / "b") != output_bytes(out)


def test_rerun_of_finished_output_skips_all_shards(packed, corpus, minilm):
    out, first = packed
    before = {p.name: p.stat().st_ino for p in out.iterdir()}
    again = prepare(make_cfg(corpus, minilm, out, num_workers=2))
    assert again["shards_written"] == 0 and again["shards_skipped"] == first["shards"]
    assert {p.name: p.stat().st_ino for p in out.iterdir()} == before


@pytest.mark.parametrize("mode", ["packed", "nsp"])
def test_resume_after_interruption_is_exact(corpus, minilm, tmp_path, monkeypatch, mode):
    prepare(make_cfg(corpus, minilm, tmp_path / "ref", mode=mode, shard_size=100))
    flush, calls = shard_output.ShardWriter._flush, []

    def crash_after_three(self, split):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(split)
        flush(self, split)

    monkeypatch.setattr(shard_output.ShardWriter, "_flush", crash_after_three)
    cfg = make_cfg(corpus, minilm, tmp_path / "run", mode=mode, shard_size=100)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    monkeypatch.setattr(shard_output.ShardWriter, "_flush", flush)
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert not m["complete"] and len(m["shards"]) >= 1 and m["resume"]["counts"]["next_document"] > 0
    kept = {s["file"]: (tmp_path / "run" / s["file"]).stat().st_ino for s in m["shards"]}
    summary = prepare(cfg)
    assert summary["shards_skipped"] == len(kept) and summary["shards_written"] == summary["shards"] - len(kept)
    assert {f: (tmp_path / "run" / f).stat().st_ino for f in kept} == kept  # finished shards untouched
    assert output_bytes(tmp_path / "run") == output_bytes(tmp_path / "ref")
    assert not list((tmp_path / "run").glob("resume_*"))


def test_nsp_pairs_labels_and_token_types(corpus, minilm, tmp_path):
    tok = WordPieceTokenizer.from_pretrained(minilm)
    summary = prepare(make_cfg(corpus, minilm, tmp_path, mode="nsp", seq_len=128))
    assert 0.4 <= summary["nsp"]["is_next_rate"] <= 0.6
    ds = PackedDataset(tmp_path, "train")
    idx = np.arange(len(ds))
    rows, info = ds.rows(idx), ds.pairs(idx)
    labels = info[:, 1]
    assert set(np.unique(labels)) == {0, 1} and abs(labels.mean() - summary["nsp"]["is_next_rate"]) < 0.1
    ends = (rows != tok.pad_token_id).sum(1) - 1
    assert (rows[:, 0] == tok.cls_token_id).all() and (rows[idx, ends] == tok.sep_token_id).all()
    assert (rows[idx, info[:, 0] - 1] == tok.sep_token_id).all() and (info[:, 0] >= 3).all()
    assert ((rows == tok.sep_token_id).sum(1) == 2).all() and (ends <= 127).all()
    # untrimmed pairs: A+B is a contiguous run of one document exactly when is_next says so
    docs = list(iter_documents(corpus, boundary="heading"))
    train = [d for d, v in zip(docs, is_val_document(np.arange(len(docs)), 0, 0.2)) if not v]
    as_text = lambda ids: "".join(chr(i + 256) for i in ids)  # noqa: E731 - substring search over ids
    text = "\n".join(as_text(e.input_ids) for e in tok.encode_batch(train, add_special_tokens=False,
                                                                    truncation=False, max_length=10**7))
    short = np.flatnonzero(ends < 126)  # room left, so nothing was trimmed
    follows = np.array([as_text(np.delete(rows[r, 1:ends[r]], info[r, 0] - 2)) in text for r in short])
    assert (follows[labels[short] == 1]).all() and follows[labels[short] == 0].mean() < 0.05
    item = ds[5]
    types = item["token_type_ids"]
    assert types[: info[5, 0]].sum() == 0 and (types[info[5, 0]: ends[5] + 1] == 1).all()
    assert types[ends[5] + 1:].sum() == 0 and item["next_sentence_label"] == labels[5]


def test_bad_inputs_raise_one_line_errors(corpus, minilm, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    late = tmp_path / "late.txt"  # NUL past the corpus reader's 64 KiB sniff
    late.write_bytes(b"plain words here\n" * 5000 + b"oops \x00 binary\n")
    for src in (empty, binary, late):
        with pytest.raises(BertforgeError) as err:
            prepare(make_cfg([str(src)], minilm, tmp_path / "o1"))
        assert "\n" not in str(err.value)
    for bad in (dict(seq_len=4), dict(seq_len=1024), dict(mode="mlm"), dict(val_fraction=1.0)):
        with pytest.raises(BertforgeError, match=list(bad)[0]):
            prepare(make_cfg(corpus, minilm, tmp_path / "o2", **bad))


def test_tokenizer_or_settings_mismatch_with_existing_shards(corpus, minilm, tmp_path):
    small = corpus[:1]
    prepare(make_cfg(small, minilm, tmp_path / "out"))
    other = train_wordpiece(CorpusLines(small), vocab_size=600, show_progress=False)
    other.save(tmp_path / "tok")
    with pytest.raises(BertforgeError, match="another tokenizer.*--output or --overwrite"):
        prepare(make_cfg(small, str(tmp_path / "tok"), tmp_path / "out"))
    with pytest.raises(BertforgeError, match="seq_len 64 -> 32"):
        prepare(make_cfg(small, minilm, tmp_path / "out", seq_len=32))
    grown = tmp_path / "grown.txt"  # the corpus changed since the shards were made
    grown.write_bytes(open(small[0], "rb").read())
    prepare(make_cfg([str(grown)], minilm, tmp_path / "out2"))
    with open(grown, "a", encoding="utf-8") as f:
        f.write("\n = New article = \n\n more text \n")
    with pytest.raises(BertforgeError, match="source_bytes"):
        prepare(make_cfg([str(grown)], minilm, tmp_path / "out2"))
    summary = prepare(make_cfg(small, str(tmp_path / "tok"), tmp_path / "out", overwrite=True))
    assert summary["vocab_size"] == len(other) and summary["shards_skipped"] == 0
    assert PackedDataset(tmp_path / "out", fingerprint=other.fingerprint()).manifest["vocab_size"] == len(other)
    with pytest.raises(BertforgeError, match="another tokenizer"):
        PackedDataset(tmp_path / "out", fingerprint="0" * 64)


def test_big_vocabulary_uses_uint32_and_rejects_explicit_uint16(corpus, minilm, tmp_path):
    vocab = (tmp_path / "vocab.txt")
    base = open(os.path.join(minilm, "vocab.txt"), encoding="utf-8").read().splitlines()
    vocab.write_text("\n".join(base + [f"[extra{i}]" for i in range(40_000)]) + "\n", encoding="utf-8")
    with pytest.raises(BertforgeError, match="uint16 cannot hold a vocabulary of 70522"):
        prepare(make_cfg(corpus[:1], str(vocab), tmp_path / "o", dtype="uint16"))
    summary = prepare(make_cfg(corpus[:1], str(vocab), tmp_path / "o"))
    ds = PackedDataset(tmp_path / "o")
    assert summary["dtype"] == "uint32" and ds.rows(np.arange(3)).dtype == np.uint32
    assert (tmp_path / "o" / "train_00000.bin").stat().st_size == 300 * SEQ * 4


def test_jsonl_records_are_documents(corpus, minilm, tmp_path):
    docs = list(iter_documents(corpus[:1], boundary="heading"))[:6]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    summary = prepare(make_cfg([str(src)], minilm, tmp_path / "o", text_field="body", boundary="blank",
                               val_fraction=0.0))
    tok = WordPieceTokenizer.from_pretrained(minilm)
    lengths = [len(e.input_ids) for e in tok.encode_batch(docs, add_special_tokens=False, truncation=False,
                                                          max_length=10**7)]
    assert summary["documents"] == 6 and summary["tokens"] == sum(lengths)
    assert summary["sequences"] == -(-(sum(lengths) + 5) // (SEQ - 2))  # 5 separators, last row padded
    with pytest.raises(BertforgeError, match="no field 'text'"):
        prepare(make_cfg([str(src)], minilm, tmp_path / "o3"))


def test_cli_runner_prints_summary(corpus, minilm, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    args = parser.parse_args([corpus[0], "--tokenizer", minilm, "-o", str(tmp_path), "--seq-len", "32",
                              "--num-workers", "0", "--no-progress", "--boundary", "heading"])
    assert run_prepare(args) == 0
    out = capsys.readouterr().out
    total = json.loads((tmp_path / "manifest.json").read_text())["sequences"]
    assert "fill rate" in out and f"{total:,}" in out


# ----------------------------------------------------------------------------- loader


def test_loader_deterministic_and_resumes_exactly(packed):
    ds = PackedDataset(packed[0], "train")
    loader = ShardLoader(ds, batch_size=16, seed=3)
    epoch0 = [b.copy() for b in loader]
    assert len(epoch0) == len(ds) // 16 and all(b.shape == (16, SEQ) for b in epoch0)
    again = [b.copy() for b in ShardLoader(ds, batch_size=16, seed=3)]
    assert all((a == b).all() for a, b in zip(epoch0, again))
    assert not all((a == b).all() for a, b in zip(epoch0, ShardLoader(ds, batch_size=16, seed=4)))
    seen = np.concatenate([loader.indices(0, k) for k in range(len(loader))])
    assert len(np.unique(seen)) == len(seen) == len(loader) * 16
    np.testing.assert_array_equal(epoch0[2], ds.rows(loader.indices(0, 2)))
    full = ShardLoader(ds, batch_size=16, seed=3)
    stream = [b.copy() for _ in range(2) for b in full]  # two epochs uninterrupted
    cut = ShardLoader(ds, batch_size=16, seed=3)
    it = iter(cut)
    head = [next(it).copy() for _ in range(5)]
    state = json.loads(json.dumps(cut.state_dict()))
    resumed = ShardLoader(ds, batch_size=16, seed=3)
    resumed.load_state_dict(state)
    tail = [b.copy() for b in resumed] + [b.copy() for b in resumed]
    assert len(head) + len(tail) == len(stream)
    assert all((a == b).all() for a, b in zip(head + tail, stream))
    with pytest.raises(BertforgeError, match="batch_size 16 -> 8"):
        ShardLoader(ds, batch_size=8, seed=3).load_state_dict(state)


def test_ddp_ranks_disjoint_covering_and_match_single_process(packed):
    ds = PackedDataset(packed[0], "train")
    ranks = [ShardLoader(ds, batch_size=8, seed=1, rank=r, world_size=2) for r in range(2)]
    single = [b for b in ShardLoader(ds, batch_size=8, seed=1)]
    per_rank = [[b for b in loader] for loader in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ds) // 16
    for k in range(len(per_rank[0])):
        np.testing.assert_array_equal(per_rank[0][k], single[2 * k])
        np.testing.assert_array_equal(per_rank[1][k], single[2 * k + 1])
    idx = [np.concatenate([lo.indices(0, k) for k in range(len(lo))]) for lo in ranks]
    assert not set(idx[0]) & set(idx[1])
    evals = [ShardLoader(ds, 8, rank=r, world_size=2, shuffle=False, drop_last=False) for r in range(2)]
    covered = np.concatenate([lo.indices(0, k) for lo in evals for k in range(len(lo))])
    assert sorted(covered.tolist()) == list(range(len(ds)))


def test_dataset_errors(tmp_path, packed):
    with pytest.raises(BertforgeError, match="no manifest.json"):
        PackedDataset(tmp_path)
    with pytest.raises(BertforgeError, match="has no rows"):
        PackedDataset(packed[0], "test")
    ds = PackedDataset(packed[0], "val")
    assert ds[0].shape == (SEQ,) and (ds[-1] == ds.rows([len(ds) - 1])[0]).all()
    with pytest.raises(BertforgeError, match="fewer than one global batch"):
        ShardLoader(ds, batch_size=len(ds) + 1)
