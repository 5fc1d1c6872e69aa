"""Raw text in -> documents (and plain lines for tokenizer training), streamed in bounded memory.

Sources, given as one path/name or a list of them:

- a text file (UTF-8, optional BOM) or a gzip file ending in `.gz`;
- a folder: every non-hidden file below it, recursively, in sorted path order;
- a JSON-lines file (`.jsonl`, `.jsonl.gz`): the `text_field` of each record;
- a Hugging Face dataset `hub:NAME[:CONFIG][:SPLIT]` (default split `train`), streamed with the
  optional `datasets` package (`pip install bertforge[hub]`).

Document boundaries (`boundary=`) for files: `"blank"` = documents separated by blank lines, a
document's non-empty lines joined with "\\n"; `"line"` = one document per non-empty line;
`"heading"` = a WikiText-style top-level heading line ` = Title = ` starts a new document (blank lines
are ignored); the heading markup is removed and the title is kept as the document's first line, as are
the texts of ` = = Section = = ` sub-headings. The shared pretraining files (` = Title = `, one
paragraph per line, a blank line between articles) read the same way with "blank" and "heading",
except for the title markup. For records (jsonl, hub) one record is one document in "blank" mode
(its lines joined with "\\n"), each non-empty line is one in "line" mode, and "heading" splits the
stream of all records' lines at headings (for WikiText-style datasets stored one line per record).
Lines are stripped of surrounding whitespace.

Files are sniffed in their first 64 KiB: NUL bytes or invalid UTF-8 mean a binary file and a
`BertforgeError`; so do a source without any text, a missing path, and invalid UTF-8 or a corrupt gzip
stream found later. `python_docs_corpus` is the default offline corpus for `bertforge quickstart`.
"""

from __future__ import annotations

import ast
import codecs
import gzip
import io
import json
import os
import re
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from bertforge.atomic import atomic_open
from bertforge.errors import BertforgeError

Source = str | os.PathLike
BOUNDARIES = ("blank", "line", "heading")
HUB_PREFIX = "hub:"
SNIFF_BYTES = 64 * 1024
MAX_DOCUMENT_CHARS = 16_000_000  # guard for "blank"/"heading" on files without boundaries
_TITLE = re.compile(r"^= (?!=)(.*?) =$")  # ` = Title = ` (stripped), not ` = = Section = = `
_SUBHEADING = re.compile(r"^(?:= )+(.*?)(?: =)+$")
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})


def iter_documents(
    sources: Source | Iterable[Source],
    *,
    boundary: str = "blank",
    text_field: str = "text",
    min_chars: int = 1,
) -> Iterator[str]:
    """Yield the documents of `sources` in order; documents shorter than `min_chars` are dropped."""
    if boundary not in BOUNDARIES:
        raise BertforgeError(f"corpus boundary {boundary!r} is unknown: use one of {', '.join(BOUNDARIES)}")
    specs = _resolve(sources)
    return _documents(specs, boundary, text_field, min_chars)


def iter_lines(sources: Source | Iterable[Source], *, text_field: str = "text") -> Iterator[str]:
    """Yield the non-empty stripped lines of `sources` (tokenizer training input)."""
    specs = _resolve(sources)
    return _lines(specs, text_field)


class CorpusLines:
    """The lines of `sources` as an iterable that can be read more than once (WordPiece training reads
    its input two or three times); every source is checked when this is built."""

    def __init__(self, sources: Source | Iterable[Source], *, text_field: str = "text"):
        self.specs, self.text_field = _resolve(sources), text_field

    def __iter__(self) -> Iterator[str]:
        return _lines(self.specs, self.text_field)


def _documents(
    specs: list[tuple[str, list[str]]], boundary: str, text_field: str, min_chars: int
) -> Iterator[str]:
    for name, files in specs:
        count = 0
        for doc in _source_documents(files, boundary, text_field):
            if len(doc) >= min_chars:
                count += 1
                yield doc
        if count == 0:
            extra = f" of at least {min_chars} characters" if min_chars > 1 else ""
            raise BertforgeError(f"corpus source '{name}' has no documents{extra}: pass a source with text")


def _lines(specs: list[tuple[str, list[str]]], text_field: str) -> Iterator[str]:
    for name, files in specs:
        count = 0
        for path in files:
            for text in _raw_texts(path, text_field):
                for line in text.splitlines():
                    line = line.strip()
                    if line:
                        count += 1
                        yield line
        if count == 0:
            raise BertforgeError(f"corpus source '{name}' has no text: pass a source with text")


def _source_documents(files: list[str], boundary: str, text_field: str) -> Iterator[str]:
    for path in files:
        if _is_records(path):
            if boundary == "heading":
                lines = (ln for rec in _raw_texts(path, text_field) for ln in rec.splitlines())
                yield from _split(lines, boundary, path)
            else:
                for text in _raw_texts(path, text_field):
                    yield from _split(text.splitlines(), "line" if boundary == "line" else "record", path)
        else:
            yield from _split(_text_lines(path), boundary, path)


