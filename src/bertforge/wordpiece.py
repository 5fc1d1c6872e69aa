"""WordPiece tokenizer: train, load, save and encode, built on Hugging Face `tokenizers`.

`WordPieceTokenizer` wraps one `tokenizers.Tokenizer` assembled exactly like BERT's: BertNormalizer
(clean text, CJK spacing, optional lowercase / accent stripping), BertPreTokenizer, a WordPiece model
with the `##` continuing prefix, TemplateProcessing `[CLS] A [SEP] B [SEP]` with token types 0/1 and
the WordPiece decoder. The five special tokens are registered as added tokens, so `[MASK]` written in
a text stays one token, as in `transformers`. The pipeline is always rebuilt from (vocab, settings),
whether the source was `vocab.txt` + `tokenizer_config.json` or a `tokenizer.json`, so every loaded
tokenizer behaves the same; `save` writes files `transformers.BertTokenizerFast` loads unchanged.

`backend` never truncates or pads (callers may use it directly on hot paths); truncating encodes go
through a private copy whose truncation setting changes per call, so one tokenizer object should not
be shared between threads that encode with different truncation settings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers import Encoding as _BackendEncoding
from tqdm import tqdm

from bertforge.errors import BertforgeError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 when training
_SPECIAL_KEYS = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
TRUNCATION = ("longest_first", "only_second", False)
TRAIN_BATCH_LINES = 1000
MAX_INPUT_CHARS_PER_WORD = 100
_CJK_RANGES = (  # BERT's "Chinese character" blocks: each such character is a word of its own
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip


@dataclass
class Encoding:
    input_ids: list[int]
    token_type_ids: list[int]
    attention_mask: list[int]  # all 1 (no padding at this level)
    offsets: list[tuple[int, int]]  # char spans into the source text; (0, 0) for specials
    special_tokens_mask: list[int]  # 1 at [CLS]/[SEP]
    word_ids: list[int | None]  # word index per token, None for specials
    sequence_ids: list[int | None]  # 0 for first text, 1 for pair, None for specials


@dataclass(frozen=True)
class _Settings:
    do_lower_case: bool = True
    strip_accents: bool | None = None
    tokenize_chinese_chars: bool = True
    clean_text: bool = True
    special: tuple[str, ...] = SPECIAL_TOKENS  # names in the order of _SPECIAL_KEYS


class WordPieceTokenizer:
    """A BERT WordPiece tokenizer; build with `from_pretrained` or `train_wordpiece`."""

    def __init__(self, vocab: Sequence[str], settings: _Settings = _Settings()) -> None:
        self._vocab = list(vocab)
        index = {tok: i for i, tok in enumerate(self._vocab)}
        if len(index) != len(self._vocab):
            dup = next(t for i, t in enumerate(self._vocab) if index[t] != i)
            raise BertforgeError(f"vocabulary has the token {dup!r} twice: remove the duplicate line")
        missing = [t for t in settings.special if t not in index]
        if missing:
            raise BertforgeError(f"vocabulary lacks the special tokens {missing}: use a BERT vocabulary "
                                 f"that contains {list(settings.special)}")
        self.do_lower_case = settings.do_lower_case
        self.strip_accents = settings.strip_accents
        self._settings = settings
        self.vocab_size = len(self._vocab)
        pad, unk, cls, sep, mask = (index[t] for t in settings.special)
        self.pad_token_id, self.unk_token_id, self.cls_token_id = pad, unk, cls
        self.sep_token_id, self.mask_token_id = sep, mask
        self.special_ids = frozenset((pad, unk, cls, sep, mask))
        self.backend = _build_backend(index, settings)
        self._truncating = Tokenizer.from_str(self.backend.to_str())  # reconfigured per call

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> WordPieceTokenizer:
        """Load a folder with tokenizer.json and/or vocab.txt (+ tokenizer_config.json), a vocab.txt or
        a tokenizer.json file."""
        path = Path(path)
        if path.is_dir():
            config_file = path / "tokenizer_config.json"
            config = _read_json(config_file) if config_file.is_file() else {}
            if (path / "tokenizer.json").is_file():
                return cls(*_from_tokenizer_json(path / "tokenizer.json", config))
            if (path / "vocab.txt").is_file():
                return cls(_read_vocab(path / "vocab.txt"), _settings_from_config(config))
            raise BertforgeError(f"tokenizer folder '{path}' has neither vocab.txt nor tokenizer.json: "
                                 "pass a folder written by `save` or a Hugging Face BERT model folder")
        if path.is_file() and path.suffix == ".json":
            return cls(*_from_tokenizer_json(path, {}))
        if path.is_file():
            return cls(_read_vocab(path), _Settings())
        raise BertforgeError(f"tokenizer path '{path}' does not exist: pass a tokenizer folder or vocab.txt")

    def save(self, directory: str | os.PathLike) -> None:
        """Write vocab.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json.

        A tokenizer knows no model, so tokenizer_config.json claims no `model_max_length`
        (transformers then treats the length as unlimited); saving beside a model sets it to the
        model's position count (`bertforge.model.export.set_model_max_length`).
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vocab.txt").write_text("".join(t + "\n" for t in self._vocab), encoding="utf-8")
        self.backend.save(str(out / "tokenizer.json"))
        special = dict(zip(_SPECIAL_KEYS, self._settings.special))
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.do_lower_case,
                  "strip_accents": self.strip_accents,
                  "tokenize_chinese_chars": self._settings.tokenize_chinese_chars,
                  "clean_up_tokenization_spaces": True, **special}
        _write_json(out / "tokenizer_config.json", config)
        _write_json(out / "special_tokens_map.json", special)

    def fingerprint(self) -> str:
        """Stable sha256 hex digest of the vocabulary and the normalization settings."""
        s = self._settings
        payload = json.dumps({"vocab": self._vocab, "do_lower_case": s.do_lower_case,
                              "strip_accents": s.strip_accents, "clean_text": s.clean_text,
                              "tokenize_chinese_chars": s.tokenize_chinese_chars,
                              "special": list(s.special), "prefix": "##"},
                             ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, pair: str | None = None, *, max_length: int = 512,
               truncation: str | bool = "longest_first", add_special_tokens: bool = True) -> Encoding:
        """Encode one text (or text pair); longer inputs are truncated to max_length tokens or, with
        truncation=False, rejected."""
        return self.encode_batch([text], None if pair is None else [pair], max_length=max_length,
                                 truncation=truncation, add_special_tokens=add_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
                     max_length: int = 512, truncation: str | bool = "longest_first",
                     add_special_tokens: bool = True) -> list[Encoding]:
        """Encode many texts (or pairs) in parallel in the Rust backend."""
        if isinstance(texts, str) or isinstance(pairs, str):
            raise BertforgeError("encode_batch got a single string: pass a list of texts or use encode()")
        backend = self._truncating_backend(max_length, truncation, pairs is not None)
        if pairs is not None and len(pairs) != len(texts):
            raise BertforgeError(f"encode_batch got {len(texts)} texts but {len(pairs)} pairs: "
                                 "pass one pair per text")
        inputs = list(texts) if pairs is None else list(zip(texts, pairs))
        try:
            raw = backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
        except Exception as exc:  # tokenizers raises plain Exception for truncation it cannot do
            raise BertforgeError(f"cannot encode to max_length={max_length} with truncation={truncation!r} "
                                 f"({exc}): raise max_length or use truncation='longest_first'") from None
        if truncation is False:
            for i, enc in enumerate(raw):
                if len(enc.ids) > max_length:
                    raise BertforgeError(
                        f"input {i} has {len(enc.ids)} tokens > max_length={max_length} with truncation=False: "
                        "shorten it, raise max_length or enable truncation")
        return [_to_encoding(enc) for enc in raw]

    def _truncating_backend(self, max_length: int, truncation: str | bool, has_pair: bool) -> Tokenizer:
        if truncation not in TRUNCATION:
            raise BertforgeError(f"truncation={truncation!r} is unknown: "
                                 "use 'longest_first', 'only_second' or False")
        if not isinstance(max_length, int) or max_length < 1:
            raise BertforgeError(f"max_length={max_length!r} is invalid: pass a positive integer")
        if truncation == "only_second" and not has_pair:
            raise BertforgeError("truncation='only_second' needs text pairs: "
                                 "pass pairs or use 'longest_first'")
        if truncation is False:
            return self.backend
        want = {"max_length": max_length, "stride": 0, "strategy": truncation, "direction": "right"}
        if self._truncating.truncation != want:
            self._truncating.enable_truncation(max_length, strategy=truncation)
        return self._truncating

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of `text`, without special tokens and without truncation."""
        return self.backend.encode(text, add_special_tokens=False).tokens

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        """Ids of `tokens`; tokens outside the vocabulary map to the [UNK] id."""
        lookup = self.backend.token_to_id
        return [self.unk_token_id if (i := lookup(t)) is None else i for t in tokens]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._vocab[i] for i in self._check_ids(ids)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`: `##` pieces glued to their word, spaces before punctuation cleaned up."""
        return self.backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise BertforgeError(f"token id {bad} is outside the vocabulary (size {self.vocab_size}): "
                                 "pass ids produced by this tokenizer")
        return ids

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"WordPieceTokenizer(vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case}, "
                f"strip_accents={self.strip_accents})")


