"""The routes of `bertforge serve` (see `bertforge.serve.app` for errors, limits and batching).

Each handler picks the model (`model` field, default the first), checks the request against the
limits, prepares rows with the `Model.prepare_*` step, awaits the batcher, and formats the answer.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from importlib import resources
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from bertforge._version import __version__
from bertforge.api import Row, postprocess_embeddings, split_pairs
from bertforge.errors import BertforgeError
from bertforge.serve import schemas as s
from bertforge.serve.core import ApiError, Server, encode_vector, json_response
from bertforge.serve.metrics import CONTENT_TYPE

router = APIRouter()


def get_server(request: Request) -> Server:
    """The app's `Server` (models, settings, metrics), for the handlers."""
    return request.app.state.server


ServerDep = Annotated[Server, Depends(get_server)]


def _dimensions(emb: np.ndarray, dimensions: int | None, normalize: bool | None = None) -> np.ndarray:
    try:
        return postprocess_embeddings(emb, normalize, dimensions, emb.shape[1])
    except BertforgeError as exc:
        raise ApiError(422, str(exc)) from None


@router.post("/v1/embeddings", response_model=s.EmbeddingsResponse, tags=["embeddings"],
             summary="OpenAI-compatible embeddings (float or base64)")
async def embeddings(req: s.EmbeddingsRequest, server: ServerDep):
    served = server.get(req.model)
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    if inputs and isinstance(inputs[0], int):
        inputs = [inputs]  # one token list
    server.check_texts(inputs, "input")
    if isinstance(inputs[0], list):
        emb, tokens = await server.embed_ids(served, inputs)
        cut = 0
    else:
        emb, tokens, cut = await server.embed(served, inputs, req.truncate)
    emb = _dimensions(emb, req.dimensions)
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(row, req.encoding_format)}
            for i, row in enumerate(emb)]
    return json_response({"object": "list", "data": data, "model": served.model.name,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "truncated": cut})

@router.post("/similarity", response_model=s.SimilarityResponse, tags=["embeddings"],
             summary="cosine similarity of one text against candidates, ranked")
async def similarity(req: s.SimilarityRequest, server: ServerDep):
    served = server.get(req.model)
    server.check_texts(req.sentences, "sentences")
    server.check_texts([req.source_sentence], "source_sentence")
    emb, tokens, cut = await server.embed(served, [req.source_sentence, *req.sentences], req.truncate)
    emb = _dimensions(emb, None, normalize=True)
    scores = (emb[1:] @ emb[0]).tolist()
    ranking = sorted(({"index": i, "score": x} for i, x in enumerate(scores)), key=lambda r: -r["score"])
    return json_response({"model": served.model.name, "scores": scores, "ranking": ranking,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "truncated": cut})

@router.post("/rerank", response_model=s.RerankResponse, tags=["tasks"],
             summary="score (query, text) pairs with a cross-encoder (1-label or binary classifier)")
async def rerank(req: s.RerankRequest, server: ServerDep):
    served = server.get(req.model, "classify")
    model = served.model
    if model.labels is not None and len(model.labels) != 2:
        raise ApiError(400, f"model '{model.name}' is a {len(model.labels)}-label classifier: rerank needs a "
                            "cross-encoder with one score (regression) or two labels")
    server.check_texts(req.texts, "texts")
    server.check_texts([req.query], "query")
    rows, cut = await server.prepare(lambda q: model.prepare_classify(q, req.texts, req.truncate),
                                     [req.query] * len(req.texts))
    results = await served.run("classify", rows, [len(r.input_ids) for r in rows])
    if model.labels is None:
        scores = [r["score"] if req.raw_scores else 1 / (1 + math.exp(-r["score"])) for r in results]
    else:
        scores = [r["scores"][1]["score"] for r in results]
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
    return {"model": model.name, "truncated": cut, "results": [
        {"index": i, "score": scores[i], "text": req.texts[i] if req.return_text else None} for i in ranked]}

@router.post("/fill-mask", response_model=s.FillMaskResponse, tags=["tasks"],
             summary="top-k tokens with probabilities for every mask token")