def _split(lines: Iterable[str], boundary: str, where: str) -> Iterator[str]:
    """Group lines into documents; boundary "record" joins all lines into one document."""
    buf: list[str] = []
    size = 0
    for raw in lines:
        line = raw.strip()
        if boundary == "line":
            if line:
                yield line
            continue
        if boundary == "heading" and line:
            title = _TITLE.match(line)
            if title:
                if buf:
                    yield "\n".join(buf)
                buf, size = [], 0
            heading = title or _SUBHEADING.match(line)
            line = heading.group(1).strip() if heading else line
        if line:
            buf.append(line)
            size += len(line) + 1
            if size > MAX_DOCUMENT_CHARS:
                raise BertforgeError(
                    f"a document in '{where}' exceeds {MAX_DOCUMENT_CHARS:,} characters with boundary="
                    f"'{boundary}': separate documents (blank lines / headings) or use boundary='line'"
                )
        elif boundary == "blank" and buf:
            yield "\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n".join(buf)


# ----------------------------------------------------------------------------- sources


def _resolve(sources: Source | Iterable[Source]) -> list[tuple[str, list[str]]]:
    """Check every source now and expand folders: [(name, [file or hub spec, ...]), ...]."""
    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not items:
        raise BertforgeError("corpus sources are empty: pass at least one file, folder or hub:NAME")
    specs = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise BertforgeError(f"corpus source {item!r} is not a path: pass file/folder paths or hub:NAME")
        name = os.fspath(item)
        if name.startswith(HUB_PREFIX):
            _parse_hub(name)
            specs.append((name, [name]))
        elif os.path.isdir(name):
            files = _walk(name)
            if not files:
                raise BertforgeError(
                    f"corpus folder '{name}' has no (non-hidden) files: add text files to it"
                )
            specs.append((name, files))
        elif os.path.isfile(name):
            specs.append((name, [name]))
        else:
            raise BertforgeError(f"corpus path '{name}' does not exist: pass an existing file or folder")
    return specs