def train_wordpiece(lines: Iterable[str], *, vocab_size: int = 30522, lowercase: bool = True,
                    strip_accents: bool | None = None, min_frequency: int = 2,
                    limit_alphabet: int | None = 1000, show_progress: bool = True) -> WordPieceTokenizer:
    """Train a WordPiece vocabulary on `lines`, with [PAD], [UNK], [CLS], [SEP], [MASK] as ids 0..4; the
    result is deterministic (see _alphabet). `lines` is read two or three times, so it must be re-iterable:
    a list of strings, or `bertforge.data.corpus.CorpusLines(paths)` to stream files."""
    if vocab_size <= len(SPECIAL_TOKENS):
        raise BertforgeError(f"vocab_size={vocab_size} is too small: it must exceed the "
                             f"{len(SPECIAL_TOKENS)} special tokens plus the alphabet (try >= 1000)")
    if iter(lines) is lines:
        raise BertforgeError("train_wordpiece reads its lines more than once, so a one-pass iterator cannot be "
                             "used: pass a list of lines or bertforge.data.corpus.CorpusLines(paths)")
    settings = _Settings(do_lower_case=lowercase, strip_accents=strip_accents)
    alphabet, continuing = _alphabet(lines, settings, limit_alphabet, show_progress)
    for _ in range(2):
        fixed = len(SPECIAL_TOKENS) + len(continuing) + len(alphabet)
        if fixed > vocab_size:
            raise BertforgeError(
                f"vocab_size={vocab_size} is smaller than the corpus alphabet ({fixed} tokens with special "
                "and ## tokens): raise vocab_size or lower limit_alphabet")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, limit_alphabet=len(alphabet),
            initial_alphabet=alphabet, show_progress=show_progress,
            special_tokens=[*SPECIAL_TOKENS, *continuing], continuing_subword_prefix="##")
        backend = _build_backend({t: i for i, t in enumerate(SPECIAL_TOKENS)}, settings)
        backend.train_from_iterator(_batches(iter(lines)), trainer=trainer)
        vocab = sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        tokens = [t for t, _ in vocab]
        unforeseen = {t for t in tokens if t.startswith("##") and len(t) == 3} - set(continuing)
        if not unforeseen:  # every ## piece had a fixed id: the merges are reproducible
            break
        continuing = sorted({*continuing, *unforeseen})  # rare (see _alphabet): train again with them fixed
    else:
        raise RuntimeError(f"WordPiece trainer keeps creating unforeseen ## pieces: {sorted(unforeseen)}")
    if [i for _, i in vocab] != list(range(len(vocab))) or tokens[:5] != list(SPECIAL_TOKENS):
        raise RuntimeError(f"tokenizers trainer returned an unexpected vocabulary layout: {vocab[:8]}")
    return WordPieceTokenizer(tokens, settings)


