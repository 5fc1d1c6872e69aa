"""What the routes share: settings, errors, the served models with their batchers, limits, JSON output.

`Server` holds the models by name (each a `Served`: the model and its `Batcher`), the settings and the
metrics, and one compute thread that every model's batches run on (on CPU, models running at once
would only fight over the same cores). `ApiError(status, message)` becomes an OpenAI-shaped error body.
"""

from __future__ import annotations

import asyncio
import base64
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from fastapi.responses import JSONResponse, Response

from bertforge.api import Model
from bertforge.errors import BertforgeError
from bertforge.model.pooling import TOKENS_PER_BATCH
from bertforge.serve.batcher import Batcher, QueueFull
from bertforge.serve.metrics import Metrics

INLINE_TEXTS = 64  # requests with more texts tokenize in a thread, not on the event loop


@dataclass
class ServeSettings:
    """Limits and switches of one server (the CLI flags of `bertforge serve`)."""

    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_batch_tokens: int | None = None  # default: 4096 per torch thread (two forwards per thread)
    max_wait_ms: float = 2.0
    max_queue_tokens: int = 262144
    max_texts: int = 2048  # texts per request
    max_chars: int = 100_000  # characters per text
    max_body_bytes: int = 8 << 20
    public_url: str | None = None  # logged at start


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_body(status: int, message: str) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 503: "overloaded_error"}.get(status)
    return {"error": {"message": message, "type": kind or ("invalid_request_error" if status < 500 else "server_error"),
                      "code": status}}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status, headers=headers)


# ----------------------------------------------------------------------------- the served models


class Served:
    """A model with its batcher; the runners are the `Model.run_*` steps."""

    def __init__(self, model: Model, executor, metrics: Metrics, settings: ServeSettings) -> None:
        self.model = model
        runners = {"embed": model.run_embed, "classify": model.run_classify, "qa": model.run_answer,
                   "fill_mask": self._fill_mask, "call": lambda calls: [c() for c in calls]}
        self.batcher = Batcher(model.name, runners, executor, metrics, max_batch_tokens=settings.max_batch_tokens,
                               max_wait_ms=settings.max_wait_ms, max_queue_tokens=settings.max_queue_tokens)

    def _fill_mask(self, rows: list) -> list:
        k = max(top_k for _, top_k in rows)
        out = self.model.run_fill_mask([row for row, _ in rows], k)
        return [[preds[:top_k] for preds in masks] for masks, (_, top_k) in zip(out, rows)]

    async def run(self, kind: str, rows: list, lengths: list[int]) -> list:
        try:
            return await self.batcher.submit(kind, rows, lengths)
        except QueueFull as exc:
            raise ApiError(503, f"{exc}: the server is at capacity", {"Retry-After": str(exc.retry_after)}) from None


class Server:
    """State shared by the routes: models by name, settings, metrics, the compute thread."""

    def __init__(self, models: dict[str, Model], settings: ServeSettings) -> None:
        if not models:
            raise BertforgeError("no model to serve: pass at least one model folder")
        if settings.max_batch_tokens is None:  # filled here, after --threads took effect; two forwards per
            # thread: a wider window to sort by length (+4% sentences/s over one, benchmarks/bench_serve.py)
            settings.max_batch_tokens = 2 * TOKENS_PER_BATCH * torch.get_num_threads()
        self.settings, self.metrics = settings, Metrics()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="bertforge-model")
        self.served = {name: Served(m, self.executor, self.metrics, settings) for name, m in models.items()}
        self.ready = False
        self.paths: set = set()  # the app's route paths: metric labels

    def get(self, name: str | None, task: str | None = None) -> Served:
        served = self.served.get(name) if name else next(iter(self.served.values()))
        if served is None:
            raise ApiError(404, f"model {name!r} is not served here: use one of {', '.join(self.served)}")
        if task is not None:
            try:
                served.model.require(task)
            except BertforgeError as exc:
                raise ApiError(400, str(exc)) from None
        return served

    def check_texts(self, texts: list, what: str = "inputs") -> None:
        limits = self.settings
        if not texts:
            raise ApiError(422, f"{what} is empty: pass at least one text")
        if len(texts) > limits.max_texts:
            raise ApiError(413, f"{len(texts)} {what} in one request; the limit is {limits.max_texts}: split it")
        for i, t in enumerate(texts):
            if isinstance(t, str) and len(t) > limits.max_chars:
                raise ApiError(413, f"{what}[{i}] has {len(t):,} characters; the limit is {limits.max_chars:,}")
            if isinstance(t, str) and not t.strip():
                raise ApiError(422, f"{what}[{i}] is empty: pass non-empty texts")
            if isinstance(t, str) and not _utf8(t):
                raise ApiError(422, f"{what}[{i}] is not valid Unicode (it holds a lone surrogate): send UTF-8 text")

    async def prepare(self, fn, texts: list, *args):
        """Run a `Model.prepare_*` step (tokenize + checks): inline when small, else in a thread."""
        try:
            if len(texts) <= INLINE_TEXTS and sum(map(len, texts)) < 20_000:
                return fn(texts, *args)
            return await asyncio.to_thread(fn, texts, *args)
        except BertforgeError as exc:
            raise ApiError(422, str(exc)) from None

    async def embed(self, served: Served, texts: list[str], truncate: bool) -> tuple[np.ndarray, int, int]:
        """(N, D) embeddings, tokens used, texts truncated."""
        ids, cut = await self.prepare(served.model.prepare_embed, texts, truncate)
        lengths = [len(r) for r in ids]
        return np.stack(await served.run("embed", ids, lengths)), sum(lengths), cut

    async def embed_ids(self, served: Served, rows: list[list[int]]) -> tuple[np.ndarray, int]:
        model = served.model
        for i, row in enumerate(rows):
            if not row:
                raise ApiError(422, f"input[{i}] is an empty token list")
            if len(row) > model.max_length:
                raise ApiError(422, f"input[{i}] has {len(row)} token ids; model '{model.name}' takes {model.max_length}")
            if min(row) < 0 or max(row) >= model.tokenizer.vocab_size:
                raise ApiError(422, f"input[{i}] has a token id outside the vocabulary 0..{model.tokenizer.vocab_size - 1}")
        return np.stack(await served.run("embed", rows, [len(r) for r in rows])), sum(map(len, rows))


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_vector(row: np.ndarray, fmt: str) -> list[float] | str:
    return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") if fmt == "base64" else row.tolist()


def json_response(data: dict) -> Response:
    """JSON without FastAPI's per-field encoder (embeddings are long float lists)."""
    return Response(json.dumps(data, ensure_ascii=False, separators=(",", ":")), media_type="application/json")