def _walk(folder: str) -> list[str]:
    """Non-hidden files below `folder`, sorted by their path parts (a.txt < b/z.txt < c.txt)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, f) for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: Path(p).relative_to(folder).parts)


def _is_records(path: str) -> bool:
    return path.startswith(HUB_PREFIX) or path.endswith((".jsonl", ".jsonl.gz"))


def _open_binary(path: str) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _text_lines(path: str) -> Iterator[str]:
    """Stream the lines of a UTF-8 (optionally gzipped) file after sniffing its first block."""
    try:
        with _open_binary(path) as raw:
            head = raw.read(SNIFF_BYTES)
            _check_text(head, path)
            raw.seek(0)
            with io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict") as text:
                yield from text
    except UnicodeDecodeError as exc:
        raise BertforgeError(
            f"corpus file '{path}' is not valid UTF-8 (byte {exc.start} of a block): convert it to UTF-8 text"
        ) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise BertforgeError(
            f"corpus file '{path}' is not a valid gzip file ({exc}): re-create it or drop the .gz suffix"
        ) from None


def _check_text(head: bytes, path: str) -> None:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        binary = b"\x00" in head
    except UnicodeDecodeError:
        binary = True
    if binary:
        raise BertforgeError(
            f"corpus file '{path}' looks binary (NUL bytes or invalid UTF-8 in its first "
            "64 KiB): pass UTF-8 text, .gz text or .jsonl files"
        )


def _raw_texts(path: str, text_field: str) -> Iterator[str]:
    """The texts of a source: record texts for jsonl/hub, else the whole-file line stream as lines."""
    if path.startswith(HUB_PREFIX):
        yield from _hub_texts(path, text_field)
    elif _is_records(path):
        for lineno, line in enumerate(_text_lines(path), 1):
            if line.strip():
                yield _record_text(_parse_json(line, path, lineno), text_field, f"{path}:{lineno}")
    else:
        yield from _text_lines(path)


def _parse_json(line: str, path: str, lineno: int) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise BertforgeError(
            f"corpus file '{path}' line {lineno} is not valid JSON ({exc.msg}): "
            "write one JSON object per line"
        ) from None


def _record_text(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise BertforgeError(
            f"record at '{where}' has no field {text_field!r} (has {keys}): "
            "pass text_field= naming the text column"
        )
    value = record[text_field]
    if not isinstance(value, str):
        raise BertforgeError(
            f"record at '{where}' field {text_field!r} is {type(value).__name__}, not text: "
            "pass text_field= naming a string column"
        )
    return value


def _parse_hub(spec: str) -> tuple[str, str | None, str]:
    parts = spec[len(HUB_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts[1:]):
        raise BertforgeError(
            f"hub source '{spec}' is malformed: write hub:NAME, hub:NAME:CONFIG or hub:NAME:CONFIG:SPLIT"
        )
    config = parts[1] if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    return parts[0], config, split


def _hub_texts(spec: str, text_field: str) -> Iterator[str]:
    name, config, split = _parse_hub(spec)
    try:
        import datasets
    except ImportError:
        raise BertforgeError(
            f"hub source '{spec}' needs the Hugging Face `datasets` package: pip install bertforge[hub]"
        ) from None
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # network, unknown name/config/split: report, never fall back
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BertforgeError(
            f"hub source '{spec}' could not be opened ({first}): check the name, config, "
            "split and your network"
        ) from exc
    for index, record in enumerate(stream):
        yield _record_text(record, text_field, f"{spec}#{index}")


# ----------------------------------------------------------------------------- quickstart corpus


def python_docs_corpus(max_bytes: int | None = None) -> Iterator[str]:
    """Yield one document per standard-library module: its docstrings, prose string literals and
    comment blocks in source order, one paragraph per line.

    Files are parsed with `ast`, never imported, in sorted path order (deterministic for one Python
    install); test/, tests/, idlelib/ and site-packages/ are skipped. Docstrings alone are ~1.7 MB
    on CPython 3.11, so prose literals (>= 6 words, mostly words, e.g. pydoc's topic texts) and
    full-line comment blocks are included to give ~3 MB of English. With `max_bytes`, stops (at a
    line boundary) before the UTF-8 total would exceed it.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_files(root)
    if not files:
        raise BertforgeError(
            f"no Python standard-library sources found under '{root}': install Python "
            "with its .py files or pass your own corpus"
        )
    total, seen = 0, set()
    for path in files:
        doc = _module_text(path, seen)
        if not doc:
            continue
        size = len(doc.encode("utf-8")) + 1
        if max_bytes is not None and total + size > max_bytes:
            lines, room = [], max_bytes - total
            for line in doc.split("\n"):
                room -= len(line.encode("utf-8")) + 1
                if room < 0:
                    break
                lines.append(line)
            if lines:
                yield "\n".join(lines)
            return
        total += size
        yield doc


def write_python_docs_corpus(path: Source, *, max_bytes: int | None = None) -> Path:
    """Write `python_docs_corpus` to a text file (documents separated by blank lines; read it back with
    boundary="blank"), atomically; returns the path."""
    path = Path(path)
    with atomic_open(path, "w", encoding="utf-8") as out:
        for doc in python_docs_corpus(max_bytes):
            out.write(doc + "\n\n")
    return path


def _stdlib_files(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in STDLIB_SKIP_DIRS)
        found.extend(
            Path(folder, f)
            for f in sorted(files)
            if f.endswith(".py") and not f.startswith((".", "_sysconfigdata"))
        )
    return found


def _module_text(path: Path, seen: set[str]) -> str:
    """Documentation text of one module, paragraphs unwrapped to one line; repeats are dropped."""
    source = path.read_bytes()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a stdlib file for another Python version: not our input
        return ""
    blocks = _string_blocks(tree) + _comment_blocks(source.decode("utf-8", "replace"), tree)
    paragraphs = []
    for _, text in sorted(blocks, key=lambda b: b[0]):
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if para and para not in seen:
                if len(para) >= 60:
                    seen.add(para)
                paragraphs.append(para)
    return "\n".join(paragraphs)


def _string_blocks(tree: ast.Module) -> list[tuple[int, str]]:
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    blocks = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in docstrings or _is_prose(node.value, min_words=6, ratio=0.7):
                blocks.append((node.lineno, node.value))
    return blocks


def _comment_blocks(source: str, tree: ast.Module) -> list[tuple[int, str]]:
    """Runs of full-line `#` comments outside string literals, as (first line, text)."""
    in_string = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.end_lineno:
            in_string.update(range(node.lineno, node.end_lineno + 1))
    blocks, run, start = [], [], 0
    for lineno, line in enumerate(source.splitlines() + [""], 1):
        stripped = line.strip()
        if stripped.startswith("#") and lineno not in in_string and not stripped.startswith(("#!", "# -*-")):
            start = start or lineno
            run.append(stripped.lstrip("#").strip(" -=*"))
            continue
        text = "\n".join(run)
        if run and _is_prose(text, min_words=3, ratio=0.5):
            blocks.append((start, text))
        run, start = [], 0
    return blocks


def _is_prose(text: str, *, min_words: int, ratio: float) -> bool:
    words = text.split()
    if len(words) < min_words:
        return False
    plain = sum(w.strip(".,;:!?()'\"`").isalpha() for w in words)
    return plain >= ratio * len(words)