def _alphabet(lines: Iterable[str], settings: _Settings, limit: int | None, show_progress: bool = False
              ) -> tuple[list[str], list[str]]:
    """First, cheap pass: the alphabet (the `limit` most frequent normalized characters, ties by
    character) and the `##c` pieces the trainer will create, both sorted.

    The `tokenizers` trainer alone is not deterministic (huggingface/tokenizers#1794): it numbers new
    `##c` pieces in hash-map order, breaks ties between equally frequent merges by those numbers, and
    cuts the alphabet at `limit_alphabet` with arbitrary ties. Passing both lists up front (the
    alphabet as `initial_alphabet`, the pieces as extra special tokens) fixes every number. Word-inner
    characters are found on raw text (BERT breaks words at whitespace, punctuation and CJK characters)
    and then normalized per character, as BertNormalizer works per character; a character whose
    normalization is longer (e.g. a Hangul syllable decomposed) contributes its tail anywhere. Errors
    only add a few unused pieces; `train_wordpiece` retrains once if the trainer still made new ones.
    """
    counts: Counter[str] = Counter()
    inner: set[str] = set()
    table = _word_break_table()
    for line in tqdm(lines, desc="WordPiece alphabet", unit=" lines", disable=not show_progress):
        counts.update(line)
        inner.update("".join(word[1:] for word in line.translate(table).split()))
    normalizer = _build_backend({t: i for i, t in enumerate(SPECIAL_TOKENS)}, settings).normalizer
    normalize = normalizer.normalize_str
    normalized: Counter[str] = Counter()
    inner_normalized: set[str] = set()
    for char, n in counts.items():
        pieces = [c for c in normalize(char) if not c.isspace()]
        for c in pieces:
            normalized[c] += n
        inner_normalized.update(pieces if char in inner else pieces[1:])
    chars = sorted(normalized, key=lambda c: (-normalized[c], c))
    alphabet = sorted(chars[:limit] if limit is not None else chars)
    breaks = {c for c in alphabet if ord(c) in table or _is_cjk(c)}
    return alphabet, ["##" + c for c in alphabet if c in inner_normalized and c not in breaks]


