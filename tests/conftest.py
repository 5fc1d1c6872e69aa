"""Shared fixtures: the shared data folder (skips cleanly when absent), shards the tests make themselves, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BERTFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The `../shared/data` folder; tests that need it skip where it is absent (a user's machine)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A 1,000-token WordPiece trained on 400 kB of this Python's standard-library docstrings (text every
    machine has, so the resume, DDP, FSDP and CLI tests run on a user's clone without ../shared) and
    64-token packed shards of it (train + val)."""
    from bertforge.data.corpus import CorpusLines, write_python_docs_corpus
    from bertforge.data.shards import PrepareConfig, prepare
    from bertforge.wordpiece import train_wordpiece

    root = tmp_path_factory.mktemp("pretrain")
    corpus = write_python_docs_corpus(root / "corpus.txt", max_bytes=400_000)
    tok = train_wordpiece(CorpusLines([corpus]), vocab_size=1000, show_progress=False)
    tok.save(root / "tok")
    prepare(PrepareConfig(sources=[str(corpus)], output=str(root / "data"), tokenizer=str(root / "tok"),
                          seq_len=64, val_fraction=0.05, num_workers=0, show_progress=False))
    return root / "data"


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """Tiny saved models of every head the API and server use (tests/test_serve_support.py)."""
    from test_serve_support import tiny_models

    return tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def models(paths) -> dict:
    """The `paths` models loaded through `bertforge.load`, by name."""
    import bertforge

    return {k: bertforge.load(v, name=k) for k, v in paths.items()}