async def fill_mask(req: s.FillMaskRequest, server: ServerDep):
    served = server.get(req.model, "fill_mask")
    texts = [req.inputs] if isinstance(req.inputs, str) else req.inputs
    server.check_texts(texts)
    rows = await server.prepare(lambda ts: [served.model.prepare_fill_mask(t) for t in ts], texts)
    out = await served.run("fill_mask", [(r, req.top_k) for r in rows], [len(r.input_ids) for r in rows])
    return {"model": served.model.name, "predictions": out}

@router.post("/classify", response_model=s.ClassifyResponse, tags=["tasks"],
             summary="labels with scores (or a regression score) for texts or text pairs")
async def classify(req: s.ClassifyRequest, server: ServerDep):
    served = server.get(req.model, "classify")
    items = [req.inputs] if isinstance(req.inputs, str) else req.inputs
    try:
        firsts, seconds = split_pairs(items)
    except BertforgeError as exc:
        raise ApiError(422, str(exc)) from None
    server.check_texts(firsts)
    if seconds is not None:
        server.check_texts(seconds)
    rows, cut = await server.prepare(lambda a: served.model.prepare_classify(a, seconds, req.truncate), firsts)
    results = await served.run("classify", rows, [len(r.input_ids) for r in rows])
    return {"model": served.model.name, "results": results, "truncated": cut}

@router.post("/qa", response_model=s.QAResponse, tags=["tasks"],
             summary="extractive question answering (SQuAD head, sliding windows over long contexts)")
async def qa(req: s.QARequest, server: ServerDep):
    served = server.get(req.model, "answer")
    server.check_texts([req.question], "question")
    server.check_texts([req.context], "context")
    example, features = await server.prepare(lambda qc: served.model.prepare_answer(*qc), [req.question, req.context])
    logits = await served.run("qa", features, [len(f.input_ids) for f in features])
    return {"model": served.model.name, "windows": len(features),
            **served.model.decode_answer(example, features, logits)}

@router.post("/inspect", tags=["tasks"], summary="bertforge inspect: mask a passage, predict, right/wrong")
async def inspect(req: s.InspectRequest, server: ServerDep):
    served = server.get(req.model, "fill_mask")
    server.check_texts([req.text], "text")
    model = served.model

    def call():
        try:
            return model.inspect(req.text, req.mask_rate, req.seed, req.top_k)
        except BertforgeError as exc:
            return exc

    [records] = await served.run("call", [call], [max(1, len(req.text) // 3)])
    if isinstance(records, BertforgeError):
        raise ApiError(422, str(records))
    return {"model": model.name, "records": [asdict(r) for r in records]}

@router.post("/tokenize", tags=["tokens"], summary="WordPiece tokens, ids and character offsets")
async def tokenize(req: s.TokenizeRequest, server: ServerDep):
    served = server.get(req.model)
    texts = [req.inputs] if isinstance(req.inputs, str) else req.inputs
    server.check_texts(texts)
    if req.pairs is not None:
        server.check_texts(req.pairs, "pairs")
    out = await server.prepare(lambda ts: served.model.tokenize(ts, req.pairs), texts)
    return {"model": served.model.name, "tokens": out}

@router.get("/v1/models", tags=["embeddings"], summary="OpenAI-compatible list of the served models")
async def list_models(server: ServerDep):
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "bertforge"}
                                       for name in server.served]}

@router.get("/info", tags=["service"], summary="served models, heads, dimensions, lengths and limits")
async def info(server: ServerDep):
    limits = {k: getattr(server.settings, k) for k in ("max_texts", "max_chars", "max_body_bytes",
                                                       "max_batch_tokens", "max_wait_ms", "max_queue_tokens")}
    return {"version": __version__, "auth": server.settings.api_key is not None,
            "models": [x.model.info for x in server.served.values()], "limits": limits}

@router.get("/health", tags=["service"], summary="200 once every model is loaded and warmed up")
async def health(server: ServerDep):
    if not server.ready:
        return JSONResponse({"status": "loading"}, 503)
    return {"status": "ok", "models": list(server.served)}



@router.get("/metrics", tags=["service"], summary="Prometheus metrics (text format)")
async def metrics(server: ServerDep) -> Response:
    return Response(server.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(resources.files("bertforge.serve").joinpath("static/index.html").read_text("utf-8"))


__all__ = ["Row", "router"]
