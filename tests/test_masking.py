"""Dynamic MLM masking: rate, 80/10/10 split, specials untouched, whole words, determinism, collator."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from bertforge.data.masking import (
    IGNORE_INDEX,
    MaskingConfig,
    MLMCollator,
    mask_tokens,
    random_token_pool,
    word_start_table,
)
from bertforge.errors import BertforgeError

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = [PAD, UNK, CLS, SEP, MASK]
V = 5000
PIECE_FROM = 2500  # ids >= this are "##" continuation pieces in the synthetic vocabulary
B, T = 1600, 128  # 204,800 positions, ~150k real tokens


@lru_cache(maxsize=1)
def synthetic_tokens() -> tuple[str, ...]:
    return ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") + tuple(
        f"w{i}" if i < PIECE_FROM else f"##p{i}" for i in range(5, V)
    )


@lru_cache(maxsize=4)
def _packed_rows(seed: int, whole_words: bool) -> np.ndarray:
    """(B, T) uint16 rows: [CLS] doc [SEP] (doc [SEP])... [PAD]...; with whole_words, words of 1-4 pieces."""
    rng = np.random.default_rng(seed)
    rows = np.full((B, T), PAD, dtype=np.uint16)
    for b in range(B):
        length = int(rng.integers(16, T + 1))
        if whole_words:
            pieces = []
            while len(pieces) < length:
                pieces.append(int(rng.integers(5, PIECE_FROM)))
                pieces += [int(x) for x in rng.integers(PIECE_FROM, V, size=int(rng.integers(0, 4)))]
            body = np.array(pieces[:length])
            if b % 7 == 0:
                body[1] = int(rng.integers(PIECE_FROM, V))  # a word cut by packing: "##" right after [CLS]
        else:
            body = rng.integers(5, V, size=length)
        body[0] = CLS
        body[-1] = SEP
        if length > 40 and b % 3 == 0:
            body[length // 2] = SEP  # two packed documents
        rows[b, :length] = body
    return rows


def packed_rows(seed: int = 0, whole_words: bool = False) -> np.ndarray:
    rows = _packed_rows(seed, whole_words)
    rows.flags.writeable = False  # cached: shared between tests
    return rows


def count_expected(rows: np.ndarray, rate: float) -> np.ndarray:
    maskable = ~np.isin(rows, SPECIALS)
    return np.array([round(rate * n) for n in maskable.sum(axis=1)])


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return packed_rows()


def collate(rows, cfg: MaskingConfig, seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    starts = word_start_table(synthetic_tokens()) if cfg.whole_word else None
    return MLMCollator(V, MASK, PAD, SPECIALS, cfg, sep_token_id=SEP, word_starts=starts, seed=seed, **kw)(rows)


def test_fixed_count_is_exact_per_sequence(rows):
    out = collate(rows, MaskingConfig(mlm_probability=0.15))
    masked = (out["labels"] != IGNORE_INDEX).sum(dim=1).numpy()
    np.testing.assert_array_equal(masked, count_expected(rows, 0.15))
    maskable = (~np.isin(rows, SPECIALS)).sum()
    assert abs(masked.sum() / maskable - 0.15) < 0.002


@pytest.mark.parametrize("rate", [0.15, 0.3])
def test_bernoulli_rate(rows, rate):
    out = collate(rows, MaskingConfig(mlm_probability=rate, sampling="bernoulli"))
    maskable = (~np.isin(rows, SPECIALS)).sum()
    got = (out["labels"] != IGNORE_INDEX).sum().item() / maskable
    sigma = (rate * (1 - rate) / maskable) ** 0.5
    assert abs(got - rate) < 5 * sigma
    per_row = (out["labels"] != IGNORE_INDEX).sum(dim=1).numpy()
    assert (per_row != count_expected(rows, rate)).any()  # really independent draws, not a fixed count


@pytest.mark.parametrize("sampling", ["fixed", "bernoulli"])
def test_80_10_10_split_and_labels(rows, sampling):
    out = collate(rows, MaskingConfig(sampling=sampling))
    original = torch.from_numpy(rows.astype(np.int64))
    sel = out["labels"] != IGNORE_INDEX
    assert torch.equal(out["labels"][sel], original[sel])  # labels hold the original ids
    assert torch.equal(out["input_ids"][~sel], original[~sel])  # unselected positions untouched
    new = out["input_ids"][sel]
    n = sel.sum().item()
    as_mask = (new == MASK).float().mean().item()
    kept = (new == original[sel]).float().mean().item()  # includes 1/(V-5) random picks of the same id
    randomised = 1 - as_mask - kept
    tol = 5 * (0.8 * 0.2 / n) ** 0.5
    assert abs(as_mask - 0.8) < tol
    assert abs(randomised - 0.1) < 5 * (0.1 * 0.9 / n) ** 0.5
    assert abs(kept - 0.1) < 5 * (0.1 * 0.9 / n) ** 0.5
    swapped = new[(new != MASK) & (new != original[sel])]
    assert swapped.min() >= 5 and swapped.max() < V  # random tokens never special, always in vocab


def test_split_follows_config(rows):
    out = collate(rows, MaskingConfig(mlm_probability=0.2, mask_replace=1.0, random_replace=0.0))
    sel = out["labels"] != IGNORE_INDEX
    assert (out["input_ids"][sel] == MASK).all()


@pytest.mark.parametrize("whole_word", [False, True])
def test_specials_and_padding_never_masked(whole_word):
    rows = packed_rows(seed=1, whole_words=whole_word)
    cfg = MaskingConfig(mlm_probability=0.5, whole_word=whole_word, sampling="bernoulli")
    out = collate(rows, cfg)
    special = torch.from_numpy(np.isin(rows, SPECIALS))
    assert (out["labels"][special] == IGNORE_INDEX).all()
    assert torch.equal(out["input_ids"][special], torch.from_numpy(rows.astype(np.int64))[special])
    assert torch.equal(out["attention_mask"], torch.from_numpy((rows != PAD).astype(np.int64)))


def word_groups(row: np.ndarray) -> list[list[int]]:
    """Reference grouping in plain Python: a word = a non-"##" token plus the "##" pieces after it."""
    groups: list[list[int]] = []
    for t, tok in enumerate(row):
        if tok in SPECIALS:
            continue
        if tok >= PIECE_FROM and groups and groups[-1][-1] == t - 1:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


@pytest.mark.parametrize("sampling", ["fixed", "bernoulli"])
def test_whole_word_groups_all_or_nothing(sampling):
    rows = packed_rows(seed=2, whole_words=True)
    out = collate(rows, MaskingConfig(whole_word=True, sampling=sampling))
    labelled = (out["labels"] != IGNORE_INDEX).numpy()
    chosen_words = total_words = multi_piece_chosen = 0
    for b in range(B):
        groups = word_groups(rows[b])
        picked = [labelled[b, g] for g in groups]
        assert all(p.all() or not p.any() for p in picked)
        chosen = sum(bool(p.all()) for p in picked)
        if sampling == "fixed":
            assert chosen == round(0.15 * len(groups))
        chosen_words += chosen
        total_words += len(groups)
        multi_piece_chosen += sum(bool(p.all()) and len(p) > 1 for p in picked)
    assert abs(chosen_words / total_words - 0.15) < 0.01
    assert multi_piece_chosen > 1000  # the grouping is really exercised
    token_rate = labelled.sum() / (~np.isin(rows, SPECIALS)).sum()
    assert abs(token_rate - 0.15) < 0.01  # expected token share stays the configured rate


def test_mask_tokens_direct_whole_word_and_determinism():
    ids = torch.tensor([[CLS, 10, 3000, 3001, 11, 12, 3002, SEP, PAD]])
    special = torch.isin(ids, torch.tensor(SPECIALS))
    starts = ids < PIECE_FROM
    cfg = MaskingConfig(mlm_probability=0.5, whole_word=True)
    outs = [mask_tokens(ids, special, V, MASK, cfg, torch.Generator().manual_seed(s), starts,
                        special_ids=SPECIALS) for s in range(20)]
    for _, labels in outs:
        sel = (labels != IGNORE_INDEX)[0]
        assert sel[2] == sel[3] == sel[1] and sel[5] == sel[6]  # words [10 ##a ##b], [12 ##c]
        assert sel.sum() in (1, 2, 3, 4, 5)  # round(0.5 * 4 words) = 2 words
    again = mask_tokens(ids, special, V, MASK, cfg, torch.Generator().manual_seed(3), starts, special_ids=SPECIALS)
    assert torch.equal(again[0], outs[3][0]) and torch.equal(again[1], outs[3][1])


def test_determinism_and_state_round_trip(rows):
    cfg = MaskingConfig(whole_word=True)
    tokens = synthetic_tokens()
    a = MLMCollator(V, MASK, PAD, SPECIALS, cfg, word_starts=word_start_table(tokens), seed=7)
    b = MLMCollator(V, MASK, PAD, SPECIALS, cfg, word_starts=word_start_table(tokens), seed=7)
    c = MLMCollator(V, MASK, PAD, SPECIALS, cfg, word_starts=word_start_table(tokens), seed=8)
    first_a, first_b, first_c = a(rows), b(rows), c(rows)
    assert all(torch.equal(first_a[k], first_b[k]) for k in first_a)
    assert not torch.equal(first_a["labels"], first_c["labels"])
    state = a.state_dict()
    second_a = a(rows)
    assert not torch.equal(second_a["labels"], first_a["labels"])  # masks are dynamic across batches
    c.load_state_dict(state)
    second_c = c(rows)
    assert all(torch.equal(second_a[k], second_c[k]) for k in second_a)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_collator_shapes_dtypes(dtype, rows):
    small = rows[:8].astype(dtype)
    for batch in (small, list(small)):
        out = collate(batch, MaskingConfig())
        assert set(out) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        for v in out.values():
            assert v.dtype == torch.long and v.shape == (8, T)
        assert (out["token_type_ids"] == 0).all()  # packed rows are one segment


def test_collator_nsp_pairs_and_token_types():
    pair = np.array([CLS, 10, 11, SEP, 12, 13, 14, SEP, PAD, PAD], dtype=np.uint16)
    batch = [{"input_ids": pair, "next_sentence_label": 1}, {"input_ids": pair, "next_sentence_label": 0}]
    out = collate(batch, MaskingConfig())
    assert out["next_sentence_label"].tolist() == [1, 0] and out["next_sentence_label"].dtype == torch.long
    assert out["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    given = np.array([0, 0, 1, 1, 1, 1, 1, 1, 0, 0])
    out = collate([{"input_ids": pair, "token_type_ids": given, "next_sentence_label": 1}], MaskingConfig())
    assert out["token_type_ids"][0].tolist() == given.tolist()


def test_from_tokenizer_duck_typed():
    class Tok:
        vocab_size, mask_token_id, pad_token_id, sep_token_id = V, MASK, PAD, SEP
        special_ids = frozenset(SPECIALS)

        def convert_ids_to_tokens(self, ids):
            return [synthetic_tokens()[i] for i in ids]

    col = MLMCollator.from_tokenizer(Tok(), MaskingConfig(whole_word=True), seed=1)
    assert col.word_starts[10] and not col.word_starts[PIECE_FROM]
    out = col(packed_rows(seed=3, whole_words=True)[:16])
    assert out["labels"].shape == (16, T)


def test_random_pool_excludes_specials():
    pool = random_token_pool(10, [0, 3, 9])
    assert pool.tolist() == [1, 2, 4, 5, 6, 7, 8]


def test_bad_inputs_raise():
    with pytest.raises(BertforgeError, match="mlm_probability"):
        MaskingConfig(mlm_probability=1.5)
    with pytest.raises(BertforgeError, match="mask_replace"):
        MaskingConfig(mask_replace=0.9, random_replace=0.2)
    with pytest.raises(BertforgeError, match="sampling"):
        MaskingConfig(sampling="poisson")
    with pytest.raises(BertforgeError, match="word starts"):
        MLMCollator(V, MASK, PAD, SPECIALS, MaskingConfig(whole_word=True))
    col = MLMCollator(V, MASK, PAD, SPECIALS)
    with pytest.raises(BertforgeError, match="lengths"):
        col([np.array([CLS, 5, SEP]), np.array([CLS, SEP])])
    with pytest.raises(BertforgeError, match="outside the vocabulary"):
        col(np.array([[CLS, V + 3, SEP]], dtype=np.uint16))