@functools.lru_cache(maxsize=1)
def _word_break_table() -> dict[int, str]:
    """str.translate table sending BERT's word-break characters (ASCII punctuation, Unicode P*, CJK
    ideographs; whitespace is left to str.split) to a space."""
    punct = (i for i in range(0x20000) if unicodedata.category(chr(i)).startswith("P"))  # P* is in planes 0-1
    cjk = (i for a, b in _CJK_RANGES for i in range(a, b + 1))
    return dict.fromkeys([*map(ord, string.punctuation), *punct, *cjk], " ")


def _is_cjk(char: str) -> bool:
    return any(a <= ord(char) <= b for a, b in _CJK_RANGES)


# ---------------------------------------------------------------------- helpers


def _build_backend(index: dict[str, int], s: _Settings) -> Tokenizer:
    unk = s.special[1]
    tok = Tokenizer(models.WordPiece(index, unk_token=unk, continuing_subword_prefix="##",
                                     max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=s.clean_text, handle_chinese_chars=s.tokenize_chinese_chars,
        strip_accents=s.strip_accents, lowercase=s.do_lower_case)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = s.special[2], s.special[3]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, index[cls]), (sep, index[sep])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in s.special])
    return tok


def _to_encoding(enc: _BackendEncoding) -> Encoding:
    return Encoding(input_ids=enc.ids, token_type_ids=enc.type_ids, attention_mask=enc.attention_mask,
                    offsets=enc.offsets, special_tokens_mask=enc.special_tokens_mask, word_ids=enc.word_ids,
                    sequence_ids=enc.sequence_ids)


def _batches(lines: Iterator[str]) -> Iterator[list[str]]:
    while batch := list(islice(lines, TRAIN_BATCH_LINES)):
        yield batch


def _read_vocab(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
    except UnicodeDecodeError:
        raise BertforgeError(f"vocabulary file '{path}' is not UTF-8 text: pass a vocab.txt, "
                             "one token per line") from None
    if not tokens:
        raise BertforgeError(f"vocabulary file '{path}' is empty: pass a vocab.txt, one token per line")
    return tokens


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BertforgeError(f"tokenizer file '{path}' is not valid JSON ({exc}): re-create it") from None
    if not isinstance(data, dict):
        raise BertforgeError(f"tokenizer file '{path}' does not hold a JSON object: re-create it")
    return data


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _special_names(config: dict) -> tuple[str, ...]:
    names = []
    for key, default in zip(_SPECIAL_KEYS, SPECIAL_TOKENS):
        value = config.get(key, default)
        names.append(value.get("content", default) if isinstance(value, dict) else str(value))
    return tuple(names)


def _settings_from_config(config: dict) -> _Settings:
    return _Settings(do_lower_case=bool(config.get("do_lower_case", True)),
                     strip_accents=config.get("strip_accents"),
                     tokenize_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
                     special=_special_names(config))


def _from_tokenizer_json(path: Path, config: dict) -> tuple[list[str], _Settings]:
    data = _read_json(path)
    model, norm = data.get("model") or {}, data.get("normalizer") or {}
    if model.get("type") != "WordPiece" or norm.get("type") != "BertNormalizer":
        raise BertforgeError(f"tokenizer file '{path}' is not a BERT WordPiece tokenizer (model "
                             f"{model.get('type')}, normalizer {norm.get('type')}): pass a BERT tokenizer")
    index = model.get("vocab") or {}
    tokens = sorted(index, key=index.get)
    if [index[t] for t in tokens] != list(range(len(tokens))):
        raise BertforgeError(f"tokenizer file '{path}' has non-contiguous vocabulary ids: re-create it")
    settings = _Settings(do_lower_case=bool(norm.get("lowercase", True)),
                         strip_accents=norm.get("strip_accents"),
                         tokenize_chinese_chars=bool(norm.get("handle_chinese_chars", True)),
                         clean_text=bool(norm.get("clean_text", True)), special=_special_names(config))
    return tokens, settings
